"""SPEC §6: the normaliser and the reduction of per-row losses, shared by every entry point."""

from __future__ import annotations

from typing import Tuple, Union

import torch

from .checks import RowLayout
from .config import VCRDConfig

Count = Union[int, float, torch.Tensor, None]
MIN_MEAN_WEIGHT = 1e-6  # Σ m·w is clamped to >= 1e-6 · Σ m (SPEC §6)


def token_normalizer(num_items_in_batch: Count, n_valid: Union[int, torch.Tensor]) -> Union[float, torch.Tensor]:
    """``Z`` for ``normalize="tokens"``: ``num_items_in_batch`` if given, else the valid rows (>= 1).

    A batch without valid rows has loss 0 whatever the count (Z = 1 then); a count of 0 for a batch
    that has valid rows is an error. ``n_valid`` a 0-dim tensor (inputs not checked): the same, as a
    0-dim float tensor, with no check and no host sync."""
    if isinstance(n_valid, torch.Tensor):
        count = n_valid if num_items_in_batch is None else torch.as_tensor(num_items_in_batch, device=n_valid.device)
        return torch.where(n_valid == 0, 1.0, count.to(torch.float32))
    if n_valid == 0:
        return 1.0
    if num_items_in_batch is None:
        return float(n_valid)
    Z = float(num_items_in_batch)
    if Z <= 0:
        raise ValueError(f"num_items_in_batch: expected a number > 0 for a batch with {n_valid} valid rows, "
                         f"got {Z:g}")
    return Z


def reduce_rows(per_row: torch.Tensor, w: torch.Tensor, reduction: str, cfg: VCRDConfig, Z: float,
                shape: torch.Size, n_valid: int,
                num_items_in_batch: Count = None) -> Tuple[torch.Tensor, Union[float, torch.Tensor]]:
    """``(loss value, post_scale)`` from unnormalised per-row losses ``[N]`` and weights ``m·w [N]``.

    ``"none"`` → per-row values shaped ``shape``; ``"sum"`` → Σ; ``"batchmean"`` → Σ / Z (TRL's
    count: see :func:`row_normalizer`); ``"mean"`` → Σ / Z with ``normalize="tokens"`` (the gradient
    already carries 1/Z), or Σ / Z_w with ``normalize="weights"``, ``Z_w = max(Σ m·w, 1e-6·Σ m)``,
    times ``M / Σ m`` when ``num_items_in_batch = M`` is given (known only now, so ``1/Z_w`` is
    returned as ``post_scale`` for the gradient). The sum is taken in float64 (a mean of rows near
    fp32's maximum is finite), the value returned in ``per_row``'s dtype.
    """
    if reduction == "none":
        return per_row.reshape(shape), 1.0
    # summed in float64: rows near fp32's maximum do not overflow before the division
    total = per_row.double().sum()
    if reduction == "sum":
        return total.to(per_row.dtype), 1.0
    if reduction == "mean" and cfg.normalize == "weights":
        if isinstance(n_valid, torch.Tensor):  # unchecked inputs: the same, without a host sync
            Zw = w.sum().clamp_min(MIN_MEAN_WEIGHT * n_valid.clamp_min(1))
            if num_items_in_batch is not None:
                Zw = Zw * (token_normalizer(num_items_in_batch, n_valid) / n_valid.clamp_min(1))
        else:
            Zw = w.sum().clamp_min(MIN_MEAN_WEIGHT * max(n_valid, 1))
            if num_items_in_batch is not None and n_valid:
                Zw = Zw * (token_normalizer(num_items_in_batch, n_valid) / n_valid)
        return (total / Zw).to(per_row.dtype), 1.0 / Zw
    return (total / Z).to(per_row.dtype), 1.0


def row_normalizer(reduction: str, cfg: VCRDConfig, num_items_in_batch: Count,
                   rows: RowLayout) -> Union[float, torch.Tensor]:
    """The part of Z known before the sweep (folded into the gradient as it is written); checks the
    count either way, so a bad one is refused before any work.

    ``"mean"`` with ``normalize="tokens"``: the token count (``num_items_in_batch``, else the valid
    rows). ``"batchmean"`` (TRL's ``generalized_jsd_loss``): ``num_items_in_batch`` if given, else the
    valid rows with labels, or the batch size (the leading dimension) without; ignores ``normalize``.
    Otherwise 1.
    """
    Z = token_normalizer(num_items_in_batch, rows.n_valid)
    if reduction == "batchmean" and num_items_in_batch is None and not rows.has_labels:
        return float(max(rows.shape[0] if len(rows.shape) else 1, 1))
    return Z if reduction == "batchmean" or (reduction == "mean" and cfg.normalize == "tokens") else 1.0
