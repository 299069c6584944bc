"""Gradient kernel: the second sweep, writing ``∂L/∂s`` for one row per program.

With the row's LSEs from the statistics kernel, ``log p = s/T - lse_s``, ``log q = u/T - lse_u``, each
taken as ``(x/T - max/T) - log Σe`` (the parts are kept apart: their sum rounds ``log Σe`` away when
``max/T`` is huge, which breaks ties at the maximum):

    grad = coef_kd / T · ∂D/∂(s/T) + coef_ce · (softmax(s) - onehot(y))
    fkl: p - q      rkl: p ⊙ (log p - log q - D)      jsd: (1-β) p ⊙ (log p - log m - KL(p‖m))

``coef_kd = m·kd_weight·w / Z`` and ``coef_ce = m·ce_weight / Z`` carry the detached weights and
the normaliser. JSD needs ``KL(p‖m)`` before any gradient element, so for ``jsd`` a first loop
over the row computes ``D = β KL(q‖m) + (1-β) KL(p‖m)`` (written to the stats' ``D`` column); with
``WRITE_GRAD=False`` only that loop runs. Ignored rows (label < 0) read nothing and get zeros.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .stats import (
    COL_D,
    COL_LOG_SUM_S,
    COL_LOG_SUM_U,
    COL_LOG_SUM_UNTEMPERED,
    COL_MAX_S,
    COL_MAX_U,
    DIVERGENCE_CODES,
    FKL,
    JSD,
    RKL,
    launch_config,
)


@triton.jit
def _log_prob(x, shift, log_sum, inv_T):
    """``x/T - lse`` with ``lse = shift/T + log_sum`` kept apart (``shift`` the raw row maximum)."""
    return (x * inv_T - shift * inv_T) - log_sum


@triton.jit
def _jsd_terms(s, u, max_s, max_u, log_sum_s, log_sum_u, inv_T, beta):
    """log p, log q, log m and the KL(q‖m), KL(p‖m) summands of one tile (0·log 0 = 0)."""
    logp = _log_prob(s, max_s, log_sum_s, inv_T)
    logq = _log_prob(u, max_u, log_sum_u, inv_T)
    p = tl.exp(logp)
    q = tl.exp(logq)
    logm = tl.log(beta * q + (1.0 - beta) * p)
    kl_q = tl.where(q > 0, q * (logq - logm), 0.0)
    kl_p = tl.where(p > 0, p * (logp - logm), 0.0)
    return logp, logm, p, kl_q, kl_p


@triton.jit
def grad_kernel(
    # pointers
    s_ptr, u_ptr, labels_ptr, stats_ptr, coef_ptr, grad_ptr,
    # strides (elements)
    stride_s, stride_u, stride_stats, stride_grad,
    # sizes and scalars
    V, inv_T, beta,
    # meta
    DIVERGENCE: tl.constexpr, HAS_CE: tl.constexpr, WRITE_GRAD: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    y = tl.load(labels_ptr + row)
    g_row = grad_ptr + row * stride_grad
    if y >= 0:
        s_row = s_ptr + row * stride_s
        u_row = u_ptr + row * stride_u
        stats = stats_ptr + row * stride_stats
        max_s = tl.load(stats + COL_MAX_S)
        max_u = tl.load(stats + COL_MAX_U)
        log_sum_s = tl.load(stats + COL_LOG_SUM_S)
        log_sum_u = tl.load(stats + COL_LOG_SUM_U)
        log_sum_1 = tl.load(stats + COL_LOG_SUM_UNTEMPERED)
        coef_kd = tl.load(coef_ptr + 2 * row) * inv_T
        coef_ce = tl.load(coef_ptr + 2 * row + 1)
        D = tl.load(stats + COL_D)
        kl_pm = tl.zeros([], tl.float32)
        if DIVERGENCE == JSD:
            # per-lane sums, reduced once after the loop (no block-wide reduction per tile)
            kl_qm_acc = tl.zeros([BLOCK_V], tl.float32)
            kl_pm_acc = tl.zeros([BLOCK_V], tl.float32)
            for start in range(0, V, BLOCK_V):
                offs = start + tl.arange(0, BLOCK_V)
                mask = offs < V
                s = tl.load(s_row + offs, mask=mask, other=float("-inf")).to(tl.float32)
                u = tl.load(u_row + offs, mask=mask, other=float("-inf")).to(tl.float32)
                logp, logm, p, kl_q, kl_p = _jsd_terms(s, u, max_s, max_u, log_sum_s, log_sum_u, inv_T, beta)
                kl_qm_acc += kl_q
                kl_pm_acc += kl_p
            kl_pm = tl.sum(kl_pm_acc, 0)
            D = beta * tl.sum(kl_qm_acc, 0) + (1.0 - beta) * kl_pm
            tl.store(stats + COL_D, D)
        if WRITE_GRAD:
            for start in range(0, V, BLOCK_V):
                offs = start + tl.arange(0, BLOCK_V)
                mask = offs < V
                s = tl.load(s_row + offs, mask=mask, other=float("-inf")).to(tl.float32)
                u = tl.load(u_row + offs, mask=mask, other=float("-inf")).to(tl.float32)
                if DIVERGENCE == FKL:
                    dD = tl.exp(_log_prob(s, max_s, log_sum_s, inv_T)) - tl.exp(_log_prob(u, max_u, log_sum_u, inv_T))
                if DIVERGENCE == RKL:
                    logp = _log_prob(s, max_s, log_sum_s, inv_T)
                    p = tl.exp(logp)
                    # on halves, doubled once: log p - log q can exceed fp32's range where p·(...) does not
                    half_logq = _log_prob(u * 0.5, max_u * 0.5, log_sum_u * 0.5, inv_T)
                    dD = tl.where(p > 0, p * ((logp * 0.5 - half_logq) - D * 0.5) * 2.0, 0.0)
                if DIVERGENCE == JSD:
                    logp, logm, p, kl_q, kl_p = _jsd_terms(s, u, max_s, max_u, log_sum_s, log_sum_u, inv_T, beta)
                    dD = (1.0 - beta) * tl.where(p > 0, p * (logp - logm - kl_pm), 0.0)
                g = coef_kd * dD
                if HAS_CE:
                    g += coef_ce * (tl.exp(_log_prob(s, max_s, log_sum_1, 1.0)) - (offs == y).to(tl.float32))
                tl.store(g_row + offs, g.to(grad_ptr.dtype.element_ty), mask=mask)
    else:
        if WRITE_GRAD:
            for start in range(0, V, BLOCK_V):
                offs = start + tl.arange(0, BLOCK_V)
                tl.store(g_row + offs, tl.zeros([BLOCK_V], grad_ptr.dtype.element_ty), mask=offs < V)


def launch_grad(s: torch.Tensor, u: torch.Tensor, labels: torch.Tensor, stats: torch.Tensor, coef: torch.Tensor,
                grad: torch.Tensor, temperature: float, divergence: str, beta: float, has_ce: bool) -> None:
    """Write the gradient into ``grad [N, V]`` (any float dtype, unit stride along V); ``coef [N, 2]``
    fp32 holds ``(coef_kd, coef_ce)`` per row. ``grad=None`` with ``divergence="jsd"`` only fills
    the D column of ``stats`` (the no-gradient case)."""
    N, V = s.shape
    write = grad is not None
    if write and grad.stride(1) != 1:
        raise ValueError("launch_grad: grad rows must be contiguous along the vocabulary")
    if not N or (not write and divergence != "jsd"):
        return
    grad_kernel[(N,)](
        s, u, labels, stats, coef, grad if write else stats,
        s.stride(0), u.stride(0), stats.stride(0), grad.stride(0) if write else 0,
        V, 1.0 / temperature, float(beta),
        DIVERGENCE=DIVERGENCE_CODES[divergence], HAS_CE=has_ce, WRITE_GRAD=write, **launch_config(V),
    )
