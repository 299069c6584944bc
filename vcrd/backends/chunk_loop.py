"""The one chunk loop every backend runs: statistics → weights → row loss → NaN rule → gradient.

A backend is only its pair (:class:`ChunkPair`): ``stats(chunk)`` sweeps a chunk of rows for the
statistics of SPEC §2, ``grad(chunk, rows, out)`` writes the chunk's rows of ``∂L/∂s``. Between them
the loop runs the ``[C]``-sized work every backend shares, in row order: the weights of SPEC §4–5
through the causal window (:func:`vcrd.core.weights.weigh_rows`; the window is causal, so a chunk's
weights are final once its own rows are in), the hard-label CE term, the unnormalised row loss and
the NaN rule of SPEC §6. The chunk is still in cache when its gradient is written.

Each model's logit post-processing (SPEC §1, :mod:`vcrd.core.logit_transform`) is applied here, for
every pair: with options other than the defaults the pair sees each chunk's processed logits, and its
gradient is chained to the raw student logits before it is written.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Protocol, Union

import torch

from ..core.checks import RowBatch
from ..core.config import VCRDConfig
from ..core.logit_transform import chunk_transform
from ..core.sparse_teacher import SparseRowBatch
from ..core.weights import Rows, concat_rows, poison_gradient, row_loss, weigh_rows
from ..core.windows import CausalWindowMean


@dataclass
class Chunk:
    """Rows ``[r0, r1)`` of a batch: ``s, u [C, V]`` detached views of the student's and teacher's logits
    (``u`` unused for a sparse teacher), safe ``labels [C]`` (ignored rows: an in-range label), ``valid [C]``;
    ``batch`` for a pair that reads more of the batch's rows (a sparse teacher's top-K). A pair whose
    sweeps need rows contiguous along the vocabulary (the kernels) may replace ``s``/``u`` by such copies
    in ``stats``; a gradient written over the logits has unit stride already, so it keeps the same view."""

    r0: int
    r1: int
    s: torch.Tensor
    u: torch.Tensor
    labels: torch.Tensor
    valid: torch.Tensor
    batch: RowBatch


class ChunkPair(Protocol):
    """A backend: the two sweeps over one chunk's logits.

    ``stats(chunk)`` returns ``[C]`` rows: ``lp_s, lp_u, lq_as, lq_au, H_u, CE_su, D, agree`` (SPEC §2),
    ``log_ratio`` when the backend computes it (:func:`vcrd.core.weights.label_log_ratio`), the row its
    gradient needs, and for the CE term ``max_s``, ``log_sum_untempered``, ``s_y`` (the student's raw row
    maximum, ``log Σ exp(s - max_s)`` and its label logit). ``grad(chunk, rows, out)`` writes
    ``coef_kd/T · ∂D/∂(s/T) + coef_ce · (softmax(s) - onehot(y))`` into ``out [C, V]`` (``out`` may be
    ``chunk.s`` itself, or None for no gradient; a pair may complete ``D`` here: Triton's JSD).
    ``chunk_rows`` is the rows per chunk it wants.
    """

    chunk_rows: int

    def stats(self, chunk: Chunk) -> Rows: ...

    def grad(self, chunk: Chunk, rows: Rows, out: Optional[torch.Tensor]) -> None: ...


def label_cross_entropy(rows: Rows) -> torch.Tensor:
    """``CE = -log softmax(s)[y] = (max s - s[y]) + log Σ exp(s - max s)`` ``[C]`` (untempered): inf only
    where the true value is beyond fp32's range."""
    log_sum = rows["log_sum_untempered"]
    return (rows["max_s"].to(log_sum.dtype) - rows["s_y"].to(log_sum.dtype)) + log_sum


def run_chunks(pair: ChunkPair, batch: RowBatch, cfg: VCRDConfig, grad_out: Optional[torch.Tensor],
               grad_scale: float, window: Optional[CausalWindowMean] = None,
               dtype: Optional[torch.dtype] = None) -> Rows:
    """Rows of SPEC §2–6 for a checked batch, writing ``grad_scale · ∂(Σ_r loss_r)/∂s`` into ``grad_out``.

    ``grad_out`` is ``[N, V]`` (a view of the student gradient), ``batch.s`` itself (the gradient written
    over the logits: each chunk's rows are read before they are overwritten) or None. ``window`` carries
    the causal window from earlier rows (the fused-linear loss walks token chunks); by default a new one
    over ``batch.starts``. Returns ``[N]`` rows (:data:`vcrd.core.weights.OUTPUT_ROWS`): ``per_row``
    (unnormalised ``m·[kd·w·D + ce·CE]``), ``w`` (``m·w``) and the statistics of SPEC §7, in ``dtype``
    (default: the logits' dtype promoted to fp32).
    """
    in_place = grad_out is batch.s
    window = window if window is not None else CausalWindowMean(batch.starts, 2)
    # SPEC §1 logit post-processing: None with the defaults (the loop below is then exactly as without it)
    transform = chunk_transform(cfg, sparse=isinstance(batch, SparseRowBatch))
    parts = []
    for r0, r1, s, u in batch.chunks(pair.chunk_rows):
        # detached views: the student logits may require grad
        chunk = Chunk(r0, r1, s.detach(), u.detach(), batch.labels[r0:r1], batch.valid[r0:r1], batch)
        raw_s = chunk.s
        if transform is not None:  # the pair sweeps the processed logits, in chunk-sized buffers
            if not transform.student.is_identity:
                chunk.s = transform.student.apply(raw_s)
            if not transform.teacher.is_identity:  # never for a sparse teacher (its u is the student's rows)
                chunk.u = transform.teacher.apply(chunk.u)
        rows = pair.stats(chunk)
        ce: Union[torch.Tensor, float] = label_cross_entropy(rows) if cfg.ce_weight > 0 else 0.0
        weigh_rows(rows, chunk.valid, window, cfg, grad_scale)
        rows["per_row"] = row_loss(rows, ce, chunk.valid, cfg)
        poison_gradient(rows, chunk.valid)  # SPEC §6: never a finite gradient beside a non-finite loss
        # written over the logits: the one chunk view as both input and output, never two views of one buffer
        out = None if grad_out is None else chunk.s if in_place else grad_out[r0:r1]
        if out is None or transform is None or transform.student.is_identity:
            pair.grad(chunk, rows, out)
        else:  # ∂L/∂s' over the processed buffer, then times ∂s'/∂s read from the raw rows before out is written
            out = raw_s if in_place else out
            pair.grad(chunk, rows, chunk.s)
            out.copy_(transform.student.chain_(chunk.s, raw_s))
        rows["per_row"] = row_loss(rows, ce, chunk.valid, cfg)  # D may have been completed by grad
        parts.append(rows)
    dtype = dtype if dtype is not None else torch.promote_types(batch.s.dtype, torch.float32)
    return concat_rows(parts, dtype, batch.s.device)


__all__ = ["Chunk", "ChunkPair", "label_cross_entropy", "run_chunks"]
