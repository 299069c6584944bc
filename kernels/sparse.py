"""Sparse (top-K) teacher kernels (SPEC §10): O(K) teacher work plus one sweep of the student row.

The math of :mod:`vcrd.backends.torch_sparse` (its docstring derives it), one program per row. The
completed teacher has ``fill = tail - log(V - K)`` on the ``V - K`` tokens off the top-K; at
temperature T, ``lse_u = log(Σ_k e^{top_k/T} + (V-K) e^{fill/T})``, ``zq = top/T - lse_u``,
``zf = fill/T - lse_u``, ``qk = e^zq``, ``qf = e^zf`` (0 at K = V), tail mass ``Q = (V-K) qf``.

Statistics kernel (the columns of :mod:`vcrd.core.stat_columns`, as the dense kernel's): a K loop
for the teacher's LSE and argmax ``a_u`` (an id, or ``absent``, the lowest token off the top-K, given
by the launcher), one sweep of the student row (max, argmax, ``Σe``; fkl ``Σ_v x'``, rkl ``Σ_v e x'``
with ``x' = (x - max)/T``), for a divergence given by element-wise terms (jsd) a second sweep of its
terms with every token as if off the top-K (``q = qf``: it needs the student's LSE), then a K loop
gathering the student at the ids (``lp_k``, ``p_k``) for every K-sum and the terms' corrections at
the ids. Per-lane accumulators, one reduction after each loop (as in :mod:`.stats`; its overflow
scale ``c`` too).

Gradient kernel, ``∂D/∂(s/T)`` (:func:`.tl_utils.divergence_grad`) with the tail's ``(qf, zf)`` off the
top-K and ``(qk, zq)`` at the ids: fkl ``p - q``, rkl ``p (log p - log q - D)``, jsd ``(1-β) p (log p -
log m - KL(p‖m))``; the CE term as in :mod:`.grad`. The K columns
are computed first into ``scratch [N, K]`` (reading the logits before the sweep may write over
them), the sweep writes every column, then the K columns are copied over it.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from vcrd.core.overflow import overflow_scale
from vcrd.core.stat_columns import STAT_COLUMNS

from .tl_utils import (
    COL_D,
    COL_KL_PM,
    COL_LP_S,
    COL_LP_U,
    COL_LQ_AS,
    COL_LQ_AU,
    COL_LSE_U,
    COL_ZF,
    DIVERGENCE_CODES,
    FKL,
    INT32_MAX,
    LOWEST_LOGIT,
    NUM_STATS,
    POINTWISE,
    RKL,
    combine_lanes,
    divergence_grad,
    lane_argmax,
    launch_config,
    online_lane_update,
    pointwise_finish,
    pointwise_terms,
    program_row,
    row_coefficients,
    store_lse_columns,
    store_row_columns,
    store_untempered_columns,
    store_zero_grad,
    store_zero_stats,
    student_lse_parts,
    untempered_lane_sum,
    weighted_or_zero,
)

SPARSE_STAT_NAMES = STAT_COLUMNS  # the same columns as the dense kernel's (vcrd.core.stat_columns)


@triton.jit
def _lookup(ids, token, value, found, hit):
    """Per-lane record of ``value`` where ``ids == token`` (ids are distinct: one lane of one tile)."""
    match = ids == token
    return tl.where(match, 1, found), tl.where(match, value, hit)


@triton.jit
def _looked_up(found, hit, otherwise):
    """The recorded value if some lane matched, else ``otherwise``."""
    return tl.where(tl.max(found, 0) > 0, tl.max(tl.where(found > 0, hit, float("-inf")), 0), otherwise)


@triton.jit
def _teacher(top_row, ids_row, fill, absent, V, K, n_tail, log_n_tail, inv_T, BLOCK_K: tl.constexpr):
    """The completed teacher of one row: ``(lse_u, zf, qf, Q, a_u)`` from a K loop over its tempered log-probs
    (their LSE, maximum and its lowest id) and the tail's ``fill`` on the ``n_tail`` other tokens."""
    k_lanes = tl.arange(0, BLOCK_K)
    max_t = tl.full([BLOCK_K], float("-inf"), tl.float32)
    arg_t = tl.full([BLOCK_K], INT32_MAX, tl.int32)
    sum_t = tl.zeros([BLOCK_K], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs = k0 + k_lanes
        mask = offs < K
        top = tl.load(top_row + offs, mask=mask, other=float("-inf")).to(tl.float32)
        ids = tl.load(ids_row + offs, mask=mask, other=INT32_MAX).to(tl.int32)
        arg_t = tl.where(top > max_t, ids, tl.where((top == max_t) & mask, tl.minimum(arg_t, ids), arg_t))
        new_max = tl.maximum(max_t, top)
        ref = tl.where(new_max == float("-inf"), 0.0, new_max)  # finite: no -inf - -inf
        sum_t = sum_t * tl.exp((max_t - ref) * inv_T) + tl.exp((top - ref) * inv_T)
        max_t = new_max
    top_max = tl.max(max_t, 0)
    top_arg = tl.min(tl.where(max_t == top_max, arg_t, INT32_MAX), 0)
    lse_top = top_max * inv_T + tl.log(tl.sum(tl.where(max_t > float("-inf"),
                                                        sum_t * tl.exp((max_t - top_max) * inv_T), 0.0), 0))
    tail_lse = fill * inv_T + log_n_tail  # -inf at K = V
    big = tl.maximum(lse_top, tail_lse)
    lse_u = big + tl.log(tl.exp(lse_top - big) + tl.exp(tail_lse - big))
    zf = fill * inv_T - lse_u
    has_tail = n_tail > 0
    qf = tl.where(has_tail, tl.exp(zf), 0.0)
    best = tl.where(has_tail, tl.maximum(top_max, fill), top_max)
    a_u = tl.minimum(tl.where(top_max == best, top_arg, V), tl.where(has_tail & (fill == best), absent, V))
    return lse_u, zf, qf, qf * n_tail, a_u


@triton.jit
def _student(s_row, V, inv_T, scale, inv_scale, DIVERGENCE: tl.constexpr, NEED_LSE_UNTEMPERED: tl.constexpr,
             BLOCK_V: tl.constexpr):
    """One sweep of the student row: ``(row max, argmax, log Σe, the divergence's own sum, lane maxima,
    untempered lane sums)``; the divergence's sum is fkl ``Σ_v lp_v``, rkl ``Σ_v p lp``, else 0."""
    lanes = tl.arange(0, BLOCK_V)
    max_s = tl.full([BLOCK_V], 0.0, tl.float32) + LOWEST_LOGIT
    arg_s = tl.zeros([BLOCK_V], tl.int32)
    sum_s = tl.zeros([BLOCK_V], tl.float32)
    count = tl.zeros([BLOCK_V], tl.float32)  # valid elements seen by the lane
    x_acc = tl.zeros([BLOCK_V], tl.float32)  # fkl: c·Σ x'
    px_acc = tl.zeros([BLOCK_V], tl.float32)  # rkl: c·Σ e x'
    sum_1 = tl.zeros([BLOCK_V], tl.float32)
    for start in range(0, V, BLOCK_V):
        offs = start + lanes
        mask = offs < V
        s = tl.load(s_row + offs, mask=mask, other=float("-inf")).to(tl.float32)
        new_max_s, grew_s, xs, shift_s, rescale_s, e_s = online_lane_update(s, max_s, inv_T, scale, inv_scale)
        arg_s = tl.where(grew_s, offs, arg_s)
        if DIVERGENCE == FKL:
            x_acc = x_acc - count * shift_s + tl.where(mask, xs, 0.0)
            count += mask.to(tl.float32)
        if DIVERGENCE == RKL:
            px_acc = rescale_s * (px_acc - shift_s * sum_s) + weighted_or_zero(e_s, xs)
        sum_1 = untempered_lane_sum(s, max_s, sum_1, NEED_LSE_UNTEMPERED)
        sum_s = rescale_s * sum_s + e_s
        max_s = new_max_s
    row_max, lane_shift, lane_scale, total = combine_lanes(max_s, sum_s, inv_T, scale, inv_scale)
    log_sum = tl.log(total)
    own = tl.zeros([], tl.float32)
    if DIVERGENCE == FKL:
        own = tl.sum(x_acc - count * lane_shift, 0) * inv_scale - V * log_sum
    if DIVERGENCE == RKL:
        own = tl.sum(lane_scale * (px_acc - lane_shift * sum_s), 0) / total * inv_scale - log_sum
    return row_max, lane_argmax(max_s, arg_s, row_max), log_sum, own, max_s, sum_1


@triton.jit
def _tail_terms(s_row, V, max_s, log_sum_s, qf, zf, inv_T, beta, DIVERGENCE: tl.constexpr, BLOCK_V: tl.constexpr):
    """A divergence given by terms: their row sums with every token as if off the top-K (``q = qf``)."""
    acc0 = tl.zeros([BLOCK_V], tl.float32)
    acc1 = tl.zeros([BLOCK_V], tl.float32)
    for start in range(0, V, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V)
        mask = offs < V
        lp = (tl.load(s_row + offs, mask=mask, other=float("-inf")).to(tl.float32) * inv_T - max_s * inv_T) - log_sum_s
        term0, term1 = pointwise_terms(tl.exp(lp), lp, qf, zf, beta, DIVERGENCE)
        acc0 += tl.where(mask, term0, 0.0)
        acc1 += tl.where(mask, term1, 0.0)
    return tl.sum(acc0, 0), tl.sum(acc1, 0)


@triton.jit
def _at_ids(s_row, ids_row, top_row, out, K, y, a_s, a_u, max_s, log_sum_s, lse_u, zf, qf, inv_T, beta,
            DIVERGENCE: tl.constexpr, BLOCK_K: tl.constexpr):
    """The K loop: the student at the ids; stores ``lp_u, lq_as, lq_au`` (the teacher's at each token, ``zf``
    off the top-K) and returns ``Σ p_k, Σ qk zq, Σ p_k zq``, fkl's ``(Σ lp_k, Σ qk (zq - lp_k))`` or the
    terms' corrections at the ids (their value at ``(p_k, qk)`` minus at ``(p_k, qf)``)."""
    k_lanes = tl.arange(0, BLOCK_K)
    sums = tl.zeros([BLOCK_K], tl.float32)  # Σ p_k
    h_acc = tl.zeros([BLOCK_K], tl.float32)  # Σ qk zq
    ce_acc = tl.zeros([BLOCK_K], tl.float32)  # Σ pk zq
    acc0 = tl.zeros([BLOCK_K], tl.float32)
    acc1 = tl.zeros([BLOCK_K], tl.float32)
    found_y, hit_y = tl.zeros([BLOCK_K], tl.int32), tl.zeros([BLOCK_K], tl.float32)
    found_as, hit_as = tl.zeros([BLOCK_K], tl.int32), tl.zeros([BLOCK_K], tl.float32)
    found_au, hit_au = tl.zeros([BLOCK_K], tl.int32), tl.zeros([BLOCK_K], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs = k0 + k_lanes
        mask = offs < K
        ids = tl.load(ids_row + offs, mask=mask, other=-1)
        zq = tl.load(top_row + offs, mask=mask, other=float("-inf")).to(tl.float32) * inv_T - lse_u
        qk = tl.exp(zq)
        lpk = (tl.load(s_row + ids, mask=mask, other=float("-inf")).to(tl.float32) * inv_T - max_s * inv_T) - log_sum_s
        pk = tl.exp(lpk)
        sums += pk
        h_acc += weighted_or_zero(qk, zq)
        ce_acc += weighted_or_zero(pk, zq)
        if DIVERGENCE == FKL:
            acc0 += tl.where(mask, lpk, 0.0)
            acc1 += weighted_or_zero(qk, zq - lpk)
        if DIVERGENCE >= POINTWISE:
            at0, at1 = pointwise_terms(pk, lpk, qk, zq, beta, DIVERGENCE)
            off0, off1 = pointwise_terms(pk, lpk, qf, zf, beta, DIVERGENCE)
            acc0 += tl.where(mask, at0 - off0, 0.0)
            acc1 += tl.where(mask, at1 - off1, 0.0)
        found_y, hit_y = _lookup(ids, y, zq, found_y, hit_y)
        found_as, hit_as = _lookup(ids, a_s, zq, found_as, hit_as)
        found_au, hit_au = _lookup(ids, a_u, zq, found_au, hit_au)
    tl.store(out + COL_LP_U, _looked_up(found_y, hit_y, zf))
    tl.store(out + COL_LQ_AS, _looked_up(found_as, hit_as, zf))
    tl.store(out + COL_LQ_AU, _looked_up(found_au, hit_au, zf))
    return tl.sum(sums, 0), tl.sum(h_acc, 0), tl.sum(ce_acc, 0), tl.sum(acc0, 0), tl.sum(acc1, 0)


@triton.jit
def sparse_stats_kernel(
    # pointers
    s_ptr, ids_ptr, top_ptr, tail_ptr, absent_ptr, labels_ptr, out_ptr,
    # strides (elements)
    stride_s, stride_ids, stride_top, stride_out,
    # shapes and scalars (n_tail = V - K; scale, inv_scale: the overflow scale c and 1/c)
    V, K, n_tail, log_n_tail, log_fill_count, inv_T, beta, scale, inv_scale,
    # constants
    DIVERGENCE: tl.constexpr, NEED_LSE_UNTEMPERED: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
):
    row, y = program_row(labels_ptr)
    out = out_ptr + row * stride_out
    if y >= 0:
        s_row = s_ptr + row * stride_s
        ids_row = ids_ptr + row * stride_ids
        top_row = top_ptr + row * stride_top
        fill = tl.load(tail_ptr + row).to(tl.float32) - log_fill_count
        absent = tl.load(absent_ptr + row).to(tl.int32)
        lse_u, zf, qf, Q, a_u = _teacher(top_row, ids_row, fill, absent, V, K, n_tail, log_n_tail, inv_T, BLOCK_K)
        max_s, a_s, log_sum_s, own, lane_max_s, sum_1 = _student(s_row, V, inv_T, scale, inv_scale, DIVERGENCE,
                                                                 NEED_LSE_UNTEMPERED, BLOCK_V)
        tail0 = tl.zeros([], tl.float32)
        tail1 = tl.zeros([], tl.float32)
        if DIVERGENCE >= POINTWISE:  # a second sweep: the terms need the student's LSE
            tail0, tail1 = _tail_terms(s_row, V, max_s, log_sum_s, qf, zf, inv_T, beta, DIVERGENCE, BLOCK_V)
        sum_pk, h_k, ce_k, acc0, acc1 = _at_ids(s_row, ids_row, top_row, out, K, y, a_s, a_u, max_s, log_sum_s,
                                                lse_u, zf, qf, inv_T, beta, DIVERGENCE, BLOCK_K)
        P = tl.where(n_tail > 0, tl.maximum(1.0 - sum_pk, 0.0), 0.0)  # the student's mass off the top-K
        H_u = -(h_k + tl.where(Q > 0, Q * zf, 0.0))
        CE_su = -(ce_k + tl.where(P > 0, P * zf, 0.0))
        D = tl.zeros([], tl.float32)
        kl_pm = tl.zeros([], tl.float32)
        if DIVERGENCE == FKL:  # Σ_k qk (zq - lp_k) + Σ_{v∉I} qf (zf - lp_v)
            D = acc1 + tl.where(Q > 0, Q * zf - qf * (own - acc0), 0.0)
        if DIVERGENCE == RKL:  # Σ_v p lp + CE_su
            D = own + CE_su
        if DIVERGENCE >= POINTWISE:
            D, kl_pm = pointwise_finish(tail0 + acc0, tail1 + acc1, beta, DIVERGENCE)
        s_y = tl.load(s_row + y, mask=y < V, other=0.0).to(tl.float32)
        store_lse_columns(out, max_s, log_sum_s, 0.0, lse_u, inv_T)  # the teacher's LSE is lse_u itself
        tl.store(out + COL_LP_S, (s_y * inv_T - max_s * inv_T) - log_sum_s)
        store_row_columns(out, H_u, CE_su, D, a_s, a_u, zf, qf, kl_pm)
        store_untempered_columns(out, lane_max_s, max_s, sum_1, log_sum_s, inv_T, NEED_LSE_UNTEMPERED)
    else:
        store_zero_stats(out)


@triton.jit
def _sparse_grad(s, offs, y, zteacher, max_s, log_sum_s, log_sum_1, row, coef_kd, coef_ce, inv_T, beta,
                 DIVERGENCE: tl.constexpr, HAS_CE: tl.constexpr):
    """The gradient at columns ``offs`` with student logits ``s`` and tempered teacher log-probs
    ``zteacher``; ``row`` is the row the divergence's gradient needs (rkl: D, jsd: KL(p‖m))."""
    logp = (s * inv_T - max_s * inv_T) - log_sum_s
    g = coef_kd * divergence_grad(tl.exp(logp), logp, tl.exp(zteacher), zteacher, row, beta, DIVERGENCE)
    if HAS_CE:
        g += coef_ce * (tl.exp((s - max_s) - log_sum_1) - (offs == y).to(tl.float32))
    return g


@triton.jit
def sparse_grad_kernel(
    # pointers
    s_ptr, ids_ptr, top_ptr, labels_ptr, stats_ptr, coef_ptr, grad_ptr, scratch_ptr,
    # strides (elements)
    stride_s, stride_ids, stride_top, stride_stats, stride_grad, stride_scratch,
    # shapes and scalars
    V, K, inv_T, beta,
    # constants
    DIVERGENCE: tl.constexpr, HAS_CE: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
):
    row, y = program_row(labels_ptr)
    g_row = grad_ptr + row * stride_grad
    if y >= 0:
        s_row = s_ptr + row * stride_s
        ids_row = ids_ptr + row * stride_ids
        top_row = top_ptr + row * stride_top
        scratch_row = scratch_ptr + row * stride_scratch
        stats = stats_ptr + row * stride_stats
        max_s, log_sum_s, log_sum_1 = student_lse_parts(stats)
        lse_u = tl.load(stats + COL_LSE_U)
        zf = tl.load(stats + COL_ZF)
        if DIVERGENCE >= POINTWISE:
            grad_row = tl.load(stats + COL_KL_PM)  # the gradient of a divergence given by terms needs its own row
        else:
            grad_row = tl.load(stats + COL_D)
        coef_kd, coef_ce = row_coefficients(coef_ptr, row, inv_T)
        k_lanes = tl.arange(0, BLOCK_K)
        for k0 in range(0, K, BLOCK_K):  # the K columns, from the logits before anything is written
            offs = k0 + k_lanes
            mask = offs < K
            ids = tl.load(ids_row + offs, mask=mask, other=0)
            zq = tl.load(top_row + offs, mask=mask, other=float("-inf")).to(tl.float32) * inv_T - lse_u
            x = tl.load(s_row + ids, mask=mask, other=float("-inf")).to(tl.float32)
            g = _sparse_grad(x, ids, y, zq, max_s, log_sum_s, log_sum_1, grad_row, coef_kd, coef_ce, inv_T,
                             beta, DIVERGENCE, HAS_CE)
            tl.store(scratch_row + offs, g, mask=mask)
        tl.debug_barrier()
        lanes = tl.arange(0, BLOCK_V)
        for start in range(0, V, BLOCK_V):  # every column as if off the top-K
            offs = start + lanes
            mask = offs < V
            s = tl.load(s_row + offs, mask=mask, other=float("-inf")).to(tl.float32)
            g = _sparse_grad(s, offs, y, zf, max_s, log_sum_s, log_sum_1, grad_row, coef_kd, coef_ce, inv_T,
                             beta, DIVERGENCE, HAS_CE)
            tl.store(g_row + offs, g.to(grad_ptr.dtype.element_ty), mask=mask)
        tl.debug_barrier()
        for k0 in range(0, K, BLOCK_K):  # then the K columns over them
            offs = k0 + k_lanes
            mask = offs < K
            ids = tl.load(ids_row + offs, mask=mask, other=0)
            g = tl.load(scratch_row + offs, mask=mask, other=0.0)
            tl.store(g_row + ids, g.to(grad_ptr.dtype.element_ty), mask=mask)
    else:
        store_zero_grad(g_row, V, BLOCK_V)


def block_k(K: int) -> int:
    """The K loops' tile: the next power of two of K, between 16 and 512."""
    return max(16, min(triton.next_power_of_2(K), 512))


def launch_sparse_stats(s: torch.Tensor, ids: torch.Tensor, top: torch.Tensor, tail: torch.Tensor,
                        absent: torch.Tensor, labels: torch.Tensor, temperature: float, divergence: str,
                        beta: float, need_lse_untempered: bool) -> torch.Tensor:
    """Row statistics ``[N, NUM_STATS]`` fp32 (columns :data:`SPARSE_STAT_NAMES`) of the student
    ``s [N, V]`` and the sparse teacher ``ids, top [N, K]``, ``tail [N]`` (all unit stride along the last
    dimension); ``absent [N]`` the lowest token off each row's ids, ``labels [N]`` (negative = ignored)."""
    N, V = s.shape
    K = ids.shape[1]
    out = torch.empty((N, NUM_STATS), dtype=torch.float32, device=s.device)
    if N:
        n_tail = V - K  # tokens off the top-K, each holding the tail's uniform share
        log_n_tail = math.log(n_tail) if n_tail else -math.inf
        log_fill_count = math.log(max(n_tail, 1))
        scale = overflow_scale(V)
        sparse_stats_kernel[(N,)](
            # pointers
            s, ids, top, tail, absent, labels, out,
            # strides
            s.stride(0), ids.stride(0), top.stride(0), out.stride(0),
            # shapes and scalars
            V, K, float(n_tail), log_n_tail, log_fill_count, 1.0 / temperature, float(beta), scale, 1.0 / scale,
            # constants
            DIVERGENCE=DIVERGENCE_CODES[divergence], NEED_LSE_UNTEMPERED=need_lse_untempered,
            BLOCK_K=block_k(K), **launch_config(V),
        )
    return out


def launch_sparse_grad(s: torch.Tensor, ids: torch.Tensor, top: torch.Tensor, labels: torch.Tensor,
                       stats: torch.Tensor, coef: torch.Tensor, grad: torch.Tensor, temperature: float,
                       divergence: str, beta: float, has_ce: bool) -> None:
    """Write the gradient into ``grad [N, V]`` (may be ``s`` itself; unit stride along V); ``coef [N, 2]``
    fp32 holds ``(coef_kd, coef_ce)`` per row, ``stats`` is :func:`launch_sparse_stats`' output."""
    N, V = s.shape
    K = ids.shape[1]
    if grad.stride(1) != 1:
        raise ValueError("launch_sparse_grad: grad rows must be contiguous along the vocabulary")
    if not N:
        return
    scratch = torch.empty((N, K), dtype=torch.float32, device=s.device)  # the K columns' gradient, written last
    sparse_grad_kernel[(N,)](
        # pointers
        s, ids, top, labels, stats, coef, grad, scratch,
        # strides
        s.stride(0), ids.stride(0), top.stride(0), stats.stride(0), grad.stride(0), scratch.stride(0),
        # shapes and scalars
        V, K, 1.0 / temperature, float(beta),
        # constants
        DIVERGENCE=DIVERGENCE_CODES[divergence], HAS_CE=has_ce, BLOCK_K=block_k(K), **launch_config(V),
    )


__all__ = ["SPARSE_STAT_NAMES", "block_k", "launch_sparse_grad", "launch_sparse_stats", "sparse_grad_kernel",
           "sparse_stats_kernel"]
