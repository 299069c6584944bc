"""The keyword options every VCRD loss shares, defined once: their types and meaning (the ``TypedDict``s
the losses' ``**options: Unpack[...]`` name, PEP 692), their defaults and their checks
(:func:`resolve_options`).

``CommonOptions`` ⊂ ``ReferenceOptions`` ⊂ ``LossOptions``: the vocab-parallel losses take
``CommonOptions`` (their ``vocab_size`` is required, their ``impl`` narrower: both explicit keywords),
the float64 reference ``ReferenceOptions`` (it has no ``impl``), every other loss ``LossOptions``.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any, Mapping, Optional, Sequence, TypedDict, Union

import torch

from .checks import RowLayout, check_labels, check_options, check_rows
from .config import VCRDConfig, resolve_config


class CommonOptions(TypedDict, total=False):
    """The options of every loss (all optional).

    Keys:
        step_ids: reasoning-step index per token, non-decreasing within a sequence, shaped like ``labels``
            (without it every token is its own step).
        cu_seqlens: ``[S+1]`` packed sequence boundaries for ``[N, V]`` inputs.
        config: a :class:`VCRDConfig` or a preset name (``"kd"``, ``"discord"``, ``"vcrd"``, default).
        num_items_in_batch: the number of valid rows in the whole accumulated (and data-parallel) batch,
            for gradient accumulation (``reduction="mean"``; SPEC §6 for ``normalize="weights"``).
        reduction: ``"mean"`` (default), ``"sum"``, ``"none"`` (per-row, shaped like ``labels``) or
            ``"batchmean"`` (TRL's: the sum divided by the valid tokens with labels, by the leading
            dimension without).
        return_stats: also return a :class:`VCRDStats` of detached per-row statistics (default False).
    """

    step_ids: Optional[torch.Tensor]
    cu_seqlens: Optional[torch.Tensor]
    config: Union[VCRDConfig, str, None]
    num_items_in_batch: Optional[Union[int, float, torch.Tensor]]
    reduction: str
    return_stats: bool


class ReferenceOptions(CommonOptions, total=False):
    """:class:`CommonOptions` and ``vocab_size``: compare columns ``0..V-1`` when the two vocabularies
    differ (default: the student's width)."""

    vocab_size: Optional[int]


class LossOptions(ReferenceOptions, total=False):
    """:class:`ReferenceOptions` and ``impl``: ``"auto"`` (default: Triton for CUDA tensors, and for CPU
    tensors under ``TRITON_INTERPRET=1``, else ``"torch"``), ``"triton"``, ``"torch"`` or ``"reference"``
    (the float64 formulas of SPEC.md)."""

    impl: str


@dataclass(frozen=True)
class ResolvedOptions:
    """One call's options with their defaults filled in and ``config`` resolved to a :class:`VCRDConfig`."""

    config: VCRDConfig
    step_ids: Optional[torch.Tensor] = None
    cu_seqlens: Optional[torch.Tensor] = None
    num_items_in_batch: Optional[Union[int, float, torch.Tensor]] = None
    vocab_size: Optional[int] = None
    reduction: str = "mean"
    impl: str = "auto"
    return_stats: bool = False

    def layout(self, labels: Optional[torch.Tensor], lead_shape: torch.Size, device: torch.device, V: int,
               check_values: bool = True) -> RowLayout:
        """``labels`` (shaped ``lead_shape``, on ``device``, values in ``[0, V)``), ``step_ids`` and
        ``cu_seqlens`` checked (:func:`vcrd.core.checks.check_rows`); the rows' layout."""
        return check_rows(check_labels(labels, lead_shape, device, self.config), lead_shape, device, self.step_ids,
                          self.cu_seqlens, self.config, V, check_values)

    def keywords(self, accepted: type = LossOptions, **changes: Any) -> dict:
        """These options as keywords for a loss taking ``accepted`` (another loss this one hands the call
        to, e.g. the reference), with ``changes`` applied."""
        changed = replace(self, **changes)
        return {f.name: getattr(changed, f.name) for f in fields(changed) if f.name in accepted.__annotations__}


def check_keywords(caller: str, options: Mapping[str, Any], accepted: type = LossOptions) -> None:
    """A keyword ``accepted`` does not name raises ``TypeError`` as Python does for a function without it."""
    for name in options:
        if name not in accepted.__annotations__:
            raise TypeError(f"{caller}() got an unexpected keyword argument '{name}'")


def parse_options(caller: str, options: Mapping[str, Any], accepted: type = LossOptions,
                  **explicit: Any) -> ResolvedOptions:
    """``options`` (the keywords a caller passed, from those of ``accepted``: :func:`check_keywords`) and the
    values the caller takes as its own keywords (``explicit``) as :class:`ResolvedOptions`."""
    check_keywords(caller, options, accepted)
    values = {**options, **explicit}
    return ResolvedOptions(resolve_config(values.pop("config", None)), **values)


def resolve_options(caller: str, options: Mapping[str, Any], impls: Sequence[str], accepted: type = LossOptions,
                    check_values: bool = True, **explicit: Any) -> ResolvedOptions:
    """:func:`parse_options`, then the options checked (:func:`vcrd.core.checks.check_options`: the
    reduction, ``impl`` among ``impls``, ``num_items_in_batch``; a tensor count's value only with
    ``check_values``, reading it waits for the device)."""
    opts = parse_options(caller, options, accepted, **explicit)
    check_options(opts.reduction, opts.impl, opts.num_items_in_batch, opts.config, impls, check_values)
    return opts
