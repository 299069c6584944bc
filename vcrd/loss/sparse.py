"""Offline distillation from a sparse (top-K) teacher (SPEC §10).

The teacher is stored as its top-K: ``topk_ids [N, K]`` (decreasing probability at T=1),
``topk_logprobs [N, K]`` (``log q``, normalised over the full vocabulary) and ``tail_logprob [N]``
(``log Σ_{v∉top-K} q_v = log(1 - Σ_k q_k)``). The tail is completed uniformly: ``log q_v = tail_logprob - log(V - K)``
for every ``v`` outside the top-K (exact at K = V, the maximum-entropy completion otherwise).
Every quantity of SPEC §2–6 is then the dense formula applied to the completed teacher, whose
log-probabilities play the teacher logits (temperature applies as to logits: ``q_T ∝ q^{1/T}``).

On CPU (``impl="torch"``) the teacher costs O(K) per row (:mod:`vcrd.loss.sparse_chunks`: one sweep
of the student row, the completed teacher's terms from the K stored entries and the tail in closed
form; every divergence); on Triton the same math runs in :mod:`vcrd.kernels.sparse`
(:mod:`vcrd.backends.triton_sparse`). ``impl="reference"`` densifies the completed teacher.
Both losses run the dense losses' orchestration (:func:`vcrd.loss.functional.loss_from_batch`,
:func:`vcrd.loss.fused_linear.loss_from_hidden`) with :func:`sparse_backend` in place of the dense
backend.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import torch

from ..backends import IMPLS, resolve_impl, triton_sparse
from ..core import reference, settings
from ..core.checks import (
    RowBatch,
    RowLayout,
    check_fused_options,
    check_labels,
    check_options,
    check_rows,
    check_tensor,
    rows_view,
)
from ..core.config import VCRDConfig, resolve_config
from ..core.vllm_logprobs import topk_rows
from ..core.weights import Rows, concat_rows
from ..core.windows import CausalWindowMean
from .functional import loss_from_batch
from .fused_linear import loss_from_hidden
from .sparse_chunks import chunk_loss_and_grad

TAIL_TOLERANCE = 1e-3  # |log(Σ_k q_k + tail) | allowed: the cache stores log-probs in 16-bit floats


@dataclass
class SparseTeacher:
    """A teacher kept as its top-K per row (SPEC §10); leading shape ``[N]`` or ``[B, T]``.

    ``topk_ids [..., K]`` int, ``topk_logprobs [..., K]`` float (fp16/bf16/fp32), ``tail_logprob
    [...]`` fp32 (``-inf`` when the top-K holds all the mass). Checked on construction.
    """

    topk_ids: torch.Tensor
    topk_logprobs: torch.Tensor
    tail_logprob: torch.Tensor

    def __post_init__(self) -> None:
        check_tensor("topk_ids", self.topk_ids, "int")
        check_tensor("topk_logprobs", self.topk_logprobs, "float")
        check_tensor("tail_logprob", self.tail_logprob, "float")
        for name in ("topk_logprobs", "tail_logprob"):  # as the dense loss refuses a grad-requiring teacher
            if getattr(self, name).requires_grad:
                raise ValueError(f"{name}: the teacher must not require grad (detach it or compute it under "
                                 f"torch.no_grad()), got a tensor with requires_grad=True")
        if self.topk_ids.dim() < 2 or self.topk_logprobs.shape != self.topk_ids.shape:
            raise ValueError(f"topk_logprobs: expected the shape of topk_ids [..., K] "
                             f"{tuple(self.topk_ids.shape)}, got {tuple(self.topk_logprobs.shape)}")
        if self.tail_logprob.shape != self.topk_ids.shape[:-1]:
            raise ValueError(f"tail_logprob: expected shape {tuple(self.topk_ids.shape[:-1])}, "
                             f"got {tuple(self.tail_logprob.shape)}")
        lp = self.topk_logprobs.double()
        bad = lp.isnan() | (lp > 0)
        if bool(bad.any()):
            raise ValueError(f"topk_logprobs: expected log-probabilities (<= 0, not NaN), got "
                             f"{float(lp[bad][0])} at row {_first_row(bad.reshape(-1, self.k).any(-1))}")
        total = torch.logaddexp(torch.logsumexp(lp, -1), self.tail_logprob.double())
        off = ~(total.abs() <= TAIL_TOLERANCE)
        if bool(off.any()):
            r = _first_row(off.reshape(-1))
            raise ValueError(f"tail_logprob: the top-K mass and the tail must sum to 1 (log 0 ± {TAIL_TOLERANCE}); "
                             f"row {r} sums to exp({float(total.reshape(-1)[r]):.4g})")

    @property
    def k(self) -> int:
        return self.topk_ids.shape[-1]

    @classmethod
    def from_logits(cls, teacher_logits: torch.Tensor, k: int) -> SparseTeacher:
        """The top-``k`` of ``teacher_logits [..., V]`` at T=1, with the tail mass (fp32 log-probs)."""
        check_tensor("teacher_logits", teacher_logits, "float")
        V = teacher_logits.shape[-1]
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= V:
            raise ValueError(f"k: expected an int in [1, V={V}], got {k!r}")
        with torch.no_grad():
            logq = torch.log_softmax(teacher_logits.detach().float(), -1)
            top, ids = logq.topk(k, -1)  # sorted: decreasing probability, ids[..., 0] = argmax
            # log Σ_{v∉I} q_v summed directly, not log(1 - Σ_k q_k): exact to float precision however small
            # (a tail of 1e-9 matters at T=2, where each tail token weighs its square root); -inf at K = V
            tail = torch.logsumexp(logq.scatter(-1, ids, -math.inf), -1)
        return cls(ids, top, tail)

    @classmethod
    def from_vllm(cls, prompt_logprobs: Sequence[Optional[Mapping[Any, Any]]],
                  k: Optional[int] = None) -> SparseTeacher:
        """From a served teacher: vLLM's per-position ``{token_id: Logprob}`` dicts, one per row
        (``prompt_logprobs[1:]``); the top-``k`` kept (default: the fewest entries of any position), the
        rest of each position's mass in the tail. The rules: :mod:`vcrd.core.vllm_logprobs`."""
        return cls(*topk_rows(prompt_logprobs, k))

    def completed_logprobs(self, rows: Union[torch.Tensor, slice], V: int, dtype: torch.dtype,
                           out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The completed teacher's ``log q`` of the given flat rows, ``[C, V]`` in ``dtype`` (written into
        ``out`` when given: a buffer reused across chunks costs no fresh pages)."""
        ids, top, tail = self.flat()
        return complete(ids[rows], top[rows], tail[rows], V, dtype, out)

    def chunk_reader(self, V: int, dtype: torch.dtype) -> Callable[[torch.Tensor], torch.Tensor]:
        """``read(idx)``: the completed rows ``idx`` as ``[C, V]``, in one buffer reused from chunk to chunk
        (each result is valid until the next call)."""
        buffer: List[torch.Tensor] = []

        def read(idx: torch.Tensor) -> torch.Tensor:
            if not buffer or buffer[0].shape[0] < idx.numel():
                buffer[:] = [torch.empty((idx.numel(), V), dtype=dtype, device=self.topk_ids.device)]
            return self.completed_logprobs(idx, V, dtype, out=buffer[0][:idx.numel()])

        return read

    def flat(self) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(ids [N, K], top [N, K], tail [N])``: the rows flattened (views where possible)."""
        return (self.topk_ids.reshape(-1, self.k), self.topk_logprobs.reshape(-1, self.k),
                self.tail_logprob.reshape(-1))

    def check_against(self, V: int, lead_shape: torch.Size, device: torch.device) -> None:
        """The ids are in ``[0, V)`` and distinct within a row, ``K <= V``, and the rows match the student's."""
        if self.topk_ids.shape[:-1] != lead_shape:
            raise ValueError(f"teacher: expected rows shaped {tuple(lead_shape)} like the student's, "
                             f"got topk_ids {tuple(self.topk_ids.shape)}")
        if self.k > V:
            raise ValueError(f"teacher: K={self.k} exceeds the vocabulary V={V}")
        if self.topk_ids.device != device:
            raise ValueError(f"teacher: expected device {device} like the student's, got {self.topk_ids.device}")
        bad = (self.topk_ids < 0) | (self.topk_ids >= V)
        if bool(bad.any()):
            raise ValueError(f"topk_ids: expected ids in [0, {V}), got {int(self.topk_ids[bad][0])} "
                             f"at row {_first_row(bad.reshape(-1, self.k).any(-1))}")
        ids = self.topk_ids.reshape(-1, self.k).sort(-1).values
        repeated = (ids[:, 1:] == ids[:, :-1]).any(-1)
        if bool(repeated.any()):
            r = _first_row(repeated)
            raise ValueError(f"topk_ids: expected distinct ids in each row, row {r} repeats "
                             f"{int(ids[r, 1:][ids[r, 1:] == ids[r, :-1]][0])}")


def complete(ids: torch.Tensor, top: torch.Tensor, tail: torch.Tensor, V: int, dtype: torch.dtype,
             out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The completed teacher's ``log q [C, V]`` in ``dtype`` from ``ids, top [C, K]``, ``tail [C]``: the top-K
    log-probs at their ids, the tail mass spread uniformly elsewhere (written into ``out`` when given)."""
    fill = tail.to(dtype) - math.log(max(V - ids.shape[-1], 1))  # -inf when the top-K holds all the mass
    out = torch.empty((ids.shape[0], V), dtype=dtype, device=ids.device) if out is None else out
    return out.copy_(fill[:, None].expand(ids.shape[0], V)).scatter_(1, ids.long(), top.to(dtype))


def _first_row(flat_rows: torch.Tensor) -> int:
    """The first flat row where a ``[N]`` bool mask holds."""
    return int(flat_rows.nonzero()[0, 0])


@dataclass
class _SparseRowBatch(RowBatch):
    """A :class:`RowBatch` whose teacher is the top-K of its flat rows: ``ids, top [n, K]``, ``tail [n]``
    (``u`` is unused). :meth:`chunks` densifies the completed teacher one chunk at a time (for the dense
    backends: the densified baseline of benches/bench_sparse.py); :func:`sparse_backend` reads the top-K."""

    ids: Optional[torch.Tensor] = None
    top: Optional[torch.Tensor] = None
    tail: Optional[torch.Tensor] = None

    def chunks(self, rows: int) -> Iterator[Tuple[int, int, torch.Tensor, torch.Tensor]]:
        dtype = torch.promote_types(self.s.dtype, torch.float32)
        for r0, r1, s, _ in super().chunks(rows):
            yield r0, r1, s, complete(self.ids[r0:r1], self.top[r0:r1], self.tail[r0:r1], self.vocab, dtype)


def sparse_backend(impl: str, batch: _SparseRowBatch, cfg: VCRDConfig, grad_out: Optional[torch.Tensor],
                   grad_scale: float, window: Optional[CausalWindowMean] = None) -> Rows:
    """:func:`vcrd.backends.run_backend` for a sparse teacher, O(K) teacher work per row: on CPU (``"torch"``)
    :func:`vcrd.loss.sparse_chunks.chunk_loss_and_grad` (chunks in row order), on Triton
    :func:`vcrd.backends.triton_sparse.loss_and_grad`. Same rows and gradient contract."""
    if impl == "triton":
        return triton_sparse.loss_and_grad(batch, cfg, grad_out, grad_scale, window=window)
    if impl != "torch":
        raise ValueError(f"impl: expected 'torch' or 'triton' for a backend, got {impl!r}")
    window = window if window is not None else CausalWindowMean(batch.starts, 2)
    compile, in_place, parts = settings.compile_enabled(), grad_out is batch.s, []
    for r0, r1, s, _ in RowBatch.chunks(batch, settings.chunk_rows()):
        target = s if in_place else (None if grad_out is None else grad_out[r0:r1])  # one view when in place
        parts.append(chunk_loss_and_grad(s, batch.ids[r0:r1], batch.top[r0:r1], batch.tail[r0:r1],
                                         batch.labels[r0:r1], batch.valid[r0:r1], cfg, window, target, grad_scale,
                                         compile))
    return concat_rows(parts, torch.promote_types(batch.s.dtype, torch.float32), batch.s.device)


def sparse_vcrd_loss(
    student_logits: torch.Tensor,
    teacher: SparseTeacher,
    labels: Optional[torch.Tensor] = None,
    *,
    step_ids: Optional[torch.Tensor] = None,
    cu_seqlens: Optional[torch.Tensor] = None,
    config: Union[VCRDConfig, str, None] = None,
    num_items_in_batch: Optional[Union[int, torch.Tensor]] = None,
    reduction: str = "mean",
    impl: str = "auto",
    return_stats: bool = False,
):
    """:func:`vcrd.vcrd_loss` with the teacher given as a :class:`SparseTeacher` (SPEC §10).

    ``student_logits [N, V]`` or ``[B, T, V]``; the teacher's rows match the student's. Every other
    argument as in :func:`vcrd.vcrd_loss`. ``impl="reference"`` densifies the whole completed teacher
    and runs the reference (tests, small inputs).
    """
    cfg = resolve_config(config)
    check_options(reduction, impl, num_items_in_batch, cfg, IMPLS)
    check_tensor("student_logits", student_logits, "float")
    if student_logits.dim() not in (2, 3):
        raise ValueError(f"student_logits: expected shape [N, V] or [B, T, V], got {tuple(student_logits.shape)}")
    if not isinstance(teacher, SparseTeacher):
        raise TypeError(f"teacher: expected a vcrd.SparseTeacher, got {type(teacher).__name__}")
    V, lead, device = student_logits.shape[-1], student_logits.shape[:-1], student_logits.device
    teacher.check_against(V, lead, device)
    layout = check_rows(check_labels(labels, lead, device, cfg), lead, device, step_ids, cu_seqlens, cfg, V)
    if impl == "reference":
        dtype = torch.promote_types(student_logits.dtype, torch.float32)
        dense = teacher.completed_logprobs(slice(None), V, dtype).reshape(*lead, V)
        return reference.vcrd_loss(student_logits, dense, labels, step_ids=step_ids, cu_seqlens=cu_seqlens,
                                   config=cfg, num_items_in_batch=num_items_in_batch, reduction=reduction,
                                   return_stats=return_stats)
    impl = resolve_impl(impl, student_logits)
    s = rows_view(student_logits, V)
    s = s if s is not None else student_logits
    batch = _SparseRowBatch(s, s, layout, *teacher.flat())
    return loss_from_batch(student_logits, batch, cfg, impl, reduction, num_items_in_batch, return_stats,
                           backend=sparse_backend)


def fused_linear_sparse_vcrd_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher: SparseTeacher,
    labels: Optional[torch.Tensor] = None,
    *,
    student_bias: Optional[torch.Tensor] = None,
    step_ids: Optional[torch.Tensor] = None,
    cu_seqlens: Optional[torch.Tensor] = None,
    config: Union[VCRDConfig, str, None] = None,
    num_items_in_batch: Optional[Union[int, torch.Tensor]] = None,
    reduction: str = "mean",
    chunk_size: Union[int, str] = "auto",
    impl: str = "auto",
    return_stats: bool = False,
):
    """:func:`vcrd.fused_linear_vcrd_loss` with a :class:`SparseTeacher`: three GEMMs (student logits,
    grad of hidden, grad of weight), no teacher forward or GEMM. ``student_hidden [N, H]`` or
    ``[B, T, H]``, ``student_weight [V, H]``; the teacher's rows match the hidden states' rows."""
    cfg = resolve_config(config)
    check_fused_options(reduction, chunk_size)
    check_options(reduction, impl, num_items_in_batch, cfg, IMPLS)
    for name, x, dims in (("student_hidden", student_hidden, (2, 3)), ("student_weight", student_weight, (2,))):
        check_tensor(name, x, "float")
        if x.dim() not in dims:
            raise ValueError(f"{name}: expected {' or '.join(map(str, dims))} dimensions, got {tuple(x.shape)}")
    if student_weight.shape[1] != student_hidden.shape[-1]:
        raise ValueError(f"student_weight: expected shape [V, {student_hidden.shape[-1]}], "
                         f"got {tuple(student_weight.shape)}")
    if not isinstance(teacher, SparseTeacher):
        raise TypeError(f"teacher: expected a vcrd.SparseTeacher, got {type(teacher).__name__}")
    V, lead, device = student_weight.shape[0], student_hidden.shape[:-1], student_hidden.device
    teacher.check_against(V, lead, device)
    layout = check_rows(check_labels(labels, lead, device, cfg), lead, device, step_ids, cu_seqlens, cfg, V)
    if impl == "reference":
        s = student_hidden.double() @ student_weight.double().T
        if student_bias is not None:
            s = s + student_bias.double()
        return sparse_vcrd_loss(s, teacher, labels, step_ids=step_ids, cu_seqlens=cu_seqlens, config=cfg,
                                num_items_in_batch=num_items_in_batch, reduction=reduction, impl="reference",
                                return_stats=return_stats)
    ids, top, tail = teacher.flat()

    def chunk_batch(idx: torch.Tensor, s: torch.Tensor, rows: RowLayout) -> _SparseRowBatch:
        return _SparseRowBatch(s, s, rows, ids[idx], top[idx], tail[idx])

    return loss_from_hidden(student_hidden, student_weight, student_bias, chunk_batch, V, layout, cfg, impl, reduction,
                            num_items_in_batch, chunk_size, return_stats, backend=sparse_backend)
