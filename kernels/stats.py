"""Statistics kernel: one program per row, one streaming read of student and teacher logits.

Per row, with x = s/T and z = u/T, online over ``BLOCK_V`` tiles (every sum kept relative to the
running maxima and rescaled when a maximum grows, as in flash-attention's online softmax):

    lse_s, lse_u, lp_s = x[y] - lse_s, lp_u = z[y] - lse_u,
    a_s = argmax s, a_u = argmax u (lowest index on ties), lq_as = z[a_s] - lse_u, lq_au = z[a_u] - lse_u,
    H_u = -Σ q log q, CE_su = -Σ p log q, D (fkl or rkl; jsd's needs both LSEs: see grad.py),
    lse1 = logsumexp(s) (untempered, for the CE term) when NEED_LSE1.

Sums are of ``e·(z' - x')`` with ``x' = x - max x``, ``z' = z - max z``: small when the models agree,
so no large terms cancel. Ignored rows (label < 0) read no logits and get zeros.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# columns of the [N, NUM_STATS] fp32 output, in the order the kernels store them (out + 0 ... out + 10)
STAT_NAMES = ("lse_s", "lse_u", "lp_s", "lp_u", "lq_as", "lq_au", "H_u", "CE_su", "D", "agree", "lse1")
NUM_STATS = len(STAT_NAMES)
FKL, RKL, JSD = 0, 1, 2
DIVERGENCE_CODES = {"fkl": FKL, "rkl": RKL, "jsd": JSD}


@triton.jit
def _safe(m):
    """A running maximum usable as a shift: -inf (nothing seen yet) becomes 0."""
    return tl.where(m == float("-inf"), 0.0, m)


@triton.jit
def stats_kernel(
    # pointers
    s_ptr, u_ptr, labels_ptr, out_ptr,
    # strides (elements)
    stride_s, stride_u, stride_out,
    # sizes and scalars
    V, inv_T,
    # meta
    DIVERGENCE: tl.constexpr, NEED_LSE1: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    y = tl.load(labels_ptr + row)
    out = out_ptr + row * stride_out
    if y >= 0:
        s_row = s_ptr + row * stride_s
        u_row = u_ptr + row * stride_u
        neg_inf = float("-inf")
        ms = tl.full([], neg_inf, tl.float32)  # running max of s (raw)
        mu = tl.full([], neg_inf, tl.float32)
        a_s = tl.zeros([], tl.int32)
        a_u = tl.zeros([], tl.int32)
        u_at_as = tl.zeros([], tl.float32)  # raw u at the running argmax of s
        S_s = tl.zeros([], tl.float32)  # Σ exp(x - max x)
        S_u = tl.zeros([], tl.float32)
        B_u = tl.zeros([], tl.float32)  # Σ e_u z'
        C_s = tl.zeros([], tl.float32)  # Σ e_s z'
        F = tl.zeros([], tl.float32)  # Σ e_u (z' - x') for fkl, Σ e_s (x' - z') for rkl
        S_1 = tl.zeros([], tl.float32)  # Σ exp(s - max s), untempered
        s_y = tl.zeros([], tl.float32)
        u_y = tl.zeros([], tl.float32)
        for start in range(0, V, BLOCK_V):
            offs = start + tl.arange(0, BLOCK_V)
            mask = offs < V
            s = tl.load(s_row + offs, mask=mask, other=neg_inf).to(tl.float32)
            u = tl.load(u_row + offs, mask=mask, other=neg_inf).to(tl.float32)
            s_y += tl.sum(tl.where(offs == y, s, 0.0))
            u_y += tl.sum(tl.where(offs == y, u, 0.0))
            # argmaxes: a later tile wins only with a strictly larger maximum (ties stay left)
            tile_ms, tile_as = tl.max(s, 0, return_indices=True, return_indices_tie_break_left=True)
            tile_mu, tile_au = tl.max(u, 0, return_indices=True, return_indices_tie_break_left=True)
            tile_as = tile_as + start
            new_s = tile_ms > ms
            u_at_as = tl.where(new_s, tl.sum(tl.where(offs == tile_as, u, 0.0)), u_at_as)
            a_s = tl.where(new_s, tile_as, a_s)
            a_u = tl.where(tile_mu > mu, tile_au + start, a_u)
            ms_new = tl.maximum(ms, tile_ms)
            mu_new = tl.maximum(mu, tile_mu)
            # rescale the running sums to the new maxima: sums of e·w become alpha·(sum - δ·S)
            ds = (_safe(ms_new) - _safe(ms)) * inv_T
            du = (_safe(mu_new) - _safe(mu)) * inv_T
            alpha_s = tl.exp((ms - ms_new) * inv_T)
            alpha_u = tl.exp((mu - mu_new) * inv_T)
            alpha_s = tl.where(ms == float("-inf"), 0.0, alpha_s)
            alpha_u = tl.where(mu == float("-inf"), 0.0, alpha_u)
            xs = (s - _safe(ms_new)) * inv_T  # x', <= 0 (-inf at masked entries)
            zs = (u - _safe(mu_new)) * inv_T
            e_s = tl.exp(xs)
            e_u = tl.exp(zs)
            B_u = alpha_u * (B_u - du * S_u) + tl.sum(tl.where(e_u > 0, e_u * zs, 0.0))
            C_s = alpha_s * (C_s - du * S_s) + tl.sum(tl.where(e_s > 0, e_s * zs, 0.0))
            if DIVERGENCE == 0:
                F = alpha_u * (F - (du - ds) * S_u) + tl.sum(tl.where(e_u > 0, e_u * (zs - xs), 0.0))
            if DIVERGENCE == 1:
                F = alpha_s * (F - (ds - du) * S_s) + tl.sum(tl.where(e_s > 0, e_s * (xs - zs), 0.0))
            if NEED_LSE1:
                S_1 = tl.where(ms == float("-inf"), 0.0, tl.exp(ms - ms_new)) * S_1 + \
                    tl.sum(tl.exp(s - _safe(ms_new)))
            S_s = alpha_s * S_s + tl.sum(e_s)
            S_u = alpha_u * S_u + tl.sum(e_u)
            ms = ms_new
            mu = mu_new
        log_Ss = tl.log(S_s)
        log_Su = tl.log(S_u)
        lse_s = ms * inv_T + log_Ss
        lse_u = mu * inv_T + log_Su
        tl.store(out + 0, lse_s)
        tl.store(out + 1, lse_u)
        tl.store(out + 2, s_y * inv_T - lse_s)
        tl.store(out + 3, u_y * inv_T - lse_u)
        tl.store(out + 4, u_at_as * inv_T - lse_u)
        tl.store(out + 5, mu * inv_T - lse_u)
        tl.store(out + 6, log_Su - B_u / S_u)
        tl.store(out + 7, log_Su - C_s / S_s)
        if DIVERGENCE == 0:
            tl.store(out + 8, F / S_u + log_Ss - log_Su)
        if DIVERGENCE == 1:
            tl.store(out + 8, F / S_s + log_Su - log_Ss)
        if DIVERGENCE == 2:
            tl.store(out + 8, 0.0)  # written by the gradient kernel's first loop
        tl.store(out + 9, (a_s == a_u).to(tl.float32))
        if NEED_LSE1:
            tl.store(out + 10, ms + tl.log(S_1))
        else:
            tl.store(out + 10, lse_s)
    else:
        cols = tl.arange(0, 16)
        tl.store(out + cols, tl.zeros([16], tl.float32), mask=cols < 11)


def launch_config(V: int) -> dict:
    """``BLOCK_V`` (next power of two of V, at most 4096) and ``num_warps`` (8 for full tiles: 16
    elements per thread per tensor keeps every kernel spill-free on sm_80/sm_90, see ``vcrd aot``)."""
    block = min(triton.next_power_of_2(V), 4096)
    return {"BLOCK_V": block, "num_warps": 8 if block >= 2048 else 4}


def launch_stats(s: torch.Tensor, u: torch.Tensor, labels: torch.Tensor, temperature: float, divergence: str,
                 need_lse1: bool, out: torch.Tensor = None) -> torch.Tensor:
    """Row statistics ``[N, NUM_STATS]`` fp32 of ``s, u [N, V]`` (unit stride along V), ``labels [N]``
    (negative = ignored row). ``out`` may be passed (e.g. NaN-poisoned by tests)."""
    N, V = s.shape
    if s.stride(1) != 1 or u.stride(1) != 1:
        raise ValueError("launch_stats: logits rows must be contiguous along the vocabulary")
    if out is None:
        out = torch.empty((N, NUM_STATS), dtype=torch.float32, device=s.device)
    if N:
        stats_kernel[(N,)](
            s, u, labels, out,
            s.stride(0), u.stride(0), out.stride(0),
            V, 1.0 / temperature,
            DIVERGENCE=DIVERGENCE_CODES[divergence], NEED_LSE1=need_lse1, **launch_config(V),
        )
    return out
