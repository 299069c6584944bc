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
   :func:`vcrd.train.teacher_cache.build_cache` (what ``vcrd cache-teacher`` runs) and distil one more
   student with preset ``vcrd`` from the cache alone (same initial weights, batches and steps as the
   online ``vcrd`` student), evaluated on the same held-out problems;
7. print a table and write ``results.json``, ``results.md`` and ``curves.png`` to the output folder.

Everything is seeded: the same seed and thread count give the same table. The pieces (teacher,
traces, selection, distillation, evaluation) are reused by :mod:`vcrd.app.quality`.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import re
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch

from ..core.config import VCRDConfig
from ..core.progress import progress
from ..select.naturalness import ResponseScore, score_responses
from ..select.selection import rank_teachers, select_responses
from ..train.data import DistillCollator, Example, write_jsonl
from ..train.teacher_cache import TeacherCache, TeacherCacheCollator, build_cache
from ..train.trainer import distill_loss
from .synthetic import STYLES, Problem, check_answer, make_dataset
from .tokenizer import build_char_tokenizer

PRESET_NAMES = ("kd", "discord", "vcrd")


@dataclass
class DemoSettings:
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


# ------------------------------------------------------------------------------------------ pieces
def llama(tok, hidden: int, layers: int, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, tie_word_embeddings=False))


def schedule(opt, steps: int):
    """Linear warm-up over the first tenth of the steps, then cosine decay to 0."""
    warm = max(1, steps // 10)
    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))


def batches(examples: Sequence[Example], steps: int, batch_size: int, seed: int, group: int) -> List[List[Example]]:
    """``steps`` batches; every ``group`` batches come from one random draw of ``group * batch_size``
    examples sorted by length (less padding); ``group=1`` is plain random sampling."""
    rng = random.Random(seed)
    n = min(batch_size, len(examples))
    out: List[List[Example]] = []
    while len(out) < steps:
        pool = rng.sample(list(examples), min(len(examples), n * group))
        pool.sort(key=lambda e: len(e.prompt) + len(e.response))
        chunk = [pool[i:i + n] for i in range(0, len(pool) - n + 1, n)]
        rng.shuffle(chunk)
        out += chunk
    return out[:steps]


def _step(model, opt, sched, loss) -> None:
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    sched.step()


def train_teacher(model, tok, problems: Sequence[Problem], steps: int, batch_size: int, lr: float, seed: int,
                  group: int, bar=None) -> List[float]:
    """Cross-entropy on the reference solutions of ``problems`` in both styles."""
    collate = DistillCollator(tok, max_length=256)
    examples = [Example(p.question, p.solution(style)) for p in problems for style in STYLES]
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, betas=(0.9, 0.98))
    sched = schedule(opt, steps)
    losses: List[float] = []
    model.train()
    for chosen in batches(examples, steps, batch_size, seed, group):
        batch = collate(chosen)
        loss = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
        _step(model, opt, sched, loss)
        losses.append(loss.item())
        if bar is not None:
            bar.update(1)
    return losses


@torch.inference_mode()
def generate(model, tok, prompts: Sequence[str], *, sample: bool, seed: int, max_new_tokens: int, batch: int,
             temperature: float = 1.0) -> List[str]:
    """Solutions written by ``model`` for each prompt: batched, left-padded, with the KV cache;
    greedy, or sampled at ``temperature``."""
    model.eval()
    torch.manual_seed(seed)
    out: List[str] = []
    for i in range(0, len(prompts), batch):
        enc = [[tok.bos_token_id] + tok(p, add_special_tokens=False)["input_ids"] for p in prompts[i:i + batch]]
        L = max(map(len, enc))
        ids = torch.full((len(enc), L), tok.pad_token_id)
        mask = torch.zeros((len(enc), L), dtype=torch.long)
        for b, e in enumerate(enc):  # left padding, so every prompt ends where generation starts
            ids[b, L - len(e):] = torch.tensor(e)
            mask[b, L - len(e):] = 1
        gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=sample,
                             temperature=temperature if sample else None, top_k=None, top_p=None,
                             pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, use_cache=True)
        out += [tok.decode(g[L:], skip_special_tokens=True) for g in gen]
    return out


def style_of(text: str) -> str:
    """``verbose`` when the solution is written in sentences ("..., so 3+4=7."), else ``terse``."""
    return "verbose" if re.search(r"\bso\b|\bleft\b", text) else "terse"


def evaluate(model, tok, problems: Sequence[Problem], s: DemoSettings) -> Dict[str, float]:
    """Greedy exact-match accuracy on ``problems``, and the share of verbose answers."""
    answers = generate(model, tok, [p.question for p in problems], sample=False, seed=s.seed,
                       max_new_tokens=s.max_new_tokens, batch=s.eval_batch)
    right = [check_answer(a, p.answer) for a, p in zip(answers, problems)]
    return {"accuracy": sum(right) / len(problems),
            "verbose_share": sum(style_of(a) == "verbose" for a in answers) / len(problems)}


MAX_LENGTH = 256  # tokens per example, for the students and the teacher cache


def distil(student, teacher, tok, examples: Sequence[Example], config: Union[str, VCRDConfig], s: DemoSettings,
           steps: int, seed: int, bar=None, cache: Optional[TeacherCache] = None) -> Dict[str, List[float]]:
    """Distil ``student`` from ``teacher`` on ``examples`` with one loss config; per-step curves:
    the loss, mean w_val / w_dc, and mean w_dc on digit tokens and on the other trace tokens.
    With ``cache`` (built over ``examples``, in order) the teacher is its cached top-K rows: no teacher runs."""
    collate = DistillCollator(tok, max_length=MAX_LENGTH)
    if cache is not None:
        cached, index = TeacherCacheCollator(collate, cache), {id(e): i for i, e in enumerate(examples)}
        collate = lambda chosen: cached([(index[id(e)], e) for e in chosen])  # noqa: E731
    digits = torch.tensor([tok.convert_tokens_to_ids(c) for c in "0123456789"])
    opt = torch.optim.AdamW(student.parameters(), lr=s.lr, weight_decay=0.0, betas=(0.9, 0.98))
    sched = schedule(opt, steps)
    curves: Dict[str, List[float]] = {k: [] for k in ("loss", "w_val", "w_dc", "agree", "w_dc_digits", "w_dc_other")}
    student.train()
    for chosen in batches(examples, steps, s.batch_size, seed, s.group):
        batch = collate(chosen)
        loss, stats = distill_loss(student, teacher, batch, config)
        _step(student, opt, sched, loss)
        means = stats.means()
        curves["loss"].append(loss.item())
        for key in ("w_val", "w_dc", "agree"):
            curves[key].append(float(means[key]))
        with torch.no_grad():
            y = batch["labels"][:, 1:]
            w = stats.w_dc.detach().float()
            is_digit = torch.isin(y, digits)
            other = (y != -100) & ~is_digit
            curves["w_dc_digits"].append(float(w[is_digit].mean()) if is_digit.any() else math.nan)
            curves["w_dc_other"].append(float(w[other].mean()) if other.any() else math.nan)
        if bar is not None:
            bar.update(1)
    return curves


def build_teacher_cache(teacher, tok, examples: Sequence[Example], k: int, folder: Union[str, Path],
                        batch_size: int = 64) -> TeacherCache:
    """The teacher's top-``k`` cache of ``examples`` in ``folder/cache``, built as ``vcrd cache-teacher
    --model folder/teacher --data folder/traces.jsonl --top-k k`` does (the teacher and the traces are
    saved there first), then opened and verified against ``examples``."""
    folder = Path(folder)
    teacher.save_pretrained(folder / "teacher")
    tok.save_pretrained(folder / "teacher")
    write_jsonl(folder / "traces.jsonl", [e.to_json() for e in examples])
    out = build_cache(folder / "teacher", folder / "traces.jsonl", folder / "cache", k, batch_size=batch_size,
                      max_length=MAX_LENGTH, progress=False, say=lambda _: None)
    cache = TeacherCache(out, verify=False)  # verified with the examples below
    cache.verify(examples, DistillCollator(tok, max_length=MAX_LENGTH), vocab_size=len(tok))
    return cache


def folder_bytes(folder: Union[str, Path]) -> int:
    """Bytes of the files under ``folder``."""
    return sum(f.stat().st_size for f in Path(folder).rglob("*") if f.is_file())


def head_tail(values: Sequence[float], n: int = 10) -> Tuple[float, float]:
    """Mean of the first ``n`` and of the last ``n`` values (fewer when there are fewer)."""
    k = max(1, min(n, len(values)))
    return sum(values[:k]) / k, sum(values[-k:]) / k


def _nanmean(values: Sequence[float]) -> float:
    real = [v for v in values if not math.isnan(v)]
    return sum(real) / len(real) if real else math.nan


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


class Clock:
    """Wall and CPU seconds per phase (CPU: ``time.process_time``, all threads of this process)."""

    def __init__(self) -> None:
        self.phases: Dict[str, Dict[str, float]] = {}

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        w, c = time.perf_counter(), time.process_time()
        yield
        self.phases[name] = {"wall": time.perf_counter() - w, "cpu": time.process_time() - c}


@contextlib.contextmanager
def eager_loss() -> Iterator[None]:
    """``VCRD_COMPILE=0`` unless set: at a 90-token vocabulary compiling the loss chunks costs more
    than it saves (and batch shapes vary, so it would recompile)."""
    old = os.environ.get("VCRD_COMPILE")
    os.environ.setdefault("VCRD_COMPILE", "0")
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("VCRD_COMPILE", None)


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


# --------------------------------------------------------------------------------------------- run
OFFLINE = "vcrd_offline"  # results key of the student distilled from the teacher cache


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


def _plot(curves: Dict[str, Dict[str, List[float]]], teacher_losses: List[float], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    axes[0].plot(teacher_losses, color="gray")
    axes[0].set(title="teacher: cross-entropy", xlabel="step", yscale="log")
    for preset, c in curves.items():
        axes[1].plot(c["loss"], label=preset, linewidth=0.8)
        axes[2].plot(c["w_val"], label=f"{preset}: mean w_val", linewidth=0.8)
        axes[2].plot(c["w_dc"], linestyle="--", label=f"{preset}: mean w_dc", linewidth=0.8)
    axes[1].set(title="student: distillation loss", xlabel="step", yscale="log")
    axes[2].set(title="student: mean weights", xlabel="step")
    axes[1].legend(fontsize=8)
    axes[2].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def _fmt(x: float, spec: str = ".3f") -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


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
    out = Path(s.out)
    out.mkdir(parents=True, exist_ok=True)
    clock = Clock()
    print(f"vcrd demo: seed {s.seed}, {threads} torch thread(s), load average {load_start[0]:.2f}", flush=True)
    students_to_train = len(s.presets) + (1 if s.offline_k else 0)
    with eager_loss(), progress(s.teacher_steps + students_to_train * s.student_steps, desc="training",
                                unit="step") as bar:
        prep = prepare(s, clock, bar, log=print)
        data, kept_right = select(prep, "lalp")
        with clock("teacher_eval"):
            teacher_eval = evaluate(prep.teacher, prep.tok, prep.held_out, s)
        curves: Dict[str, Dict[str, List[float]]] = {}
        evals: Dict[str, Dict[str, float]] = {}
        students = {}
        for preset in s.presets:
            student = fresh_student(prep, s)  # the same initial student, data and batches for every preset
            with clock(f"student_{preset}"):
                curves[preset] = distil(student, prep.teacher, prep.tok, data, preset, s, s.student_steps,
                                        s.seed + 3, bar)
            with clock(f"eval_{preset}"):
                evals[preset] = evaluate(student, prep.tok, prep.held_out, s)
            students[preset] = student
        offline = _offline_student(prep, data, s, clock, bar, curves, evals) if s.offline_k else None
    ranking = {"initial student": style_ranking(prep, prep.scores)}
    ref = "kd" if "kd" in students else s.presets[0]
    with clock("ranking"), eager_loss():  # the same ranking under a trained student (the first 300 problems)
        rows = [j for j, i in enumerate(prep.problem_of) if i < 300]
        trained_scores = score_responses(students[ref], prep.tok, [prep.prompts[j] for j in rows],
                                         [prep.traces[j] for j in rows], window=4)
        ranking[f"{ref} student (first 300 problems)"] = style_ranking(prep, trained_scores, rows)
    seconds, cpu_seconds = time.perf_counter() - wall0, time.process_time() - cpu0
    load_end = os.getloadavg()

    students_run = [*s.presets, *([OFFLINE] if offline else [])]
    accuracy = {"teacher": teacher_eval["accuracy"], **{p: evals[p]["accuracy"] for p in students_run}}
    loss = {p: list(head_tail(curves[p]["loss"])) for p in students_run}
    trace_right = sum(prep.right) / len(prep.right)
    results = {
        "accuracy": accuracy, "n_eval": len(prep.held_out), "seconds": seconds, "cpu_seconds": cpu_seconds,
        "threads": threads, "load_average": {"start": list(load_start), "end": list(load_end)},
        "loss": loss, "teacher_loss": list(head_tail(prep.teacher_losses)),
        "teacher_trace_accuracy": trace_right, "kept_trace_accuracy": kept_right, "n_traces": len(prep.traces),
        "n_kept": len(data), "verbose_share": {"teacher": teacher_eval["verbose_share"],
                                               **{p: evals[p]["verbose_share"] for p in students_run}},
        "weights_last20": {p: {k: _nanmean(curves[p][k][-20:]) for k in ("w_val", "w_dc", "w_dc_digits", "w_dc_other")}
                           for p in students_run},
        "offline": offline, "style_ranking": ranking, "phases": clock.phases,
        "settings": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(s).items()},
    }
    (out / "results.json").write_text(json.dumps(results, indent=1))

    table = ["| model | held-out exact match | distillation loss, mean of first 10 → last 10 steps | "
             "mean w_val (last 20) | mean w_dc (last 20): all / digits / other tokens |",
             "|---|---|---|---|---|",
             f"| teacher (128-d, 4 layers) | {accuracy['teacher']:.1%} | - | - | - |"]
    for p in students_run:
        f, l_ = loss[p]
        w = results["weights_last20"][p]
        name = f"vcrd, offline top-{s.offline_k} cache" if p == OFFLINE else p
        table.append(f"| student (64-d, 2 layers), preset {name} | {accuracy[p]:.1%} | {f:.3f} → {l_:.3f} "
                     f"({1 - l_ / f:.0%} lower) | {_fmt(w['w_val'])} | {_fmt(w['w_dc'])} / {_fmt(w['w_dc_digits'])} "
                     f"/ {_fmt(w['w_dc_other'])} |")
    rank_table = ["| scored under | style (as a teacher) | traces | right | mean LALP | mean GALP | LALP win rate |",
                  "|---|---|---|---|---|---|---|"]
    for under, ranks in ranking.items():
        rank_table += [f"| {under} | {r['style']} | {r['traces']} | {r['right']:.1%} | {r['mean_lalp']:.3f} | "
                       f"{r['mean_galp']:.3f} | {r['win_rate']:.1%} |" for r in ranks]
    header = (f"vcrd demo, seed {s.seed}: two-step arithmetic (difficulty {s.difficulty}); teacher trained "
              f"{s.teacher_steps} steps (batch {s.batch_size}) on {s.n_train} problems in both styles; it sampled "
              f"{s.samples} traces per problem for {len(prep.traces) // s.samples} problems ({trace_right:.0%} of "
              f"traces right); the best-LALP trace per problem was kept ({kept_right:.0%} right); students distilled "
              f"{s.student_steps} steps each (batch {s.batch_size}); {len(prep.held_out)} held-out problems, greedy "
              f"decoding. {seconds:.0f} s wall, {cpu_seconds:.0f} s CPU on {threads} torch thread(s) "
              f"(load average {load_start[0]:.1f} at the start, {load_end[0]:.1f} at the end).")
    notes = []
    if "discord" in s.presets:
        w = results["weights_last20"]["discord"]
        f, l_ = loss["discord"]
        starved = w["w_dc_digits"] < w["w_dc_other"]
        notes.append(
            f"Preset discord: loss {f:.3f} → {l_:.3f}, held-out accuracy {accuracy['discord']:.1%}. Its per-token "
            f"correction weight w_dc = sigmoid(lp_s - lp_u) is small where the student gives the teacher's "
            f"token a low probability; in the last 20 steps it averaged {_fmt(w['w_dc_digits'])} on digit tokens "
            f"(the arithmetic) against {_fmt(w['w_dc_other'])} on the other tokens"
            + (". With normalize=\"weights\" the loss is a weighted mean, so it leans on the tokens the student "
               "already predicts and can fall while the digits stay unlearned; vcrd averages the weight over a "
               "4-step window, so hard tokens keep the weight of their neighbourhood." if starved else
               " (no starvation of the digits in this run)."))
    if offline:
        notes.append(
            f"Offline: the teacher's top-{offline['k']} cache of the {len(data)} kept traces ({offline['rows']} token "
            f"rows; `build_cache`, what `vcrd cache-teacher` runs) takes {offline['cache_bytes'] / 1e6:.2f} MB on disk "
            f"({offline['bytes_per_row']} bytes per row in the shards, against {offline['dense_bf16_bytes_per_row']} "
            f"for the full bf16 row of this {offline['vocab']}-token vocabulary: top-K storage pays off for large "
            f"vocabularies only), built in {offline['cache_seconds']:.1f} s; the offline vcrd student trains from it "
            f"alone (same initial weights, batches and steps as the online vcrd student), the tail completed "
            f"uniformly (SPEC §10).")
    notes.append(f"LALP selection scores the traces under the untrained initial student (the method scores under "
                 f"the student), where every trace scores close to log(1/V): it keeps {kept_right:.0%} right traces "
                 f"against {trace_right:.0%} of all traces. Greedy answers are terse "
                 "(verbose share of greedy answers: " + ", ".join(
                     f"{k} {v:.0%}" for k, v in results["verbose_share"].items()) + ").")
    plotted = _plot(curves, prep.teacher_losses, out / "curves.png")
    md = "\n".join(["# vcrd demo results", "", header, "", *table, "",
                    "The two teacher styles ranked as two teachers (`rank_teachers`, window 4):", "", *rank_table, "",
                    *[n + "\n" for n in notes],
                    "![curves](curves.png)" if plotted else "", "",
                    "Command: `vcrd demo` (what `make demo` runs); the same seed and thread count give the same "
                    "table.", ""])
    (out / "results.md").write_text(md)
    print("\n" + header + "\n")
    print("\n".join(table))
    print("\n" + "\n".join(rank_table) + "\n")
    print("\n".join(notes))
    print(f"\nwrote {out / 'results.json'}, {out / 'results.md'} and {out / 'curves.png'}")
    return results
