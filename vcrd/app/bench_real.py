"""``vcrd bench-real lalp``: local naturalness (LALP) on real teachers under a real student.

CHAMP's four teachers (GPT-3.5, GPT-4, GPT-4 Turbo, PaLM 2 Medium; their recorded 0-shot solutions,
:mod:`vcrd.select.champ`) scored by SmolLM2-135M-Instruct (``vcrd fetch-model smollm2``), each prompt
rendered with the student's chat template (the CHAMP system and user messages):

- **teacher ranking**: per teacher, mean LALP, mean GALP and the LALP win rate (``rank_teachers``), beside
  its final-answer accuracy on these problems (numeric grading; unparsed answers counted and shown);
- **response selection**: per problem, the response with the highest LALP, GALP, or LALP with
  ``drop_first`` ids of each step not scored (ASLEC's choice: 2), against a random pick (its expected
  accuracy: the mean over the problem's responses, no sampling) and an oracle (any response right);
  scored by whether the selected response is right (unparsed = not right);
- **95 % bootstrap intervals over problems** (percentile, ``bootstrap`` resamples, seeded) for each
  accuracy and for the paired differences LALP − GALP, LALP − random, LALP − drop_first.

Writes ``results.json`` and ``results.md`` in ``out``; prints the tables and the time of each part.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

from ..select.champ import TEACHERS

METHODS = ("LALP", "GALP", "LALP drop_first", "random (expected)", "oracle (any right)")


@dataclass
class LalpSettings:
    """``vcrd bench-real lalp``'s options: the student model folder, the CHAMP draw, the scorer's settings."""

    model: str
    out: str = "runs/real-lalp"
    problems: int = 20
    teachers: Tuple[str, ...] = TEACHERS
    variant: str = "0-Shot"
    window: int = 4
    drop_first: int = 2
    dtype: str = "bfloat16"
    threads: int = 0
    seed: int = 0
    bootstrap: int = 2000
    token_budget: int = 8192
    extra: Dict[str, object] = field(default_factory=dict)


def _mean(xs: Sequence[float]) -> float:
    """Mean of the values that are not NaN (NaN when there are none)."""
    xs = [x for x in xs if not math.isnan(x)]
    return sum(xs) / len(xs) if xs else math.nan


def bootstrap_ci(per_problem: Sequence[float], resamples: int, seed: int) -> Tuple[float, float]:
    """95 % percentile interval of the mean of ``per_problem`` over ``resamples`` resamples of the problems."""
    rng, n = random.Random(seed), len(per_problem)
    means = sorted(sum(per_problem[rng.randrange(n)] for _ in range(n)) / n for _ in range(resamples))
    return means[int(0.025 * (resamples - 1))], means[int(math.ceil(0.975 * (resamples - 1)))]


def pick(values: Sequence[float]) -> int:
    """Index of the highest value (NaN lowest; ties: the first)."""
    key = [(-math.inf if math.isnan(v) else v) for v in values]
    return max(range(len(key)), key=lambda i: (key[i], -i))


def teacher_rows(s: LalpSettings, flat, scores, dropped) -> List[Dict[str, object]]:
    """Per teacher, highest mean LALP first: mean LALP, GALP and win rate (``rank_teachers``), final-answer
    accuracy and the mean LALP with ``drop_first``; ``flat`` holds ``(problem, response)`` in score order."""
    from ..select.selection import rank_teachers

    keys = [p.identifier for p, _ in flat]
    teachers = [r.teacher for _, r in flat]
    ranks = {r.teacher: r for r in rank_teachers(keys, teachers, scores)}
    rows = []
    for t in s.teachers:
        rs = [r for _, r in flat if r.teacher == t]
        graded = [r for r in rs if r.correct is not None]
        rank, right = ranks[t], sum(bool(r.correct) for r in graded)
        rows.append(dict(teacher=t, mean_lalp=rank.mean_lalp, mean_galp=rank.mean_galp, win_rate=rank.win_rate,
                         accuracy=right / len(rs), right=right, responses=len(rs), unparsed=len(rs) - len(graded),
                         mean_lalp_drop_first=_mean([d.lalp for (_, r), d in zip(flat, dropped) if r.teacher == t])))
    rows.sort(key=lambda r: -r["mean_lalp"])
    return rows


Rows = List[Dict[str, object]]


def selection_rows(s: LalpSettings, problems, scores, dropped) -> Tuple[Dict[str, List[float]], Rows, Rows]:
    """Per-problem response selection by each of :data:`METHODS`: the right share per problem, each method's
    accuracy with its 95 percent bootstrap interval and the teachers it chose, and the paired differences."""
    per_problem: Dict[str, List[float]] = {m: [] for m in METHODS}
    chosen: Dict[str, Dict[str, int]] = {m: {t: 0 for t in s.teachers} for m in METHODS[:3]}
    i = 0
    for p in problems:
        n = len(p.responses)
        right = [1.0 if r.correct else 0.0 for r in p.responses]
        for method, values in (("LALP", [x.lalp for x in scores[i:i + n]]),
                               ("GALP", [x.galp for x in scores[i:i + n]]),
                               ("LALP drop_first", [x.lalp for x in dropped[i:i + n]])):
            k = pick(values)
            per_problem[method].append(right[k])
            chosen[method][p.responses[k].teacher] += 1
        per_problem["random (expected)"].append(sum(right) / n)
        per_problem["oracle (any right)"].append(max(right))
        i += n
    selection = []
    for m in METHODS:
        lo, hi = bootstrap_ci(per_problem[m], s.bootstrap, s.seed)
        selection.append(dict(method=m, accuracy=_mean(per_problem[m]), ci95=[lo, hi], chosen=chosen.get(m)))
    differences = []
    for a, b in (("LALP", "GALP"), ("LALP", "random (expected)"), ("LALP", "LALP drop_first"),
                 ("GALP", "random (expected)")):
        d = [x - y for x, y in zip(per_problem[a], per_problem[b])]
        lo, hi = bootstrap_ci(d, s.bootstrap, s.seed)
        differences.append(dict(pair=f"{a} - {b}", difference=_mean(d), ci95=[lo, hi]))
    return per_problem, selection, differences


def run_lalp(s: LalpSettings, log=print) -> Dict[str, object]:
    """The benchmark (see the module docstring); returns what ``results.json`` holds."""
    import torch

    from ..select.champ import accuracy_by_teacher, gradable_count, load_champ
    from ..select.model_io import DTYPES, chat_prompt
    from ..select.naturalness import score_responses
    from ..train.files import check_writable
    from ..train.model_files import check_model_folder

    for name, value, low in (("problems", s.problems, 1), ("window", s.window, 0), ("drop_first", s.drop_first, 1),
                             ("bootstrap", s.bootstrap, 100), ("threads", s.threads, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name}: expected an int >= {low}, got {value!r}")
    if s.dtype not in DTYPES:
        raise ValueError(f"dtype: expected one of {sorted(DTYPES)}, got {s.dtype!r}")
    model_dir, out = Path(s.model), Path(s.out)
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"--model: expected a local model folder with config.json (vcrd fetch-model "
                                f"smollm2 --out DIR), got {str(model_dir)!r}")
    check_writable(out, "--out")
    problems = load_champ(s.problems, variant=s.variant, teachers=s.teachers, seed=s.seed)  # refusals before loading
    everything = load_champ(gradable_count(s.variant, s.teachers), variant=s.variant, teachers=s.teachers)
    check_model_folder(model_dir, "--model")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if s.threads:
        torch.set_num_threads(s.threads)
    times: Dict[str, float] = {}
    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True, dtype=DTYPES[s.dtype]).eval()
    times["load"] = time.perf_counter() - t0
    flat = [(p, r) for p in problems for r in p.responses]
    prompts = [chat_prompt(tok, r.messages) for _, r in flat]
    responses = [r.solution for _, r in flat]
    n_tokens = sum(len(tok(x, add_special_tokens=False)["input_ids"]) for x in responses)
    log(f"{len(problems)} CHAMP problems x {len(s.teachers)} teachers ({s.variant}), {len(flat)} responses, "
        f"{n_tokens} response tokens; {s.dtype}, {torch.get_num_threads()} threads, window {s.window}, "
        f"load average {os.getloadavg()[0]:.1f}")
    scored = {}
    for name, drop in (("LALP", 0), ("LALP drop_first", s.drop_first)):
        t0 = time.perf_counter()
        scored[name] = score_responses(model, tok, prompts, responses, window=s.window, drop_first=drop,
                                       token_budget=s.token_budget)
        times[f"score (drop_first={drop})"] = time.perf_counter() - t0
        log(f"scored with drop_first={drop} in {times[f'score (drop_first={drop})']:.0f} s "
            f"({n_tokens / times[f'score (drop_first={drop})']:.0f} response tokens/s)")
    scores, dropped = scored["LALP"], scored["LALP drop_first"]

    rows = teacher_rows(s, flat, scores, dropped)
    per_problem, selection, differences = selection_rows(s, problems, scores, dropped)
    result = dict(settings={k: v for k, v in asdict(s).items() if k != "extra"}, n_problems=len(problems),
                  n_responses=len(flat), response_tokens=n_tokens, times_s=times, teachers=rows,
                  selection=selection, differences=differences,
                  accuracy_all_gradable=dict(problems=len(everything), by_teacher=accuracy_by_teacher(everything)),
                  problems=[p.identifier for p in problems], per_problem=per_problem, **s.extra)
    md = format_markdown(result)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    (out / "results.md").write_text(md, encoding="utf-8")
    log("\n" + md)
    return result


def format_markdown(r: Dict[str, object]) -> str:
    s = r["settings"]
    lines = [f"{r['n_problems']} CHAMP problems x {len(s['teachers'])} teachers ({s['variant']}), "
             f"{r['n_responses']} responses, {r['response_tokens']} response tokens; student {s['model']} in "
             f"{s['dtype']}, window {s['window']}; times: " +
             ", ".join(f"{k} {v:.0f} s" for k, v in r["times_s"].items()), "",
             f"| teacher | mean LALP | mean GALP | LALP win rate | mean LALP (drop_first={s['drop_first']}) | "
             "final answer right | unparsed |", "|---|---|---|---|---|---|---|"]
    for t in r["teachers"]:
        lines.append(f"| {t['teacher']} | {t['mean_lalp']:.4f} | {t['mean_galp']:.4f} | {t['win_rate']:.0%} | "
                     f"{t['mean_lalp_drop_first']:.4f} | {t['right']}/{t['responses']} ({t['accuracy']:.0%}) | "
                     f"{t['unparsed']} |")
    a = r.get("accuracy_all_gradable")
    if a:
        lines += ["", f"Final answers on all {a['problems']} gradable problems (no scoring needed): " + "; ".join(
            f"{t} {v['right']}/{a['problems']} right ({v['unparsed']} unparsed)" for t, v in a["by_teacher"].items())]
    lines += ["", "| selection per problem | selected response right | 95 % bootstrap CI | picks per teacher |",
              "|---|---|---|---|"]
    for m in r["selection"]:
        picks = ", ".join(f"{k} {v}" for k, v in m["chosen"].items()) if m["chosen"] else "-"
        lines.append(f"| {m['method']} | {m['accuracy']:.1%} | [{m['ci95'][0]:.1%}, {m['ci95'][1]:.1%}] | {picks} |")
    lines += ["", "| paired difference (per problem) | mean | 95 % bootstrap CI |", "|---|---|---|"]
    for d in r["differences"]:
        lines.append(f"| {d['pair']} | {d['difference']:+.1%} | [{d['ci95'][0]:+.1%}, {d['ci95'][1]:+.1%}] |")
    return "\n".join(lines) + "\n"
