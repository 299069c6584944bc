"""Statistics kernel: one program per row, one streaming read of student and teacher logits.

Per row, with x = s/T and z = u/T (the columns of :data:`STAT_NAMES`, :mod:`vcrd.core.stat_columns`):

    lse_s, lse_u, lp_s = x[y] - lse_s, lp_u = z[y] - lse_u,
    lq_as = z[a_s] - lse_u, lq_au = z[a_u] - lse_u  (a_s = argmax s, a_u = argmax u, lowest index on ties),
    H_u = -Σ q log q, CE_su = -Σ p log q, D (fkl or rkl; a divergence given by element-wise terms, jsd,
    needs both LSEs first: grad.py writes its D and kl_pm), agree = (a_s == a_u),
    lse_untempered = logsumexp(s) (for the CE term; = lse_s unless NEED_LSE_UNTEMPERED); zf = qf = 0.

The loop over ``BLOCK_V`` tiles is element-wise only: every position of the tile is a lane that keeps
its own online accumulators (running maximum, argmax, and sums relative to that maximum, rescaled
when it grows, as in flash-attention's online softmax). No reduction runs inside the loop; the
lanes are combined once after it. ``s[y]`` and ``u[y]`` are loaded by pointer before the loop and
``u[a_s]`` after it (one element each).

Sums are of ``e·(z' - x')`` with ``x' = x - max x``, ``z' = z - max z``: small when the models agree,
so no large terms cancel. Differences are taken on logits times the power of two
``c = overflow_scale(V)`` and the sums unscaled after dividing by ``Σe`` (:mod:`vcrd.core.overflow`),
so logits anywhere in fp32's range give a finite result wherever the true one is. Ignored rows
(label < 0) read no logits and get zeros.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from vcrd.core.overflow import overflow_scale
from vcrd.core.stat_columns import STAT_COLUMNS

from .tl_utils import (
    COL_LP_S,
    COL_LP_U,
    COL_LQ_AS,
    COL_LQ_AU,
    DIVERGENCE_CODES,
    FKL,
    LOWEST_LOGIT,
    NUM_STATS,
    RKL,
    combine_lanes,
    lane_argmax,
    launch_config,
    online_lane_update,
    program_row,
    store_lse_columns,
    store_row_columns,
    store_untempered_columns,
    store_zero_stats,
    untempered_lane_sum,
    weighted_or_zero,
)

STAT_NAMES = STAT_COLUMNS  # the columns of the [N, NUM_STATS] output, by name


@triton.jit
def _kl_lane_update(acc, rescale_a, shift_a, shift_b, sum_a, e_a, a, b):
    """A lane's ``c·Σ e_a (a' - b')`` (fkl: ``a`` the teacher; rkl: the student), rescaled when its maxima grow."""
    return rescale_a * (acc - (shift_a - shift_b) * sum_a) + weighted_or_zero(e_a, a - b)


@triton.jit
def _kl_of_lanes(acc, lane_scale_a, lane_shift_a, lane_shift_b, sum_a, total_a, log_total_a, log_total_b, inv_scale):
    """``KL(a‖b)`` of the row from the lanes' :func:`_kl_lane_update` sums, shifted to the row maxima."""
    kl = tl.sum(lane_scale_a * (acc - (lane_shift_a - lane_shift_b) * sum_a), 0)
    return kl / total_a * inv_scale + log_total_b - log_total_a


@triton.jit
def _store_label_columns(out, s_y, u_y, u_at_as, max_s, max_u, log_total_s, log_total_u, inv_T):
    """``lp_s, lp_u, lq_as, lq_au``: log-probs relative to the row maxima (-inf only below fp32's range)."""
    tl.store(out + COL_LP_S, (s_y * inv_T - max_s * inv_T) - log_total_s)
    tl.store(out + COL_LP_U, (u_y * inv_T - max_u * inv_T) - log_total_u)
    tl.store(out + COL_LQ_AS, (u_at_as * inv_T - max_u * inv_T) - log_total_u)
    tl.store(out + COL_LQ_AU, -log_total_u)


@triton.jit
def stats_kernel(
    # pointers
    s_ptr, u_ptr, labels_ptr, out_ptr,
    # strides (elements)
    stride_s, stride_u, stride_out,
    # shapes and scalars (scale, inv_scale: the overflow scale c and 1/c)
    V, inv_T, scale, inv_scale,
    # constants
    DIVERGENCE: tl.constexpr, NEED_LSE_UNTEMPERED: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row, y = program_row(labels_ptr)
    out = out_ptr + row * stride_out
    if y >= 0:
        s_row = s_ptr + row * stride_s
        u_row = u_ptr + row * stride_u
        s_y = tl.load(s_row + y, mask=y < V, other=0.0).to(tl.float32)
        u_y = tl.load(u_row + y, mask=y < V, other=0.0).to(tl.float32)
        lanes = tl.arange(0, BLOCK_V)
        # per-lane accumulators, combined once after the loop: running maxima (raw), the lane's first argmax,
        # Σe relative to the lane maximum, c·Σ e_u z' (H_u), c·Σ e_s z' (CE_su), c·Σ e_a (a' - b') (fkl/rkl D)
        max_s = tl.full([BLOCK_V], 0.0, tl.float32) + LOWEST_LOGIT
        max_u = tl.full([BLOCK_V], 0.0, tl.float32) + LOWEST_LOGIT
        arg_s = tl.zeros([BLOCK_V], tl.int32)
        arg_u = tl.zeros([BLOCK_V], tl.int32)
        sum_s = tl.zeros([BLOCK_V], tl.float32)
        sum_u = tl.zeros([BLOCK_V], tl.float32)
        entropy_acc = tl.zeros([BLOCK_V], tl.float32)
        cross_acc = tl.zeros([BLOCK_V], tl.float32)
        divergence_acc = tl.zeros([BLOCK_V], tl.float32)
        sum_s_untempered = tl.zeros([BLOCK_V], tl.float32)  # Σ exp(s - lane max of s)
        for start in range(0, V, BLOCK_V):
            offs = start + lanes
            mask = offs < V
            s = tl.load(s_row + offs, mask=mask, other=float("-inf")).to(tl.float32)
            u = tl.load(u_row + offs, mask=mask, other=float("-inf")).to(tl.float32)
            new_max_s, grew_s, xs, shift_s, rescale_s, e_s = online_lane_update(s, max_s, inv_T, scale, inv_scale)
            new_max_u, grew_u, zs, shift_u, rescale_u, e_u = online_lane_update(u, max_u, inv_T, scale, inv_scale)
            arg_s = tl.where(grew_s, offs, arg_s)
            arg_u = tl.where(grew_u, offs, arg_u)
            # sums of e·w become rescale·(sum - shift·Σe) when the maxima grow, plus the new element
            entropy_acc = rescale_u * (entropy_acc - shift_u * sum_u) + weighted_or_zero(e_u, zs)
            cross_acc = rescale_s * (cross_acc - shift_u * sum_s) + weighted_or_zero(e_s, zs)
            if DIVERGENCE == FKL:
                divergence_acc = _kl_lane_update(divergence_acc, rescale_u, shift_u, shift_s, sum_u, e_u, zs, xs)
            if DIVERGENCE == RKL:
                divergence_acc = _kl_lane_update(divergence_acc, rescale_s, shift_s, shift_u, sum_s, e_s, xs, zs)
            sum_s_untempered = untempered_lane_sum(s, max_s, sum_s_untempered, NEED_LSE_UNTEMPERED)
            sum_s = rescale_s * sum_s + e_s
            sum_u = rescale_u * sum_u + e_u
            max_s = new_max_s
            max_u = new_max_u
        # combine the lanes: shift each lane's sums from its own maximum to the row maximum
        row_max_s, lane_shift_s, lane_scale_s, total_s = combine_lanes(max_s, sum_s, inv_T, scale, inv_scale)
        row_max_u, lane_shift_u, lane_scale_u, total_u = combine_lanes(max_u, sum_u, inv_T, scale, inv_scale)
        a_s = lane_argmax(max_s, arg_s, row_max_s)
        a_u = lane_argmax(max_u, arg_u, row_max_u)
        u_at_as = tl.load(u_row + a_s).to(tl.float32)
        entropy = tl.sum(lane_scale_u * (entropy_acc - lane_shift_u * sum_u), 0)
        cross = tl.sum(lane_scale_s * (cross_acc - lane_shift_u * sum_s), 0)
        log_total_s = tl.log(total_s)
        log_total_u = tl.log(total_u)
        store_lse_columns(out, row_max_s, log_total_s, row_max_u, log_total_u, inv_T)
        _store_label_columns(out, s_y, u_y, u_at_as, row_max_s, row_max_u, log_total_s, log_total_u, inv_T)
        D = tl.zeros([], tl.float32)  # a divergence given by terms: written by the gradient kernel's first loop
        if DIVERGENCE == FKL:
            D = _kl_of_lanes(divergence_acc, lane_scale_u, lane_shift_u, lane_shift_s, sum_u, total_u, log_total_u,
                             log_total_s, inv_scale)
        if DIVERGENCE == RKL:
            D = _kl_of_lanes(divergence_acc, lane_scale_s, lane_shift_s, lane_shift_u, sum_s, total_s, log_total_s,
                             log_total_u, inv_scale)
        # H_u, CE_su divided by Σe first, then unscaled: inf only where the true value is beyond fp32's range
        store_row_columns(out, log_total_u - entropy / total_u * inv_scale, log_total_u - cross / total_s * inv_scale,
                          D, a_s, a_u, 0.0, 0.0, 0.0)
        store_untempered_columns(out, max_s, row_max_s, sum_s_untempered, log_total_s, inv_T, NEED_LSE_UNTEMPERED)
    else:
        store_zero_stats(out)


def launch_stats(s: torch.Tensor, u: torch.Tensor, labels: torch.Tensor, temperature: float, divergence: str,
                 need_lse_untempered: bool, out: torch.Tensor = None) -> torch.Tensor:
    """Row statistics ``[N, NUM_STATS]`` fp32 (columns :data:`STAT_NAMES`) of ``s, u [N, V]`` (unit
    stride along V), ``labels [N]`` (negative = ignored row). ``out`` may be passed (e.g. NaN-poisoned
    by tests)."""
    N, V = s.shape
    if s.stride(1) != 1 or u.stride(1) != 1:
        raise ValueError("launch_stats: logits rows must be contiguous along the vocabulary")
    if out is None:
        out = torch.empty((N, NUM_STATS), dtype=torch.float32, device=s.device)
    if N:
        scale = overflow_scale(V)
        stats_kernel[(N,)](
            # pointers
            s, u, labels, out,
            # strides
            s.stride(0), u.stride(0), out.stride(0),
            # shapes and scalars
            V, 1.0 / temperature, scale, 1.0 / scale,
            # constants
            DIVERGENCE=DIVERGENCE_CODES[divergence], NEED_LSE_UNTEMPERED=need_lse_untempered, **launch_config(V),
        )
    return out


__all__ = ["DIVERGENCE_CODES", "NUM_STATS", "STAT_NAMES", "launch_config", "launch_stats", "stats_kernel"]
