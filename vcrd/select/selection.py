"""Choosing teacher data by local naturalness (SPEC §8.5): best response per prompt, teacher ranking."""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

from .naturalness import ResponseScore


def _key(score: float) -> float:
    """NaN (nothing to score) ranks below every real score."""
    return -math.inf if math.isnan(score) else score


def select_responses(prompts: Sequence[str], scores: Sequence[ResponseScore], by: str = "lalp") -> List[int]:
    """Index of the chosen response for each distinct prompt, in order of first appearance: the
    candidate with the highest ``by`` score (``"lalp"`` or ``"galp"``); ties keep the first."""
    if by not in ("lalp", "galp"):
        raise ValueError(f"by: expected 'lalp' or 'galp', got {by!r}")
    if len(prompts) != len(scores):
        raise ValueError(f"scores: expected one per prompt ({len(prompts)}), got {len(scores)}")
    best: Dict[str, int] = {}
    for i, (prompt, score) in enumerate(zip(prompts, scores)):
        if prompt not in best or _key(getattr(score, by)) > _key(getattr(scores[best[prompt]], by)):
            best[prompt] = i
    return list(best.values())


@dataclass
class TeacherRank:
    """One teacher's standing: mean LALP and GALP over its responses, and its per-prompt win rate
    (the share of the prompts it answered where its LALP was the highest; a tie counts for all tied)."""

    teacher: str
    mean_lalp: float
    mean_galp: float
    win_rate: float
    n_responses: int


def rank_teachers(prompts: Sequence[str], teachers: Sequence[Optional[str]], scores: Sequence[ResponseScore]
                  ) -> List[TeacherRank]:
    """Teachers sorted by mean LALP, best first (SPEC §8.5)."""
    if not len(prompts) == len(teachers) == len(scores):
        raise ValueError(f"prompts, teachers, scores: expected equal lengths, got {len(prompts)}, {len(teachers)}, "
                         f"{len(scores)}")
    per_prompt: Dict[str, List[int]] = defaultdict(list)
    for i, prompt in enumerate(prompts):
        per_prompt[prompt].append(i)
    wins: Dict[str, int] = defaultdict(int)
    answered: Dict[str, int] = defaultdict(int)
    for rows in per_prompt.values():
        top = max(_key(scores[i].lalp) for i in rows)
        for teacher in {teachers[i] or "-" for i in rows}:
            answered[teacher] += 1
        for teacher in {teachers[i] or "-" for i in rows if _key(scores[i].lalp) == top}:
            wins[teacher] += 1
    by_teacher: Dict[str, List[ResponseScore]] = defaultdict(list)
    for teacher, score in zip(teachers, scores):
        by_teacher[teacher or "-"].append(score)

    def mean(values: List[float]) -> float:
        real = [v for v in values if not math.isnan(v)]
        return sum(real) / len(real) if real else math.nan

    ranks = [TeacherRank(t, mean([s.lalp for s in ss]), mean([s.galp for s in ss]), wins[t] / answered[t], len(ss))
             for t, ss in by_teacher.items()]
    return sorted(ranks, key=lambda r: _key(r.mean_lalp), reverse=True)
