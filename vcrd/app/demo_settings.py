"""The demo's settings (:class:`DemoSettings`, ``vcrd demo``'s options) and what a run prepares once for every
student (:class:`Prepared`: the teacher, its traces and their scores, the initial student)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Tuple

from ..select.naturalness import ResponseScore
from .synthetic import Problem

PRESET_NAMES = ("kd", "discord", "vcrd")


@dataclass
class DemoSettings:
    """The demo's sizes, steps and seeds (``vcrd demo``'s options; :mod:`vcrd.app.quality` reuses them)."""

    n_train: int = 2000            # problems the teacher trains on (both styles of each)
    n_trace: int = 1000            # the first n_trace training problems get sampled teacher traces
    n_eval: int = 500              # held-out problems (questions never seen in training)
    teacher_steps: int = 1200
    student_steps: int = 600
    batch_size: int = 8
    lr: float = 3e-3
    samples: int = 2               # sampled traces per problem
    temperature: float = 0.8
    difficulty: int = 0
    task: str = "two_step"         # a task of vcrd.app.synthetic ("two_step" or "totals")
    eval_batch: int = 128
    max_new_tokens: int = 88       # the longest verbose solution is 81 characters, terse ones <= 27
    group: int = 8                 # length grouping: every `group` batches come from one sorted draw
    threads: int = 1               # torch threads (0: torch's default); 1: see docs/quality.md
    seed: int = 0
    presets: Tuple[str, ...] = PRESET_NAMES
    offline_k: int = 64            # top-K of the teacher cache for the offline vcrd student (0: no offline student)
    out: str = "runs/demo"


@dataclass
class Prepared:
    """What every student shares: the teacher, the traces and their scores, the initial student."""

    tok: object
    train: List[Problem]
    held_out: List[Problem]
    teacher: object
    teacher_losses: List[float]
    prompts: List[str]                  # one per candidate trace
    traces: List[str]
    problem_of: List[int]               # candidate -> index into train
    right: List[bool]
    scores: List[ResponseScore]         # LALP / GALP under the initial student (window 4)
    initial_student: object
    timings: Dict[str, Dict[str, float]] = field(default_factory=dict)


__all__ = ["PRESET_NAMES", "DemoSettings", "Prepared"]
