"""A teacher kept as its top-K per row (SPEC §10), and the row batch that carries it to the backends.

The tail is completed uniformly: ``log q_v = tail_logprob - log(V - K)`` for every ``v`` outside the
top-K (exact at K = V, the maximum-entropy completion otherwise). Shared by the CPU and Triton sparse
backends and the public sparse losses (:mod:`vcrd.loss.sparse`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, List, Mapping, Optional, Sequence, Tuple, Union

import torch

from .checks import RowBatch, check_tensor
from .vllm_logprobs import topk_rows

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
class SparseRowBatch(RowBatch):
    """A :class:`RowBatch` whose teacher is the top-K of its flat rows: ``ids, top [n, K]``, ``tail [n]``
    (``u`` is unused: the backends of teacher kind ``"sparse"`` read the top-K, never a densified row)."""

    ids: Optional[torch.Tensor] = None
    top: Optional[torch.Tensor] = None
    tail: Optional[torch.Tensor] = None



def lowest_absent(ids: torch.Tensor) -> torch.Tensor:
    """The lowest token not among each row's distinct ``ids [C, K]`` (``[C]``; K when they are 0..K-1): the
    completed teacher's argmax when its uniform tail beats every top-K entry (ties go to the lowest id)."""
    K = ids.shape[1]
    pos = torch.arange(K, device=ids.device, dtype=ids.dtype)
    return torch.where(ids.sort(-1).values != pos, pos, K).amin(-1)



__all__ = ["SparseRowBatch", "SparseTeacher", "TAIL_TOLERANCE", "complete", "lowest_absent"]
