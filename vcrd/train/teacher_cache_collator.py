"""The cached teacher in training batches: :class:`TeacherCacheCollator` adds a :class:`TeacherCache`'s rows to
:class:`DistillCollator`'s batches, aligned with the shifted labels (SPEC §10; docs/offline.md)."""

from __future__ import annotations

import math
from typing import Any, Dict, Sequence, Tuple

import torch

from ..loss.sparse import SparseTeacher
from .data import DistillCollator, Example
from .teacher_cache import TeacherCache


def filler(k: int, vocab: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A valid, finite teacher row for positions without a loss (prompt, padding, the last position):
    the uniform distribution (ids ``0..K-1`` at ``-log V``, the tail ``log(1 - K/V)``, ``-inf`` at K = V).
    Every completed log-prob is finite, so no NaN can arise on those rows (their weight is zero)."""
    ids = torch.arange(k, dtype=torch.int32)
    lp = torch.full((k,), -math.log(vocab), dtype=torch.float16)
    tail = torch.tensor(math.log1p(-k / vocab) if k < vocab else -math.inf, dtype=torch.float32)
    return ids, lp, tail


class IndexedExamples:
    """``examples`` as a dataset of ``(index, example)`` pairs, for :class:`TeacherCacheCollator`."""

    def __init__(self, examples: Sequence[Example]) -> None:
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> Tuple[int, Example]:
        return i, self.examples[i]


class TeacherCacheCollator:
    """:class:`DistillCollator`'s batch plus the cached teacher, aligned with the shifted labels.

    Items are ``(dataset index, Example)`` pairs (:class:`IndexedExamples`). Adds
    ``teacher_topk_ids [B, T, K]`` (int32), ``teacher_topk_logprobs [B, T, K]`` (float16) and
    ``teacher_tail_logprob [B, T]`` (float32): position ``t`` holds the teacher's view of the token
    ``t + 1`` (so ``teacher_*[:, :-1]`` pairs with ``labels[:, 1:]`` and the student's ``h[:, :-1]``);
    positions without a loss hold :func:`filler`. Each example's token ids are checked against the
    cache's hash (``CacheError`` naming the example) before its rows are used.
    """

    def __init__(self, collator: DistillCollator, cache: TeacherCache) -> None:
        if not isinstance(collator, DistillCollator):
            raise TypeError(f"collator: expected a DistillCollator, got {type(collator).__name__}")
        self.collator, self.cache = collator, cache

    def __call__(self, items) -> Dict[str, Any]:
        pairs = [item if isinstance(item, tuple) else (item["index"], item["example"]) for item in items]
        examples = [e for _, e in pairs]
        batch = self.collator(examples)
        B, T = batch["input_ids"].shape
        K = self.cache.k
        ids, lp, tail = filler(K, self.cache.vocab)
        out_ids = ids.expand(B, T, K).clone()
        out_lp = lp.expand(B, T, K).clone()
        out_tail = tail.expand(B, T).clone()
        for b, (index, example) in enumerate(pairs):
            full_ids, full_labels, _ = self.collator.encode(example)
            self.cache.check_example(int(index), full_ids, full_labels, getattr(example, "where", None))
            pos = (batch["labels"][b, 1:] != -100).nonzero().squeeze(1)
            teacher = self.cache.rows_for(int(index))
            out_ids[b, pos] = teacher.topk_ids
            out_lp[b, pos] = teacher.topk_logprobs
            out_tail[b, pos] = teacher.tail_logprob
        batch.update(teacher_topk_ids=out_ids, teacher_topk_logprobs=out_lp, teacher_tail_logprob=out_tail)
        return batch


def sparse_teacher_of(batch: Dict[str, torch.Tensor]) -> SparseTeacher:
    """The cached teacher of a collated batch for the shifted rows (``[B, T - 1, K]``)."""
    return SparseTeacher(batch["teacher_topk_ids"][:, :-1], batch["teacher_topk_logprobs"][:, :-1],
                         batch["teacher_tail_logprob"][:, :-1])


__all__ = ["IndexedExamples", "TeacherCacheCollator", "filler", "sparse_teacher_of"]
