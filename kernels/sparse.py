"""Sparse (top-K) teacher kernels (SPEC §10): O(K) teacher work plus one sweep of the student row.

The math of :mod:`vcrd.loss.sparse_chunks` (its docstring derives it), one program per row. The
completed teacher has ``fill = tail - log(V - K)`` on the ``V - K`` tokens off the top-K; at
temperature T, ``lse_u = log(Σ_k e^{top_k/T} + (V-K) e^{fill/T})``, ``zq = top/T - lse_u``,
``zf = fill/T - lse_u``, ``qk = e^zq``, ``qf = e^zf`` (0 at K = V), tail mass ``Q = (V-K) qf``.

Statistics kernel (columns :data:`SPARSE_STAT_NAMES`): a K loop for the teacher's LSE and argmax
``a_u`` (an id, or ``absent``, the lowest token off the top-K, given by the launcher), one sweep of
the student row (max, argmax, ``Σe``; fkl ``Σ_v x'``, rkl ``Σ_v e x'`` with ``x' = (x - max)/T``), for
jsd a second sweep (``Σ_v p (lp - log m_off)``, ``Σ_v log m_off`` with ``m_off = β qf + (1-β) p``: it
needs the student's LSE), then a K loop gathering the student at the ids (``lp_k``, ``p_k``) for every
K-sum and jsd's corrections at the ids. Per-lane accumulators, one reduction after each loop (as
in :mod:`.stats`; its overflow scale ``c`` too).

Gradient kernel, ``∂D/∂(s/T)``: fkl ``p - qf`` off the top-K, ``p_k - qk`` at the ids; rkl
``p (log p - zf - D)`` and ``p_k (lp_k - zq - D)``; jsd ``(1-β) p (log p - log m - KL(p‖m))`` with
``m = β qf + (1-β) p`` off the top-K and ``β qk + (1-β) p_k`` at the ids; the CE term as in :mod:`.grad`. The K columns
are computed first into ``scratch [N, K]`` (reading the logits before the sweep may write over
them), the sweep writes every column, then the K columns are copied over it.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from vcrd.core.overflow import overflow_scale

from .stats import (  # the divergence codes of the dense kernels (the DIVERGENCE constexpr)
    DIVERGENCE_CODES,
    FKL,
    JSD,
    LOWEST_LOGIT,
    RKL,
    lane_argmax,
    launch_config,
    online_lane_update,
    weighted_or_zero,
)

SPARSE_STAT_NAMES = ("lse_s", "lp_s", "lp_u", "lq_as", "lq_au", "H_u", "CE_su", "D", "agree", "lse_untempered",
                     "max_s", "log_sum_s", "log_sum_untempered", "lse_u", "zf", "qf", "kl_pm")
NUM_SPARSE_STATS = len(SPARSE_STAT_NAMES)
S_LSE_S = tl.constexpr(SPARSE_STAT_NAMES.index("lse_s"))
S_LP_S = tl.constexpr(SPARSE_STAT_NAMES.index("lp_s"))
S_LP_U = tl.constexpr(SPARSE_STAT_NAMES.index("lp_u"))
S_LQ_AS = tl.constexpr(SPARSE_STAT_NAMES.index("lq_as"))
S_LQ_AU = tl.constexpr(SPARSE_STAT_NAMES.index("lq_au"))
S_H_U = tl.constexpr(SPARSE_STAT_NAMES.index("H_u"))
S_CE_SU = tl.constexpr(SPARSE_STAT_NAMES.index("CE_su"))
S_D = tl.constexpr(SPARSE_STAT_NAMES.index("D"))
S_AGREE = tl.constexpr(SPARSE_STAT_NAMES.index("agree"))
S_LSE_UNTEMPERED = tl.constexpr(SPARSE_STAT_NAMES.index("lse_untempered"))
S_MAX_S = tl.constexpr(SPARSE_STAT_NAMES.index("max_s"))
S_LOG_SUM_S = tl.constexpr(SPARSE_STAT_NAMES.index("log_sum_s"))
S_LOG_SUM_UNTEMPERED = tl.constexpr(SPARSE_STAT_NAMES.index("log_sum_untempered"))
S_LSE_U = tl.constexpr(SPARSE_STAT_NAMES.index("lse_u"))
S_ZF = tl.constexpr(SPARSE_STAT_NAMES.index("zf"))
S_QF = tl.constexpr(SPARSE_STAT_NAMES.index("qf"))
S_KL_PM = tl.constexpr(SPARSE_STAT_NAMES.index("kl_pm"))
NUM_SPARSE_STATS_C = tl.constexpr(NUM_SPARSE_STATS)
NUM_SPARSE_STATS_POW2 = tl.constexpr(triton.next_power_of_2(NUM_SPARSE_STATS))

TINY = tl.constexpr(1.1754943508222875e-38)  # the smallest normal fp32: log m is clamped there (as on CPU)


@triton.jit
def _log_mixture(p, q, beta):
    """``log m``, ``m = β q + (1-β) p``, clamped at the smallest normal float."""
    return tl.log(tl.maximum(beta * q + (1.0 - beta) * p, TINY))


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
def sparse_stats_kernel(
    s_ptr, ids_ptr, top_ptr, tail_ptr, absent_ptr, labels_ptr, out_ptr,
    stride_s, stride_ids, stride_top, stride_out,
    V, K, n_tail, log_n_tail, log_fill_count, inv_T, beta, scale, inv_scale,
    DIVERGENCE: tl.constexpr, NEED_LSE_UNTEMPERED: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    y = tl.load(labels_ptr + row)
    out = out_ptr + row * stride_out
    if y >= 0:
        s_row = s_ptr + row * stride_s
        ids_row = ids_ptr + row * stride_ids
        top_row = top_ptr + row * stride_top
        k_lanes = tl.arange(0, BLOCK_K)
        # the teacher: LSE of the K tempered log-probs, their maximum and its lowest id
        max_t = tl.full([BLOCK_K], float("-inf"), tl.float32)
        arg_t = tl.full([BLOCK_K], 2147483647, tl.int32)
        sum_t = tl.zeros([BLOCK_K], tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs = k0 + k_lanes
            mask = offs < K
            top = tl.load(top_row + offs, mask=mask, other=float("-inf")).to(tl.float32)
            ids = tl.load(ids_row + offs, mask=mask, other=2147483647).to(tl.int32)
            arg_t = tl.where(top > max_t, ids, tl.where((top == max_t) & mask, tl.minimum(arg_t, ids), arg_t))
            new_max = tl.maximum(max_t, top)
            ref = tl.where(new_max == float("-inf"), 0.0, new_max)  # finite: no -inf - -inf
            sum_t = sum_t * tl.exp((max_t - ref) * inv_T) + tl.exp((top - ref) * inv_T)
            max_t = new_max
        top_max = tl.max(max_t, 0)
        top_arg = tl.min(tl.where(max_t == top_max, arg_t, 2147483647), 0)
        lse_top = top_max * inv_T + tl.log(tl.sum(tl.where(max_t > float("-inf"),
                                                            sum_t * tl.exp((max_t - top_max) * inv_T), 0.0), 0))
        fill = tl.load(tail_ptr + row).to(tl.float32) - log_fill_count
        f = fill * inv_T
        tail_lse = f + log_n_tail  # -inf at K = V
        big = tl.maximum(lse_top, tail_lse)
        lse_u = big + tl.log(tl.exp(lse_top - big) + tl.exp(tail_lse - big))
        zf = f - lse_u
        has_tail = n_tail > 0
        qf = tl.where(has_tail, tl.exp(zf), 0.0)
        Q = qf * n_tail
        best = tl.where(has_tail, tl.maximum(top_max, fill), top_max)
        a_u = tl.minimum(tl.where(top_max == best, top_arg, V),
                         tl.where(has_tail & (fill == best), tl.load(absent_ptr + row).to(tl.int32), V))

        # one sweep of the student row
        lanes = tl.arange(0, BLOCK_V)
        max_s = tl.full([BLOCK_V], 0.0, tl.float32) + LOWEST_LOGIT
        arg_s = tl.zeros([BLOCK_V], tl.int32)
        sum_s = tl.zeros([BLOCK_V], tl.float32)
        count = tl.zeros([BLOCK_V], tl.float32)  # valid elements seen by the lane
        x_acc = tl.zeros([BLOCK_V], tl.float32)  # fkl: c·Σ x'
        px_acc = tl.zeros([BLOCK_V], tl.float32)  # rkl: c·Σ e x'
        sum_s_untempered = tl.zeros([BLOCK_V], tl.float32)
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
            if NEED_LSE_UNTEMPERED:
                _, _, _, _, rescale_1, e_1 = online_lane_update(s, max_s, 1.0, 1.0, 1.0)
                sum_s_untempered = rescale_1 * sum_s_untempered + e_1
            sum_s = rescale_s * sum_s + e_s
            max_s = new_max_s
        row_max_s = tl.max(max_s, 0)
        a_s = lane_argmax(max_s, arg_s, row_max_s)
        lane_shift_s = (row_max_s * scale - max_s * scale) * inv_T
        lane_scale_s = tl.exp(-lane_shift_s * inv_scale)
        total_s = tl.sum(lane_scale_s * sum_s, 0)
        log_sum_s = tl.log(total_s)
        klp_acc = tl.zeros([BLOCK_V], tl.float32)  # jsd: Σ_v p (lp - log m_off), m_off = β qf + (1-β) p
        lm_acc = tl.zeros([BLOCK_V], tl.float32)  # jsd: Σ_v log m_off
        if DIVERGENCE == JSD:  # a second sweep: log m needs p, so the student's LSE first
            for start in range(0, V, BLOCK_V):
                offs = start + lanes
                mask = offs < V
                s = tl.load(s_row + offs, mask=mask, other=float("-inf")).to(tl.float32)
                lp = (s * inv_T - row_max_s * inv_T) - log_sum_s
                p = tl.exp(lp)
                lm = _log_mixture(p, qf, beta)
                klp_acc += weighted_or_zero(p, lp - lm)
                lm_acc += tl.where(mask, lm, 0.0)

        # the K entries: the student at the ids, and every K-sum
        sum_pk = tl.zeros([BLOCK_K], tl.float32)
        sum_lpk = tl.zeros([BLOCK_K], tl.float32)
        h_acc = tl.zeros([BLOCK_K], tl.float32)  # Σ qk zq
        ce_acc = tl.zeros([BLOCK_K], tl.float32)  # Σ pk zq
        kl_acc = tl.zeros([BLOCK_K], tl.float32)  # fkl: Σ qk (zq - lp_k); jsd: Σ qk (zq - log m_k)
        klp_k_acc = tl.zeros([BLOCK_K], tl.float32)  # jsd: Σ pk (lp_k - log m_k) - Σ pk (lp_k - log m_off_k)
        lm_k_acc = tl.zeros([BLOCK_K], tl.float32)  # jsd: Σ log m_off_k
        found_y = tl.zeros([BLOCK_K], tl.int32)
        hit_y = tl.zeros([BLOCK_K], tl.float32)
        found_as = tl.zeros([BLOCK_K], tl.int32)
        hit_as = tl.zeros([BLOCK_K], tl.float32)
        found_au = tl.zeros([BLOCK_K], tl.int32)
        hit_au = tl.zeros([BLOCK_K], tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs = k0 + k_lanes
            mask = offs < K
            ids = tl.load(ids_row + offs, mask=mask, other=-1)
            zq = tl.load(top_row + offs, mask=mask, other=float("-inf")).to(tl.float32) * inv_T - lse_u
            qk = tl.exp(zq)
            x = tl.load(s_row + ids, mask=mask, other=float("-inf")).to(tl.float32)
            lpk = (x * inv_T - row_max_s * inv_T) - log_sum_s
            pk = tl.exp(lpk)
            sum_pk += pk
            h_acc += weighted_or_zero(qk, zq)
            ce_acc += weighted_or_zero(pk, zq)
            if DIVERGENCE == FKL:
                sum_lpk += tl.where(mask, lpk, 0.0)
                kl_acc += weighted_or_zero(qk, zq - lpk)
            if DIVERGENCE == JSD:
                lm_k = _log_mixture(pk, qk, beta)
                lm_off_k = _log_mixture(pk, qf, beta)
                kl_acc += weighted_or_zero(qk, zq - lm_k)
                klp_k_acc += weighted_or_zero(pk, lpk - lm_k) - weighted_or_zero(pk, lpk - lm_off_k)
                lm_k_acc += tl.where(mask, lm_off_k, 0.0)
            found_y, hit_y = _lookup(ids, y, zq, found_y, hit_y)
            found_as, hit_as = _lookup(ids, a_s, zq, found_as, hit_as)
            found_au, hit_au = _lookup(ids, a_u, zq, found_au, hit_au)
        P = tl.where(has_tail, tl.maximum(1.0 - tl.sum(sum_pk, 0), 0.0), 0.0)  # the student's mass off the top-K
        H_u = -(tl.sum(h_acc, 0) + tl.where(Q > 0, Q * zf, 0.0))
        CE_su = -(tl.sum(ce_acc, 0) + tl.where(P > 0, P * zf, 0.0))
        if DIVERGENCE == FKL:
            lane_x = x_acc - count * lane_shift_s
            sum_lp = tl.sum(lane_x, 0) * inv_scale - V * log_sum_s  # Σ_v lp_v
            off_top_lp = sum_lp - tl.sum(sum_lpk, 0)
            D = tl.sum(kl_acc, 0) + tl.where(Q > 0, Q * zf - qf * off_top_lp, 0.0)
        kl_pm = tl.zeros([], tl.float32)
        if DIVERGENCE == RKL:
            sum_px = tl.sum(lane_scale_s * (px_acc - lane_shift_s * sum_s), 0) / total_s * inv_scale
            D = sum_px - log_sum_s + CE_su
        if DIVERGENCE == JSD:
            kl_pm = tl.sum(klp_acc, 0) + tl.sum(klp_k_acc, 0)
            off_top_lm = tl.sum(lm_acc, 0) - tl.sum(lm_k_acc, 0)  # Σ_{v∉I} log m_v
            kl_qm = tl.sum(kl_acc, 0) + tl.where(Q > 0, Q * zf - qf * off_top_lm, 0.0)
            D = beta * kl_qm + (1.0 - beta) * kl_pm
        s_y = tl.load(s_row + y, mask=y < V, other=0.0).to(tl.float32)
        lse_s = row_max_s * inv_T + log_sum_s
        tl.store(out + S_LSE_S, lse_s)
        tl.store(out + S_LP_S, (s_y * inv_T - row_max_s * inv_T) - log_sum_s)
        tl.store(out + S_LP_U, _looked_up(found_y, hit_y, zf))
        tl.store(out + S_LQ_AS, _looked_up(found_as, hit_as, zf))
        tl.store(out + S_LQ_AU, _looked_up(found_au, hit_au, zf))
        tl.store(out + S_H_U, H_u)
        tl.store(out + S_CE_SU, CE_su)
        tl.store(out + S_D, D)
        tl.store(out + S_AGREE, (a_s == a_u).to(tl.float32))
        tl.store(out + S_MAX_S, row_max_s)
        tl.store(out + S_LOG_SUM_S, log_sum_s)
        tl.store(out + S_LSE_U, lse_u)
        tl.store(out + S_ZF, zf)
        tl.store(out + S_QF, qf)
        tl.store(out + S_KL_PM, kl_pm)
        if NEED_LSE_UNTEMPERED:
            log_total_1 = tl.log(tl.sum(tl.exp(max_s - row_max_s) * sum_s_untempered, 0))
            tl.store(out + S_LSE_UNTEMPERED, row_max_s + log_total_1)
            tl.store(out + S_LOG_SUM_UNTEMPERED, log_total_1)
        else:
            tl.store(out + S_LSE_UNTEMPERED, lse_s)
            tl.store(out + S_LOG_SUM_UNTEMPERED, log_sum_s)
    else:
        cols = tl.arange(0, NUM_SPARSE_STATS_POW2)
        tl.store(out + cols, tl.zeros([NUM_SPARSE_STATS_POW2], tl.float32), mask=cols < NUM_SPARSE_STATS_C)


@triton.jit
def _sparse_grad(s, offs, y, zteacher, max_s, log_sum_s, log_sum_1, D, coef_kd, coef_ce, inv_T, beta,
                 DIVERGENCE: tl.constexpr, HAS_CE: tl.constexpr):
    """The gradient at columns ``offs`` with student logits ``s`` and tempered teacher log-probs
    ``zteacher``; ``D`` is the divergence (rkl) or KL(p‖m) (jsd)."""
    logp = (s * inv_T - max_s * inv_T) - log_sum_s
    p = tl.exp(logp)
    if DIVERGENCE == FKL:
        dD = p - tl.exp(zteacher)
    if DIVERGENCE == RKL:
        dD = weighted_or_zero(p, logp - zteacher - D)
    if DIVERGENCE == JSD:
        dD = (1.0 - beta) * weighted_or_zero(p, logp - _log_mixture(p, tl.exp(zteacher), beta) - D)
    g = coef_kd * dD
    if HAS_CE:
        g += coef_ce * (tl.exp((s - max_s) - log_sum_1) - (offs == y).to(tl.float32))
    return g


@triton.jit
def sparse_grad_kernel(
    s_ptr, ids_ptr, top_ptr, labels_ptr, stats_ptr, coef_ptr, grad_ptr, scratch_ptr,
    stride_s, stride_ids, stride_top, stride_stats, stride_grad, stride_scratch,
    V, K, inv_T, beta,
    DIVERGENCE: tl.constexpr, HAS_CE: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    y = tl.load(labels_ptr + row)
    g_row = grad_ptr + row * stride_grad
    if y >= 0:
        s_row = s_ptr + row * stride_s
        ids_row = ids_ptr + row * stride_ids
        top_row = top_ptr + row * stride_top
        scratch_row = scratch_ptr + row * stride_scratch
        stats = stats_ptr + row * stride_stats
        max_s = tl.load(stats + S_MAX_S)
        log_sum_s = tl.load(stats + S_LOG_SUM_S)
        log_sum_1 = tl.load(stats + S_LOG_SUM_UNTEMPERED)
        lse_u = tl.load(stats + S_LSE_U)
        zf = tl.load(stats + S_ZF)
        if DIVERGENCE == JSD:
            D = tl.load(stats + S_KL_PM)  # the gradient needs KL(p‖m)
        else:
            D = tl.load(stats + S_D)
        coef_kd = tl.load(coef_ptr + 2 * row) * inv_T
        coef_ce = tl.load(coef_ptr + 2 * row + 1)
        k_lanes = tl.arange(0, BLOCK_K)
        for k0 in range(0, K, BLOCK_K):  # the K columns, from the logits before anything is written
            offs = k0 + k_lanes
            mask = offs < K
            ids = tl.load(ids_row + offs, mask=mask, other=0)
            zq = tl.load(top_row + offs, mask=mask, other=float("-inf")).to(tl.float32) * inv_T - lse_u
            x = tl.load(s_row + ids, mask=mask, other=float("-inf")).to(tl.float32)
            g = _sparse_grad(x, ids, y, zq, max_s, log_sum_s, log_sum_1, D, coef_kd, coef_ce, inv_T,
                             beta, DIVERGENCE, HAS_CE)
            tl.store(scratch_row + offs, g, mask=mask)
        tl.debug_barrier()
        lanes = tl.arange(0, BLOCK_V)
        for start in range(0, V, BLOCK_V):  # every column as if off the top-K
            offs = start + lanes
            mask = offs < V
            s = tl.load(s_row + offs, mask=mask, other=float("-inf")).to(tl.float32)
            g = _sparse_grad(s, offs, y, zf, max_s, log_sum_s, log_sum_1, D, coef_kd, coef_ce, inv_T,
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
        for start in range(0, V, BLOCK_V):
            offs = start + tl.arange(0, BLOCK_V)
            tl.store(g_row + offs, tl.zeros([BLOCK_V], grad_ptr.dtype.element_ty), mask=offs < V)


def block_k(K: int) -> int:
    """The K loops' tile: the next power of two of K, between 16 and 512."""
    return max(16, min(triton.next_power_of_2(K), 512))


def launch_sparse_stats(s: torch.Tensor, ids: torch.Tensor, top: torch.Tensor, tail: torch.Tensor,
                        absent: torch.Tensor, labels: torch.Tensor, temperature: float, divergence: str,
                        beta: float, need_lse_untempered: bool) -> torch.Tensor:
    """Row statistics ``[N, NUM_SPARSE_STATS]`` fp32 (columns :data:`SPARSE_STAT_NAMES`) of the student
    ``s [N, V]`` and the sparse teacher ``ids, top [N, K]``, ``tail [N]`` (all unit stride along the last
    dimension); ``absent [N]`` the lowest token off each row's ids, ``labels [N]`` (negative = ignored)."""
    N, V = s.shape
    K = ids.shape[1]
    out = torch.empty((N, NUM_SPARSE_STATS), dtype=torch.float32, device=s.device)
    if N:
        n_tail = V - K
        scale = overflow_scale(V)
        sparse_stats_kernel[(N,)](
            s, ids, top, tail, absent, labels, out,
            s.stride(0), ids.stride(0), top.stride(0), out.stride(0),
            V, K, float(n_tail), math.log(n_tail) if n_tail else -math.inf, math.log(max(n_tail, 1)),
            1.0 / temperature, float(beta), scale, 1.0 / scale,
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
    scratch = torch.empty((N, K), dtype=torch.float32, device=s.device)
    sparse_grad_kernel[(N,)](
        s, ids, top, labels, stats, coef, grad, scratch,
        s.stride(0), ids.stride(0), top.stride(0), stats.stride(0), grad.stride(0), scratch.stride(0),
        V, K, 1.0 / temperature, float(beta),
        DIVERGENCE=DIVERGENCE_CODES[divergence], HAS_CE=has_ce, BLOCK_K=block_k(K), **launch_config(V),
    )
