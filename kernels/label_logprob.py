"""Label log-prob kernel: per row, ``lse = logsumexp(x/T)`` and ``log softmax(x/T)[y]``, streaming
over the vocabulary with per-lane online log-sum-exp accumulators (combined once after the loop;
``x[y]`` is loaded by pointer); no ``[N, V]`` output. Rows with a negative label get ``lse`` and a
log-prob of 0."""

from __future__ import annotations

from typing import Tuple

import torch
import triton
import triton.language as tl

from .tl_utils import LOWEST_LOGIT, launch_config, online_lane_update, program_row


@triton.jit
def label_logprob_kernel(
    # pointers
    x_ptr, labels_ptr, out_ptr,
    # strides (elements)
    stride_x,
    # shapes and scalars
    V, inv_T,
    # constants
    BLOCK_V: tl.constexpr,
):
    row, y = program_row(labels_ptr)
    x_row = x_ptr + row * stride_x
    x_y = tl.load(x_row + y, mask=(y >= 0) & (y < V), other=0.0).to(tl.float32) * inv_T
    lanes = tl.arange(0, BLOCK_V)
    lane_max = tl.full([BLOCK_V], 0.0, tl.float32) + LOWEST_LOGIT  # raw units
    lane_sum = tl.zeros([BLOCK_V], tl.float32)  # Σ exp((x - lane_max) / T)
    for start in range(0, V, BLOCK_V):
        offs = start + lanes
        x = tl.load(x_row + offs, mask=offs < V, other=float("-inf")).to(tl.float32)
        lane_max, _, _, _, rescale, weight = online_lane_update(x, lane_max, inv_T, 1.0, 1.0)  # no sums of differences
        lane_sum = rescale * lane_sum + weight
    row_max = tl.max(lane_max, 0)
    lse = row_max * inv_T + tl.log(tl.sum(tl.exp((lane_max - row_max) * inv_T) * lane_sum, 0))
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
