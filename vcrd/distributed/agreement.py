"""The agreement step of the vocab-parallel losses (SPEC §11): every rank reaches every collective, or every
rank raises the same error. Nothing here can leave one rank waiting in a collective the others skipped.

A vocab-parallel call runs collectives in its forward (one ``all_gather_object`` of metadata, then one
``all_reduce`` per chunk) and, in the fused form, one ``all_reduce`` in the backward. Before the first one,
each rank builds its metadata with :func:`local_meta`, which never raises: ANY exception of this rank's
checks or of building the metadata (not only ``ValueError``/``TypeError``: a ``RuntimeError`` from a
malformed tensor, an ``IndexError``) becomes the ``error`` entry. :func:`agree_on_layout` then exchanges the
metadata (ONE ``all_gather_object``) and :func:`check_layout` raises the same ``ValueError`` on every rank
when any rank failed or the ranks disagree: on ``V``, the config (the differing fields are named with
every rank's value), the rows, the chunking, the labels, the options, the dtype, or whether the student's
hidden states need a gradient (the backward's ``all_reduce`` must run on every rank or on none).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict, List, Optional

import torch.distributed as dist

# (key, what it means): compared across ranks, in this order, after the per-rank errors
AGREED_KEYS = (
    ("V", "vocab_size (the full vocabulary)"),
    ("config", "config"),
    ("rows", "the row shape"),
    ("chunks", "the row chunks (VCRD_CHUNK_ROWS, chunk_rows or chunk_size)"),
    ("labels", "labels / step_ids / cu_seqlens"),
    ("options", "reduction / num_items_in_batch"),
    ("dtype", "the inputs' dtype"),
    ("grad", "whether student_hidden requires grad (the backward's all_reduce must run on every rank)"),
)


def describe(error: BaseException) -> str:
    """An error as one rank reports it to the others: the message of a ``ValueError``/``TypeError`` (bad
    input, already naming the argument), else ``"TypeName: message"`` (an unexpected failure)."""
    if isinstance(error, (ValueError, TypeError)):
        return str(error)
    return f"{type(error).__name__}: {error}"


def local_meta(build: Callable[[], Dict[str, Any]], error: Optional[str]) -> Dict[str, Any]:
    """This rank's metadata for :func:`agree_on_layout`, never raising: ``{"error": error}`` when this rank's
    checks already failed, else ``build()``, or ``{"error": describe(e)}`` if ``build`` raises any
    ``Exception``."""
    if error is not None:
        return {"error": error}
    try:
        return build()
    except Exception as e:  # shared with every rank below: a lone raise here would hang the others
        return {"error": describe(e)}


def config_fields(cfg) -> Optional[Dict[str, str]]:
    """A config as ``{field: repr(value)}`` (what ranks compare), so a disagreement names the field."""
    if cfg is None:
        return None
    if dataclasses.is_dataclass(cfg):
        return {f.name: repr(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    return {"repr": repr(cfg)}


def _disagreement(key: str, values: List[Any]) -> str:
    """Every rank's value of ``key``; for mappings (the config) only the fields that differ, each named."""
    if all(isinstance(v, dict) for v in values):
        fields = sorted({f for v in values for f in v if any(w.get(f) != v.get(f) for w in values)})
        return "; ".join(f"field {f!r}: " + ", ".join(f"rank {r} {v.get(f, '<absent>')}" for r, v in
                                                       enumerate(values)) for f in fields)
    return ", ".join(f"rank {r} {v!r}" for r, v in enumerate(values))


def check_layout(metas: List[Dict[str, Any]], V: int, caller: str) -> None:
    """The same checks on every rank, from every rank's metadata: raise the same ``ValueError``."""
    errors = [f"rank {r}: {m['error']}" for r, m in enumerate(metas) if m.get("error")]
    if errors:
        raise ValueError(f"{caller}: bad input on " + "; ".join(errors))
    for key, what in AGREED_KEYS:
        values = [m.get(key) for m in metas]
        if any(v != values[0] for v in values):
            raise ValueError(f"{caller}: ranks disagree on {what}: {_disagreement(key, values)}")
    spans = sorted((m["v0"], m["v1"], r) for r, m in enumerate(metas))
    at = 0
    for v0, v1, r in spans:
        if v0 != at:
            kind = "a gap" if v0 > at else "an overlap"
            layout = [(m["v0"], m["v1"]) for m in metas]
            raise ValueError(f"{caller}: the shards' columns do not tile [0, {V}): {kind} at column "
                             f"{min(v0, at)} (rank {r} starts at {v0}); per-rank [start, end) = {layout}")
        at = v1
    if at != V:
        layout = [(m["v0"], m["v1"]) for m in metas]
        raise ValueError(f"{caller}: the shards' columns do not tile [0, {V}): they end at {at}; "
                         f"per-rank [start, end) = {layout}")


def agree_on_layout(meta: Dict[str, Any], world: int, group, V: int, caller: str) -> List[Dict[str, Any]]:
    """Every rank's ``meta`` (ONE ``all_gather_object``), checked the same way on every rank: the same
    ``ValueError`` (prefixed ``caller``) on every rank if any rank's input is bad, the ranks disagree, or
    the shards' ``[v0, v1)`` do not tile ``[0, V)``; no rank is left waiting in a later collective."""
    if world > 1:
        metas: List[Dict[str, Any]] = [None] * world  # type: ignore[list-item]
        dist.all_gather_object(metas, meta, group=group)
    else:
        metas = [meta]
    check_layout(metas, V, caller)
    return metas


__all__ = ["AGREED_KEYS", "agree_on_layout", "check_layout", "config_fields", "describe", "local_meta"]
