"""SPEC §6: the normaliser Z and the reduction of per-row losses, shared by every entry point."""

from __future__ import annotations

from typing import Tuple, Union

import torch

from .config import VCRDConfig


def normalizer(num_items_in_batch: Union[int, float, torch.Tensor, None], n_valid: int) -> float:
    """``Z`` for ``normalize='tokens'``: ``num_items_in_batch`` if given, else the valid rows (>= 1)."""
    if num_items_in_batch is None:
        return float(max(n_valid, 1))
    return float(num_items_in_batch)


def reduce_rows(per_row: torch.Tensor, w: torch.Tensor, reduction: str, cfg: VCRDConfig, Z: float,
                shape: torch.Size) -> Tuple[torch.Tensor, Union[float, torch.Tensor]]:
    """``(loss value, post_scale)`` from unnormalised per-row losses ``[N]`` and weights ``m·w [N]``.

    ``"none"`` → per-row values shaped ``shape``; ``"sum"`` → Σ; ``"mean"`` → Σ / Z with
    ``normalize="tokens"`` (the gradient already carries 1/Z), or Σ / Σ m·w with
    ``normalize="weights"`` (known only now, so it is returned as ``post_scale`` for the gradient).
    """
    if reduction == "none":
        return per_row.reshape(shape), 1.0
    if reduction == "sum":
        return per_row.sum(), 1.0
    if cfg.normalize == "weights":
        Zw = w.sum().clamp_min(torch.finfo(per_row.dtype).tiny)
        return per_row.sum() / Zw, 1.0 / Zw
    return per_row.sum() / Z, 1.0
