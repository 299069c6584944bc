"""Gradient kernel: the second sweep, writing ``∂L/∂s`` for one row per program.

With the row's LSEs from the statistics kernel, ``log p = s/T - lse_s``, ``log q = u/T - lse_u``, each
taken as ``(x/T - max/T) - log Σe`` (the parts are kept apart: their sum rounds ``log Σe`` away when
``max/T`` is huge, which breaks ties at the maximum):

    grad = coef_kd / T · ∂D/∂(s/T) + coef_ce · (softmax(s) - onehot(y))
    fkl: p - q      rkl: p ⊙ (log p - log q - D)      jsd: (1-β) p ⊙ (log p - log m - KL(p‖m))
    (:func:`.tl_utils.divergence_grad`; rkl's dense form on halves, below)

``coef_kd = m·kd_weight·w / Z`` and ``coef_ce = m·ce_weight / Z`` carry the detached weights and
the normaliser. A divergence given by element-wise terms (jsd) needs both LSEs before its ``D``
and the row its gradient needs (``KL(p‖m)``), so for it a first loop over the row sums its terms
(:func:`.tl_utils.pointwise_terms`) and writes ``D`` and ``kl_pm`` to the statistics; with
``WRITE_GRAD=False`` only that loop runs. Ignored rows (label < 0) read nothing and get zeros.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .tl_utils import (
    COL_D,
    COL_KL_PM,
    COL_LOG_SUM_U,
    COL_MAX_U,
    DIVERGENCE_CODES,
    POINTWISE,
    RKL,
    divergence_grad,
    launch_config,
    pointwise_finish,
    pointwise_terms,
    program_row,
    row_coefficients,
    store_zero_grad,
    student_lse_parts,
)


@triton.jit
def _log_prob(x, shift, log_sum, inv_T):
    """``x/T - lse`` with ``lse = shift/T + log_sum`` kept apart (``shift`` the raw row maximum)."""
    return (x * inv_T - shift * inv_T) - log_sum


@triton.jit
def _pointwise_rows(s_row, u_row, stats, V, max_s, max_u, log_sum_s, log_sum_u, inv_T, beta,
                    DIVERGENCE: tl.constexpr, BLOCK_V: tl.constexpr):
    """The first loop of a divergence given by terms: their sums over the row (per lane, reduced once) →
    ``D`` and ``kl_pm`` written to the statistics; returns ``kl_pm``."""
    acc0 = tl.zeros([BLOCK_V], tl.float32)
    acc1 = tl.zeros([BLOCK_V], tl.float32)
    for start in range(0, V, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V)
        mask = offs < V
        logp = _log_prob(tl.load(s_row + offs, mask=mask, other=float("-inf")).to(tl.float32), max_s, log_sum_s,
                         inv_T)
        logq = _log_prob(tl.load(u_row + offs, mask=mask, other=float("-inf")).to(tl.float32), max_u, log_sum_u,
                         inv_T)
        term0, term1 = pointwise_terms(tl.exp(logp), logp, tl.exp(logq), logq, beta, DIVERGENCE)
        acc0 += term0
        acc1 += term1
    D, kl_pm = pointwise_finish(tl.sum(acc0, 0), tl.sum(acc1, 0), beta, DIVERGENCE)
    tl.store(stats + COL_D, D)
    tl.store(stats + COL_KL_PM, kl_pm)
    return kl_pm


@triton.jit
def grad_kernel(
    # pointers
    s_ptr, u_ptr, labels_ptr, stats_ptr, coef_ptr, grad_ptr,
    # strides (elements)
    stride_s, stride_u, stride_stats, stride_grad,
    # shapes and scalars
    V, inv_T, beta,
    # constants
    DIVERGENCE: tl.constexpr, HAS_CE: tl.constexpr, WRITE_GRAD: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row, y = program_row(labels_ptr)
    g_row = grad_ptr + row * stride_grad
    if y >= 0:
        s_row = s_ptr + row * stride_s
        u_row = u_ptr + row * stride_u
        stats = stats_ptr + row * stride_stats
        max_s, log_sum_s, log_sum_1 = student_lse_parts(stats)
        max_u = tl.load(stats + COL_MAX_U)
        log_sum_u = tl.load(stats + COL_LOG_SUM_U)
        coef_kd, coef_ce = row_coefficients(coef_ptr, row, inv_T)
        grad_row = tl.load(stats + COL_D)  # the row ∂D/∂(s/T) needs: D, or a divergence's own (jsd: KL(p‖m))
        if DIVERGENCE >= POINTWISE:
            grad_row = _pointwise_rows(s_row, u_row, stats, V, max_s, max_u, log_sum_s, log_sum_u, inv_T, beta,
                                       DIVERGENCE, BLOCK_V)
        if WRITE_GRAD:
            for start in range(0, V, BLOCK_V):
                offs = start + tl.arange(0, BLOCK_V)
                mask = offs < V
                s = tl.load(s_row + offs, mask=mask, other=float("-inf")).to(tl.float32)
                u = tl.load(u_row + offs, mask=mask, other=float("-inf")).to(tl.float32)
                logp = _log_prob(s, max_s, log_sum_s, inv_T)
                p = tl.exp(logp)
                if DIVERGENCE == RKL:
                    # on halves, doubled once: log p - log q can exceed fp32's range where p·(...) does not
                    half_logq = _log_prob(u * 0.5, max_u * 0.5, log_sum_u * 0.5, inv_T)
                    dD = tl.where(p > 0, p * ((logp * 0.5 - half_logq) - grad_row * 0.5) * 2.0, 0.0)
                else:
                    logq = _log_prob(u, max_u, log_sum_u, inv_T)
                    dD = divergence_grad(p, logp, tl.exp(logq), logq, grad_row, beta, DIVERGENCE)
                g = coef_kd * dD
                if HAS_CE:
                    g += coef_ce * (tl.exp(_log_prob(s, max_s, log_sum_1, 1.0)) - (offs == y).to(tl.float32))
                tl.store(g_row + offs, g.to(grad_ptr.dtype.element_ty), mask=mask)
    else:
        if WRITE_GRAD:
            store_zero_grad(g_row, V, BLOCK_V)


def launch_grad(s: torch.Tensor, u: torch.Tensor, labels: torch.Tensor, stats: torch.Tensor, coef: torch.Tensor,
                grad: torch.Tensor, temperature: float, divergence: str, beta: float, has_ce: bool) -> None:
    """Write the gradient into ``grad [N, V]`` (any float dtype, unit stride along V); ``coef [N, 2]``
    fp32 holds ``(coef_kd, coef_ce)`` per row. ``grad=None`` with a divergence given by terms (jsd) only
    fills the D and kl_pm columns of ``stats`` (the no-gradient case)."""
    N, V = s.shape
    write = grad is not None
    pointwise = DIVERGENCE_CODES[divergence] >= POINTWISE.value
    if write and grad.stride(1) != 1:
        raise ValueError("launch_grad: grad rows must be contiguous along the vocabulary")
    if not N or (not write and not pointwise):
        return
    grad_kernel[(N,)](
        # pointers (without a gradient, the statistics stand in for the unused gradient pointer)
        s, u, labels, stats, coef, grad if write else stats,
        # strides
        s.stride(0), u.stride(0), stats.stride(0), grad.stride(0) if write else 0,
        # shapes and scalars
        V, 1.0 / temperature, float(beta),
        # constants
        DIVERGENCE=DIVERGENCE_CODES[divergence], HAS_CE=has_ce, WRITE_GRAD=write, **launch_config(V),
    )


__all__ = ["grad_kernel", "launch_grad"]
