"""Rows of a sparse (top-K) teacher (SPEC §10): what the CPU and Triton sparse paths both need of the ids."""

from __future__ import annotations

import torch


def lowest_absent(ids: torch.Tensor) -> torch.Tensor:
    """The lowest token not among each row's distinct ``ids [C, K]`` (``[C]``; K when they are 0..K-1): the
    completed teacher's argmax when its uniform tail beats every top-K entry (ties go to the lowest id)."""
    K = ids.shape[1]
    pos = torch.arange(K, device=ids.device, dtype=ids.dtype)
    return torch.where(ids.sort(-1).values != pos, pos, K).amin(-1)


__all__ = ["lowest_absent"]
