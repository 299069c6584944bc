"""Label log-prob kernel: per row, ``lse = logsumexp(x/T)`` and ``log softmax(x/T)[y]``, streaming
over the vocabulary with an online log-sum-exp; no ``[N, V]`` output. Rows with a negative
label get ``lse`` and a log-prob of 0."""

from __future__ import annotations

from typing import Tuple

import torch
import triton
import triton.language as tl

from .stats import launch_config


@triton.jit
def label_logprob_kernel(
    # pointers
    x_ptr, labels_ptr, out_ptr,
    # strides (elements)
    stride_x,
    # sizes and scalars
    V, inv_T,
    # meta
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    y = tl.load(labels_ptr + row)
    x_row = x_ptr + row * stride_x
    m = tl.full([], float("-inf"), tl.float32)
    S = tl.zeros([], tl.float32)
    x_y = tl.zeros([], tl.float32)
    for start in range(0, V, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V)
        x = tl.load(x_row + offs, mask=offs < V, other=float("-inf")).to(tl.float32) * inv_T
        x_y += tl.sum(tl.where(offs == y, x, 0.0))
        m_new = tl.maximum(m, tl.max(x, 0))
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        S = tl.where(m == float("-inf"), 0.0, tl.exp(m - m_new)) * S + tl.sum(tl.exp(x - shift))
        m = m_new
    lse = m + tl.log(S)
    tl.store(out_ptr + 2 * row, lse)
    tl.store(out_ptr + 2 * row + 1, tl.where(y >= 0, x_y - lse, 0.0))


def label_logprob(x: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(lse [N], logprob [N])`` fp32 of ``x [N, V]`` (unit stride along V) at ``labels [N]``."""
    N, V = x.shape
    if x.stride(1) != 1:
        raise ValueError("label_logprob: rows must be contiguous along the vocabulary")
    if labels.shape != (N,):
        raise ValueError(f"label_logprob: expected labels of shape ({N},), got {tuple(labels.shape)}")
    out = torch.empty((N, 2), dtype=torch.float32, device=x.device)
    if N:
        label_logprob_kernel[(N,)](x, labels, out, x.stride(0), V, 1.0 / temperature, **launch_config(V))
    return out[:, 0], out[:, 1]
