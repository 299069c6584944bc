"""The main job (``vcrd demo``): a complete distillation on the built-in two-step arithmetic task, on a CPU.

1. train a small teacher (128-d, 4 layers) on reference solutions in two styles (terse equations,
   verbose sentences; cross-entropy, 1200 steps): it gets most, not all, held-out problems right;
2. let it write two sampled solutions (temperature 0.8) per training problem: its traces, with its
   real mistakes in them;
3. score every trace by local and global naturalness (LALP / GALP) under the initial student, keep
   the best-LALP trace per problem, and rank the two styles as two "teachers" (``rank_teachers``);
4. distil the same initial student (64-d, 2 layers) once per preset (``kd``, ``discord``, ``vcrd``:
   same seeds, steps, data and batches) through :func:`vcrd.train.trainer.distill_loss`;
5. evaluate exact-match accuracy by batched greedy decoding (KV cache, left padding) on 500
   held-out problems;
6. offline (SPEC §10): cache the teacher's top-K (``offline_k``, default 64) on the kept traces with
   :func:`vcrd.train.teacher_cache_writer.build_cache` (what ``vcrd cache-teacher`` runs) and distil one more
   student with preset ``vcrd`` from the cache alone (same initial weights, batches and steps as the
   online ``vcrd`` student), evaluated on the same held-out problems;
7. print a table and write ``results.json``, ``results.md`` and ``curves.png`` to the output folder.

Everything is seeded: the same seed and thread count give the same table. The pieces (teacher,
traces, selection, distillation, evaluation) are reused by :mod:`vcrd.app.quality`.

The pieces, one file each: the models and their training (:mod:`vcrd.app.demo_training`), generation and
evaluation (:mod:`vcrd.app.demo_eval`), the report (:mod:`vcrd.app.demo_report`); this module holds the
settings and the run.
"""

from __future__ import annotations

import contextlib
import os
import random
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch

from ..core.progress import progress
from ..select.naturalness import ResponseScore, score_responses
from ..select.selection import rank_teachers, select_responses
from ..train.data import Example
from .demo_eval import evaluate, generate, style_of
from .demo_report import OFFLINE, demo_results, folder_bytes, write_report
from .demo_settings import PRESET_NAMES, DemoSettings, Prepared
from .demo_training import build_teacher_cache, distil, eager_loss, llama, train_teacher
from .synthetic import check_answer, make_dataset
from .tokenizer import build_char_tokenizer


class Clock:
    """Wall and CPU seconds per phase (CPU: ``time.process_time``, all threads of this process)."""

    def __init__(self) -> None:
        self.phases: Dict[str, Dict[str, float]] = {}

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        w, c = time.perf_counter(), time.process_time()
        yield
        self.phases[name] = {"wall": time.perf_counter() - w, "cpu": time.process_time() - c}


def prepare(s: DemoSettings, clock: Clock, bar=None, log=print) -> Prepared:
    """Steps 1–3: data, teacher, sampled traces, scores under the initial student."""
    tok = build_char_tokenizer()
    train = make_dataset(s.n_train, s.seed, s.task, s.difficulty)
    held_out = make_dataset(s.n_eval, s.seed + 1, s.task, s.difficulty, exclude={p.question for p in train})
    with clock("teacher"):
        teacher = llama(tok, 128, 4, s.seed)
        teacher_losses = train_teacher(teacher, tok, train, s.teacher_steps, s.batch_size, s.lr, s.seed, s.group, bar)
        teacher.eval().requires_grad_(False)
    traced = train[:min(s.n_trace, len(train))]
    log(f"\nteacher writes {s.samples} sampled traces (temperature {s.temperature}) for {len(traced)} problems ...",
        flush=True)
    with clock("traces"):
        qs = [p.question for p in traced]
        sampled = [generate(teacher, tok, qs, sample=True, seed=s.seed + 1 + k, max_new_tokens=s.max_new_tokens,
                            batch=s.eval_batch, temperature=s.temperature) for k in range(s.samples)]
    problem_of = [i for _ in range(s.samples) for i in range(len(traced))]
    traces = [t for k in range(s.samples) for t in sampled[k]]
    prompts = [traced[i].question for i in problem_of]
    right = [check_answer(t, traced[i].answer) for i, t in zip(problem_of, traces)]
    with clock("scoring"):
        initial_student = llama(tok, 64, 2, s.seed + 7)
        scores = score_responses(initial_student, tok, prompts, traces, window=4)
    return Prepared(tok, train, held_out, teacher, teacher_losses, prompts, traces, problem_of, right, scores,
                    initial_student)


def select(prep: Prepared, how: str = "lalp", seed: int = 0) -> Tuple[List[Example], float]:
    """One trace per problem: the best LALP (``"lalp"``), best GALP (``"galp"``) or a random one
    (``"random"``); returns the examples and the share of kept traces that are right."""
    if how == "random":
        rng = random.Random(seed)
        by_prompt: Dict[str, List[int]] = {}
        for j, p in enumerate(prep.prompts):
            by_prompt.setdefault(p, []).append(j)
        keep = [rng.choice(js) for js in by_prompt.values()]
    else:
        keep = select_responses(prep.prompts, prep.scores, by=how)
    keep = [j for j in keep if prep.traces[j].strip()]
    examples = [Example(prep.prompts[j], prep.traces[j]) for j in keep]
    return examples, sum(prep.right[j] for j in keep) / max(1, len(keep))


def fresh_student(prep: Prepared, s: DemoSettings):
    """A copy of the initial student (the same weights for every preset)."""
    student = llama(prep.tok, 64, 2, s.seed + 7)
    student.load_state_dict(prep.initial_student.state_dict())
    return student


def style_ranking(prep: Prepared, scores: Sequence[ResponseScore], rows: Optional[Sequence[int]] = None
                  ) -> List[Dict[str, object]]:
    """The two styles as two "teachers": ``rank_teachers`` over the sampled traces, with each
    style's share of right traces."""
    rows = list(range(len(prep.traces))) if rows is None else list(rows)
    styles = [style_of(prep.traces[j]) for j in rows]
    ranks = rank_teachers([prep.prompts[j] for j in rows], styles, list(scores))
    out = []
    for r in ranks:
        mine = [prep.right[j] for j, st in zip(rows, styles) if st == r.teacher]
        out.append({"style": r.teacher, "traces": r.n_responses, "mean_lalp": r.mean_lalp, "mean_galp": r.mean_galp,
                    "win_rate": r.win_rate, "right": sum(mine) / max(1, len(mine))})
    return out


def _offline_student(prep: Prepared, data: Sequence[Example], s: DemoSettings, clock: Clock, bar,
                     curves: Dict[str, Dict[str, List[float]]], evals: Dict[str, Dict[str, float]]
                     ) -> Dict[str, object]:
    """Step 6: the teacher's top-K cache of ``data``, and a ``vcrd`` student distilled from it (its curves
    and evaluation go to ``curves``/``evals`` under :data:`OFFLINE`); returns the cache's figures. Runs
    under its own RNG state, so it changes nothing that runs after it."""
    with torch.random.fork_rng(devices=[]), tempfile.TemporaryDirectory(prefix="vcrd-demo-cache-") as tmp:
        with clock("teacher_cache"):
            cache = build_teacher_cache(prep.teacher, prep.tok, data, s.offline_k, tmp, batch_size=s.eval_batch)
        student = fresh_student(prep, s)
        with clock(f"student_{OFFLINE}"):
            curves[OFFLINE] = distil(student, None, prep.tok, data, "vcrd", s, s.student_steps, s.seed + 3, bar, cache)
        with clock(f"eval_{OFFLINE}"):
            evals[OFFLINE] = evaluate(student, prep.tok, prep.held_out, s)
        shard_bytes = sum(sh["bytes"] for sh in cache.shards)
        return {"k": cache.k, "vocab": cache.vocab, "rows": cache.n_rows, "cache_bytes": folder_bytes(cache.folder),
                "shard_bytes": shard_bytes, "bytes_per_row": cache.manifest["record_bytes"],
                "dense_bf16_bytes_per_row": 2 * cache.vocab, "cache_seconds": clock.phases["teacher_cache"]["wall"]}


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """``torch.set_num_threads(n)`` for the block (``n = 0``: unchanged), restored afterwards."""
    old = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


@dataclass
class Students:
    """The students of one run, distilled from the LALP-selected traces: the models by preset, their curves
    and held-out evaluations (by preset, ``"teacher"`` and :data:`OFFLINE`), the offline cache's figures."""

    data: List[Example]
    kept_right: float
    models: Dict[str, object]
    curves: Dict[str, Dict[str, List[float]]]
    evals: Dict[str, Dict[str, float]]
    offline: Optional[Dict[str, object]]


def distil_students(s: DemoSettings, clock: Clock) -> Tuple[Prepared, Students]:
    """Steps 1–6: the teacher, its traces and their scores, then one student per preset (the same initial
    student, data and batches for every preset) and the offline one, each evaluated on the held-out set."""
    students_to_train = len(s.presets) + (1 if s.offline_k else 0)
    with eager_loss(), progress(s.teacher_steps + students_to_train * s.student_steps, desc="training",
                                unit="step") as bar:
        prep = prepare(s, clock, bar, log=print)
        data, kept_right = select(prep, "lalp")
        evals: Dict[str, Dict[str, float]] = {}
        with clock("teacher_eval"):
            evals["teacher"] = evaluate(prep.teacher, prep.tok, prep.held_out, s)
        curves: Dict[str, Dict[str, List[float]]] = {}
        models = {}
        for preset in s.presets:
            student = fresh_student(prep, s)
            with clock(f"student_{preset}"):
                curves[preset] = distil(student, prep.teacher, prep.tok, data, preset, s, s.student_steps,
                                        s.seed + 3, bar)
            with clock(f"eval_{preset}"):
                evals[preset] = evaluate(student, prep.tok, prep.held_out, s)
            models[preset] = student
        offline = _offline_student(prep, data, s, clock, bar, curves, evals) if s.offline_k else None
    return prep, Students(data, kept_right, models, curves, evals, offline)


def run_demo(s: DemoSettings) -> Dict[str, object]:
    """Run the whole job; return the results (also written to ``s.out``)."""
    with torch_threads(s.threads):
        return _run_demo(s)


def _run_demo(s: DemoSettings) -> Dict[str, object]:
    for p in s.presets:
        if p not in PRESET_NAMES:
            raise ValueError(f"presets: expected names from {PRESET_NAMES}, got {p!r}")
    if isinstance(s.offline_k, bool) or not isinstance(s.offline_k, int) or s.offline_k < 0:
        raise ValueError(f"offline_k: expected an int >= 0 (0: no offline student), got {s.offline_k!r}")
    threads = torch.get_num_threads()
    load_start = os.getloadavg()
    wall0, cpu0 = time.perf_counter(), time.process_time()
    Path(s.out).mkdir(parents=True, exist_ok=True)
    clock = Clock()
    print(f"vcrd demo: seed {s.seed}, {threads} torch thread(s), load average {load_start[0]:.2f}", flush=True)
    prep, students = distil_students(s, clock)
    ranking = {"initial student": style_ranking(prep, prep.scores)}
    ref = "kd" if "kd" in students.models else s.presets[0]
    with clock("ranking"), eager_loss():  # the same ranking under a trained student (the first 300 problems)
        rows = [j for j, i in enumerate(prep.problem_of) if i < 300]
        trained_scores = score_responses(students.models[ref], prep.tok, [prep.prompts[j] for j in rows],
                                         [prep.traces[j] for j in rows], window=4)
        ranking[f"{ref} student (first 300 problems)"] = style_ranking(prep, trained_scores, rows)
    machine = {"seconds": time.perf_counter() - wall0, "cpu_seconds": time.process_time() - cpu0, "threads": threads,
               "load_average": {"start": list(load_start), "end": list(os.getloadavg())}, "phases": clock.phases}
    results = demo_results(s, prep, (len(students.data), students.kept_right), students.evals, students.curves,
                           students.offline, ranking, machine)
    write_report(s, results, students.curves, prep.teacher_losses)
    return results


__all__ = ["PRESET_NAMES", "Clock", "DemoSettings", "Prepared", "Students", "distil_students", "fresh_student",
           "prepare", "run_demo", "select", "style_ranking", "torch_threads"]
