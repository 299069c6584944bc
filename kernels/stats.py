"""Statistics kernel: one program per row, one streaming read of student and teacher logits.

Per row, with x = s/T and z = u/T (the columns of :data:`STAT_NAMES`, in this order):

    lse_s, lse_u, lp_s = x[y] - lse_s, lp_u = z[y] - lse_u,
    lq_as = z[a_s] - lse_u, lq_au = z[a_u] - lse_u  (a_s = argmax s, a_u = argmax u, lowest index on ties),
    H_u = -Σ q log q, CE_su = -Σ p log q, D (fkl or rkl; jsd's needs both LSEs: see grad.py),
    agree = (a_s == a_u), lse_untempered = logsumexp(s) (for the CE term; = lse_s unless NEED_LSE_UNTEMPERED).

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

# The columns of the [N, NUM_STATS] fp32 output: the one list the kernels, the launcher, the caller
# (vcrd/_triton.py) and the tests use. The kernels address them through the constexprs below.
STAT_NAMES = ("lse_s", "lse_u", "lp_s", "lp_u", "lq_as", "lq_au", "H_u", "CE_su", "D", "agree", "lse_untempered",
              "max_s", "max_u", "log_sum_s", "log_sum_u", "log_sum_untempered")
NUM_STATS = len(STAT_NAMES)
COL_LSE_S = tl.constexpr(STAT_NAMES.index("lse_s"))
COL_LSE_U = tl.constexpr(STAT_NAMES.index("lse_u"))
COL_LP_S = tl.constexpr(STAT_NAMES.index("lp_s"))
COL_LP_U = tl.constexpr(STAT_NAMES.index("lp_u"))
COL_LQ_AS = tl.constexpr(STAT_NAMES.index("lq_as"))
COL_LQ_AU = tl.constexpr(STAT_NAMES.index("lq_au"))
COL_H_U = tl.constexpr(STAT_NAMES.index("H_u"))
COL_CE_SU = tl.constexpr(STAT_NAMES.index("CE_su"))
COL_D = tl.constexpr(STAT_NAMES.index("D"))
COL_AGREE = tl.constexpr(STAT_NAMES.index("agree"))
COL_LSE_UNTEMPERED = tl.constexpr(STAT_NAMES.index("lse_untempered"))
# each LSE as (raw row maximum, log Σe relative to it): lse_s = max_s/T + log_sum_s, but the sum rounds
# log Σe away when max/T is huge, so the gradient kernel and the CE term use the parts
COL_MAX_S = tl.constexpr(STAT_NAMES.index("max_s"))
COL_MAX_U = tl.constexpr(STAT_NAMES.index("max_u"))
COL_LOG_SUM_S = tl.constexpr(STAT_NAMES.index("log_sum_s"))
COL_LOG_SUM_U = tl.constexpr(STAT_NAMES.index("log_sum_u"))
COL_LOG_SUM_UNTEMPERED = tl.constexpr(STAT_NAMES.index("log_sum_untempered"))
NUM_STATS_C = tl.constexpr(NUM_STATS)
NUM_STATS_POW2 = tl.constexpr(triton.next_power_of_2(NUM_STATS))

# divergence codes (the kernels' DIVERGENCE constexpr)
FKL = tl.constexpr(0)
RKL = tl.constexpr(1)
JSD = tl.constexpr(2)
DIVERGENCE_CODES = {"fkl": FKL.value, "rkl": RKL.value, "jsd": JSD.value}

# A lane's running maximum before it has seen a finite logit: -FLT_MAX, finite (so no -inf - -inf =
# NaN inside the loop) and <= every finite fp32 logit (so each one counts); differences against it
# are finite once scaled by the overflow scale, and a lane's first rescale factor multiplies zeros.
LOWEST_LOGIT = tl.constexpr(-3.4028234663852886e38)


@triton.jit
def online_lane_update(v, lane_max, inv_T, scale, inv_scale):
    """One element per lane into running (max, Σ exp((v - max)/T)) accumulators, with one exp.

    Returns ``(new_max, grew, rel, shift, rescale, weight)``: ``rel = c·(v - new_max)/T`` (<= 0, -inf for
    masked entries), ``shift = c·(new_max - lane_max)/T`` (>= 0), ``rescale = exp(-shift/c)`` for the old
    sums and ``weight = exp(rel/c)`` for the new element. Exactly one of them is not 1, so both come
    from ``exp((rel - shift)/c)``. ``c = scale`` (``inv_scale = 1/c``) is the power of two of
    :func:`vcrd.core.overflow.overflow_scale`: ``rel`` and ``shift`` are finite for any fp32 logits
    (T >= 1), and so are sums of them times weights <= 1. A NaN element gives a NaN weight and leaves
    the maximum alone.
    """
    grew = v > lane_max
    new_max = tl.where(grew, v, lane_max)
    scale_T = scale * inv_T
    rel = v * scale_T - new_max * scale_T
    shift = new_max * scale_T - lane_max * scale_T
    t = tl.exp((rel - shift) * inv_scale)
    rescale = tl.where(grew, t, 1.0)
    weight = tl.where(grew, 1.0, t)
    return new_max, grew, rel, shift, rescale, weight


@triton.jit
def weighted_or_zero(weight, value):
    """``weight · value`` with ``0 · (±inf) = 0``: a masked entry (weight 0) adds nothing."""
    return tl.where(weight > 0, weight * value, 0.0)


@triton.jit
def lane_argmax(lane_max, lane_arg, row_max):
    """Lowest index among the lanes holding the row maximum (each lane keeps its first maximum)."""
    return tl.min(tl.where(lane_max == row_max, lane_arg, 2147483647), 0)


@triton.jit
def stats_kernel(
    # pointers
    s_ptr, u_ptr, labels_ptr, out_ptr,
    # strides (elements)
    stride_s, stride_u, stride_out,
    # sizes and scalars (scale, inv_scale: the overflow scale c and 1/c)
    V, inv_T, scale, inv_scale,
    # meta
    DIVERGENCE: tl.constexpr, NEED_LSE_UNTEMPERED: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    y = tl.load(labels_ptr + row)
    out = out_ptr + row * stride_out
    if y >= 0:
        s_row = s_ptr + row * stride_s
        u_row = u_ptr + row * stride_u
        s_y = tl.load(s_row + y, mask=y < V, other=0.0).to(tl.float32)
        u_y = tl.load(u_row + y, mask=y < V, other=0.0).to(tl.float32)
        lanes = tl.arange(0, BLOCK_V)
        # per-lane accumulators, combined once after the loop
        max_s = tl.full([BLOCK_V], 0.0, tl.float32) + LOWEST_LOGIT  # running max of s (raw)
        max_u = tl.full([BLOCK_V], 0.0, tl.float32) + LOWEST_LOGIT
        arg_s = tl.zeros([BLOCK_V], tl.int32)  # index of the lane's first maximum
        arg_u = tl.zeros([BLOCK_V], tl.int32)
        sum_s = tl.zeros([BLOCK_V], tl.float32)  # Σ e_s, e_s = exp(x'), x' = x - lane max of x
        sum_u = tl.zeros([BLOCK_V], tl.float32)  # Σ e_u
        # sums of e·(scaled differences): c·Σ e·d, finite for any fp32 logits
        entropy_acc = tl.zeros([BLOCK_V], tl.float32)  # c·Σ e_u z'   (→ H_u)
        cross_acc = tl.zeros([BLOCK_V], tl.float32)  # c·Σ e_s z'   (→ CE_su)
        divergence_acc = tl.zeros([BLOCK_V], tl.float32)  # fkl: c·Σ e_u (z' - x'); rkl: c·Σ e_s (x' - z')
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
                divergence_acc = rescale_u * (divergence_acc - (shift_u - shift_s) * sum_u) + \
                    weighted_or_zero(e_u, zs - xs)
            if DIVERGENCE == RKL:
                divergence_acc = rescale_s * (divergence_acc - (shift_s - shift_u) * sum_s) + \
                    weighted_or_zero(e_s, xs - zs)
            if NEED_LSE_UNTEMPERED:
                _, _, _, _, rescale_1, e_1 = online_lane_update(s, max_s, 1.0, 1.0, 1.0)
                sum_s_untempered = rescale_1 * sum_s_untempered + e_1
            sum_s = rescale_s * sum_s + e_s
            sum_u = rescale_u * sum_u + e_u
            max_s = new_max_s
            max_u = new_max_u
        # combine the lanes: shift each lane's sums from its own maximum to the row maximum
        row_max_s = tl.max(max_s, 0)
        row_max_u = tl.max(max_u, 0)
        a_s = lane_argmax(max_s, arg_s, row_max_s)
        a_u = lane_argmax(max_u, arg_u, row_max_u)
        u_at_as = tl.load(u_row + a_s).to(tl.float32)
        lane_shift_s = (row_max_s * scale - max_s * scale) * inv_T
        lane_shift_u = (row_max_u * scale - max_u * scale) * inv_T
        lane_scale_s = tl.exp(-lane_shift_s * inv_scale)
        lane_scale_u = tl.exp(-lane_shift_u * inv_scale)
        total_s = tl.sum(lane_scale_s * sum_s, 0)
        total_u = tl.sum(lane_scale_u * sum_u, 0)
        entropy = tl.sum(lane_scale_u * (entropy_acc - lane_shift_u * sum_u), 0)
        cross = tl.sum(lane_scale_s * (cross_acc - lane_shift_u * sum_s), 0)
        log_total_s = tl.log(total_s)
        log_total_u = tl.log(total_u)
        lse_s = row_max_s * inv_T + log_total_s
        lse_u = row_max_u * inv_T + log_total_u
        tl.store(out + COL_LSE_S, lse_s)
        tl.store(out + COL_LSE_U, lse_u)
        tl.store(out + COL_MAX_S, row_max_s)
        tl.store(out + COL_MAX_U, row_max_u)
        tl.store(out + COL_LOG_SUM_S, log_total_s)
        tl.store(out + COL_LOG_SUM_U, log_total_u)
        # log-probs relative to the row maxima (-inf only below fp32's range)
        tl.store(out + COL_LP_S, (s_y * inv_T - row_max_s * inv_T) - log_total_s)
        tl.store(out + COL_LP_U, (u_y * inv_T - row_max_u * inv_T) - log_total_u)
        tl.store(out + COL_LQ_AS, (u_at_as * inv_T - row_max_u * inv_T) - log_total_u)
        tl.store(out + COL_LQ_AU, -log_total_u)
        # divided by Σe first, then unscaled: inf only where the true value is beyond fp32's range
        tl.store(out + COL_H_U, log_total_u - entropy / total_u * inv_scale)
        tl.store(out + COL_CE_SU, log_total_u - cross / total_s * inv_scale)
        if DIVERGENCE == FKL:
            kl = tl.sum(lane_scale_u * (divergence_acc - (lane_shift_u - lane_shift_s) * sum_u), 0)
            tl.store(out + COL_D, kl / total_u * inv_scale + log_total_s - log_total_u)
        if DIVERGENCE == RKL:
            kl = tl.sum(lane_scale_s * (divergence_acc - (lane_shift_s - lane_shift_u) * sum_s), 0)
            tl.store(out + COL_D, kl / total_s * inv_scale + log_total_u - log_total_s)
        if DIVERGENCE == JSD:
            tl.store(out + COL_D, 0.0)  # written by the gradient kernel's first loop
        tl.store(out + COL_AGREE, (a_s == a_u).to(tl.float32))
        if NEED_LSE_UNTEMPERED:
            log_total_1 = tl.log(tl.sum(tl.exp(max_s - row_max_s) * sum_s_untempered, 0))
            tl.store(out + COL_LSE_UNTEMPERED, row_max_s + log_total_1)
            tl.store(out + COL_LOG_SUM_UNTEMPERED, log_total_1)
        else:
            tl.store(out + COL_LSE_UNTEMPERED, lse_s)
            tl.store(out + COL_LOG_SUM_UNTEMPERED, log_total_s)
    else:
        cols = tl.arange(0, NUM_STATS_POW2)
        tl.store(out + cols, tl.zeros([NUM_STATS_POW2], tl.float32), mask=cols < NUM_STATS_C)


def launch_config(V: int) -> dict:
    """``BLOCK_V`` (next power of two of V, at most 512) and ``num_warps`` (4): 4 elements per thread
    per tensor. The kernels keep per-lane accumulators (one register per element per thread for
    each), so registers grow with elements per thread: at 4 the statistics kernel needs ~72-80
    registers (5-7 CTAs per SM), at 8 ~164, at 16 all 255 (see ``vcrd aot`` and docs/kernels.md)."""
    return {"BLOCK_V": min(triton.next_power_of_2(V), 512), "num_warps": 4}


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
            s, u, labels, out,
            s.stride(0), u.stride(0), out.stride(0),
            V, 1.0 / temperature, scale, 1.0 / scale,
            DIVERGENCE=DIVERGENCE_CODES[divergence], NEED_LSE_UNTEMPERED=need_lse_untempered, **launch_config(V),
        )
    return out
