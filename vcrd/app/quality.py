"""The quality benchmark (``vcrd bench-quality``): presets and ablations, several paired seeds.

For every seed the demo's pipeline (:mod:`vcrd.app.demo`) runs once up to the traces: one teacher,
one set of sampled traces scored under the initial student. Every arm then distils the *same*
initial student on the same batches (the seeds are paired across arms), changing one thing:

- the presets ``kd``, ``discord``, ``vcrd`` (``vcrd`` = argmax validity + correction over a 4-step
  window, ``normalize="weights"``, best-LALP trace per problem);
- loss ablations of ``vcrd``: validity only, correction only, window 1, per-token window,
  ``normalize="tokens"``;
- selection ablations of ``vcrd``: a random trace per problem, the best-GALP trace;
- offline ``vcrd``: the same student distilled from the teacher's top-64 cache of its kept traces
  (SPEC §10; no teacher runs during distillation), as the demo's offline student.

An arm may override fields of its config: ``vcrd[validity_tau=0.5]`` is the ``vcrd`` arm with
``validity_tau=0.5`` (:func:`parse_arm`); ``vary_arms`` builds such arms one field at a time, for
the sensitivity of the defaults.

Reported per arm: held-out exact match, mean ± 95 % confidence interval over seeds (t-distribution),
and the paired difference to ``kd`` and to ``vcrd`` (mean ± 95 % CI of the per-seed differences).
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from ..core.config import VCRDConfig
from .demo import Clock, DemoSettings, fresh_student, prepare, select, torch_threads
from .demo_eval import evaluate
from .demo_report import head_tail
from .demo_training import build_teacher_cache, distil, eager_loss

# name -> (preset, overrides, selection)
ARMS: Dict[str, Tuple[str, Dict[str, object], str]] = {
    "kd": ("kd", {}, "lalp"),
    "discord": ("discord", {}, "lalp"),
    "vcrd": ("vcrd", {}, "lalp"),
    "validity only": ("vcrd", {"correction": False}, "lalp"),
    "correction only": ("vcrd", {"validity": None}, "lalp"),
    "window 1": ("vcrd", {"window_steps": 1}, "lalp"),
    "per-token window": ("vcrd", {"window_steps": None}, "lalp"),
    "normalize tokens": ("vcrd", {"normalize": "tokens"}, "lalp"),
    "random selection": ("vcrd", {}, "random"),
    "GALP selection": ("vcrd", {}, "galp"),
    "offline vcrd": ("vcrd", {}, "lalp"),
}
# arms distilled from the teacher's top-K cache of their traces instead of the live teacher: name -> K
OFFLINE_K: Dict[str, int] = {"offline vcrd": 64}

# two-sided 95 % quantiles of Student's t, df = 1..30
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
         2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045,
         2.042)


def t_quantile(df: int) -> float:
    """The 0.975 quantile of Student's t with ``df`` degrees of freedom (table up to 30, then a
    Cornish–Fisher expansion around 1.96, within 0.001)."""
    if df < 1:
        raise ValueError(f"df: expected >= 1, got {df}")
    if df <= 30:
        return _T975[df - 1]
    z = 1.959964
    return z + (z ** 3 + z) / (4 * df) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * df ** 2)


def mean_ci(values: Sequence[float], level: float = 0.95) -> Tuple[float, float]:
    """``(mean, half-width)`` of the 95 % t confidence interval; the half-width is NaN for one value."""
    if level != 0.95:
        raise ValueError("only the 95 % interval is tabulated")
    n = len(values)
    if n == 0:
        raise ValueError("values: expected at least one")
    m = sum(values) / n
    if n == 1:
        return m, math.nan
    sd = math.sqrt(sum((v - m) ** 2 for v in values) / (n - 1))
    return m, t_quantile(n - 1) * sd / math.sqrt(n)


def paired_difference(a: Sequence[float], b: Sequence[float]) -> Tuple[float, float]:
    """``mean_ci`` of the per-seed differences ``a[i] - b[i]`` (the seeds are paired)."""
    if len(a) != len(b):
        raise ValueError(f"a, b: expected paired values, got {len(a)} and {len(b)}")
    return mean_ci([x - y for x, y in zip(a, b)])


def fmt_ci(m: float, h: float, pct: bool = True) -> str:
    k = 100 if pct else 1
    s = f"{k * m:+.1f}" if not pct or m < 0 else f"{k * m:.1f}"
    return s + ("" if math.isnan(h) else f" ± {k * h:.1f}")


@dataclass
class QualitySettings:
    seeds: Tuple[int, ...] = (0, 1, 2)
    arms: Tuple[str, ...] = tuple(ARMS)
    demo: DemoSettings = field(default_factory=lambda: DemoSettings(student_steps=400, n_eval=500))
    out: str = "runs/quality"


CONFIG_FIELDS = tuple(f.name for f in fields(VCRDConfig))
_SPEC = re.compile(r"(?P<base>[^\[\]]+?)\s*(?:\[(?P<overrides>[^\[\]]*)\])?")


def parse_value(text: str) -> object:
    """A config value written on the command line: ``None``, ``True``/``False``, an int, a float,
    else the text itself (``tokens``, ``argmax``)."""
    words = {"None": None, "True": True, "False": False}
    if text in words:
        return words[text]
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def parse_arm(spec: str) -> Tuple[str, Dict[str, object]]:
    """``"vcrd[validity_tau=0.5,window_steps=None]"`` -> ``("vcrd", {"validity_tau": 0.5, "window_steps":
    None})``: an arm of :data:`ARMS` and the :class:`VCRDConfig` fields it overrides (none without brackets)."""
    m = _SPEC.fullmatch(spec.strip())
    if m is None or m["base"] not in ARMS:
        raise ValueError(f"arms: expected NAME or NAME[FIELD=VALUE,...] with NAME from {list(ARMS)}, got {spec!r}")
    overrides: Dict[str, object] = {}
    for item in filter(None, (m["overrides"] or "").split(",")):
        key, eq, value = (x.strip() for x in item.partition("="))
        if not eq or key not in CONFIG_FIELDS or key in overrides:
            raise ValueError(f"arms: {spec!r}: expected distinct FIELD=VALUE items with FIELD from "
                             f"{list(CONFIG_FIELDS)}, got {item.strip()!r}")
        overrides[key] = parse_value(value)
    return m["base"], overrides


def arm_name(base: str, overrides: Dict[str, object]) -> str:
    """The canonical name of an arm: ``base``, or ``base[field=value,...]``."""
    return base + (f"[{','.join(f'{k}={v}' for k, v in overrides.items())}]" if overrides else "")


def arm_config(name: str) -> VCRDConfig:
    """The loss config of an arm: its preset with the arm's and the spec's overrides (validated)."""
    base, extra = parse_arm(name)
    preset, overrides, _ = ARMS[base]
    try:
        return VCRDConfig.preset(preset, **{**overrides, **extra})
    except ValueError as e:
        raise ValueError(f"arms: {name!r}: {e}") from e


def split_arms(text: str) -> Tuple[str, ...]:
    """Comma-separated arm specs in canonical form, checked; commas inside brackets separate overrides."""
    names = tuple(arm_name(*parse_arm(spec)) for spec in re.split(r",(?![^\[]*\])", text))
    for name in names:
        arm_config(name)
    return names


def vary_arms(item: str, base: str = "vcrd") -> Tuple[str, ...]:
    """``"validity_tau=0.125,0.5"`` -> ``("vcrd[validity_tau=0.125]", "vcrd[validity_tau=0.5]")``: one arm
    per value of one field (a one-at-a-time sensitivity grid around ``base``), checked."""
    key, eq, values = item.partition("=")
    if not eq or not values.strip():
        raise ValueError(f"vary: expected FIELD=VALUE[,VALUE...], got {item!r}")
    return split_arms(",".join(f"{base}[{key.strip()}={v.strip()}]" for v in values.split(",")))


def varied_right_traces(traces: Sequence[str], problem_of: Sequence[int], right: Sequence[bool]) -> float:
    """Among the problems with two or more right traces, the share whose right traces pass through
    different intermediate values (the ``=N`` results of their steps): the same answer reached by
    different steps. ``traces[j]`` solves problem ``problem_of[j]``; ``right[j]`` says whether it is right."""
    steps: Dict[int, List[Tuple[int, ...]]] = {}
    for text, i, ok in zip(traces, problem_of, right):
        if ok:
            steps.setdefault(i, []).append(tuple(int(v) for v in re.findall(r"=(\d+)", text)))
    several = [v for v in steps.values() if len(v) > 1]
    return sum(len(set(v)) > 1 for v in several) / max(1, len(several))


def summarize(per_seed: Dict[str, Dict[str, float]], arms: Sequence[str], seeds: Sequence[int]
              ) -> List[Dict[str, object]]:
    """One row per arm: accuracy mean ± CI and paired differences to kd and vcrd (on the seeds both have)."""
    rows = []
    for arm in arms:
        done = [s for s in seeds if arm in per_seed.get(str(s), {})]
        if not done:
            continue
        acc = [per_seed[str(s)][arm]["accuracy"] for s in done]
        drops = [1 - per_seed[str(s)][arm]["loss"][1] / per_seed[str(s)][arm]["loss"][0] for s in done]
        row: Dict[str, object] = {"arm": arm, "n_seeds": len(done), "accuracy": mean_ci(acc), "values": acc,
                                  "loss_drop": mean_ci(drops)}
        for ref in ("kd", "vcrd"):
            both = [s for s in done if ref in per_seed[str(s)]]
            if ref != arm and both:
                row[f"vs_{ref}"] = paired_difference([per_seed[str(s)][arm]["accuracy"] for s in both],
                                                     [per_seed[str(s)][ref]["accuracy"] for s in both])
        rows.append(row)
    return rows


def _describe(arm: str) -> str:
    base, extra = parse_arm(arm)
    preset, overrides, sel = ARMS[base]
    chosen = "random" if sel == "random" else f"best-{sel.upper()}"
    source = [f"teacher's top-{OFFLINE_K[base]} cache"] if base in OFFLINE_K else []
    return ", ".join([f"preset {preset}", *(f"{k}={v!r}" for k, v in {**overrides, **extra}.items()),
                      f"{chosen} trace", *source])


def format_table(rows: List[Dict[str, object]]) -> List[str]:
    lines = ["| arm | what | held-out exact match, % (mean ± 95% CI) | per seed, % | Δ vs kd, points (paired) | "
             "Δ vs vcrd, points (paired) | loss drop, first 10 → last 10 steps |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        vals = ", ".join(f"{100 * v:.1f}" for v in r["values"])
        d_kd = fmt_ci(*r["vs_kd"]) if "vs_kd" in r else "-"
        d_vc = fmt_ci(*r["vs_vcrd"]) if "vs_vcrd" in r else "-"
        m, h = r["loss_drop"]
        lines.append(f"| {r['arm']} | {_describe(r['arm'])} | {fmt_ci(*r['accuracy'])} | {vals} | {d_kd} | {d_vc} | "
                     f"{100 * m:.0f}% |")
    return lines


def _plot(rows: List[Dict[str, object]], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(9, 3.8))
    xs = range(len(rows))
    means = [100 * r["accuracy"][0] for r in rows]
    errs = [0 if math.isnan(r["accuracy"][1]) else 100 * r["accuracy"][1] for r in rows]
    ax.bar(xs, means, yerr=errs, capsize=4, color="#7aa6c2")
    for i, r in enumerate(rows):
        ax.scatter([i] * len(r["values"]), [100 * v for v in r["values"]], color="black", s=8, zorder=3)
    ax.set_xticks(list(xs), [r["arm"] for r in rows], rotation=30, ha="right", fontsize=8)
    ax.set(ylabel="held-out exact match, %", title="students: mean ± 95% CI over paired seeds (dots: seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def run_quality(q: QualitySettings, command: Optional[str] = None, log=print) -> Dict[str, object]:
    """Run every arm on every seed; write ``results.json`` (after every arm), ``results.md`` and
    ``quality.png`` to ``q.out``; return the results."""
    for arm in q.arms:
        arm_config(arm)
    with torch_threads(q.demo.threads):
        return _run_quality(q, command, log)


def _run_quality(q: QualitySettings, command: Optional[str], log) -> Dict[str, object]:
    import torch
    out = Path(q.out)
    out.mkdir(parents=True, exist_ok=True)
    wall0, cpu0, load0 = time.perf_counter(), time.process_time(), os.getloadavg()
    per_seed: Dict[str, Dict[str, Dict[str, object]]] = {}
    teachers: Dict[str, Dict[str, float]] = {}
    results: Dict[str, object] = {}

    def save() -> None:
        rows = summarize(per_seed, q.arms, q.seeds)
        results.update({
            "command": command, "seeds": list(q.seeds), "arms": list(q.arms), "per_seed": per_seed,
            "teachers": teachers, "summary": [{**r, "accuracy": list(r["accuracy"])} for r in rows],
            "seconds": time.perf_counter() - wall0, "cpu_seconds": time.process_time() - cpu0,
            "threads": torch.get_num_threads(), "load_average": {"start": list(load0), "end": list(os.getloadavg())},
            "settings": {**{k: v for k, v in asdict(q.demo).items() if k not in ("presets", "out")}},
        })
        (out / "results.json").write_text(json.dumps(results, indent=1, default=list))

    width = max(map(len, q.arms))
    with eager_loss():
        for seed in q.seeds:
            s = replace(q.demo, seed=seed, out=str(out))
            clock = Clock()
            prep = prepare(s, clock, log=lambda *a, **k: None)
            t_eval = evaluate(prep.teacher, prep.tok, prep.held_out, s)
            data = {}
            teachers[str(seed)] = {"accuracy": t_eval["accuracy"], "trace_accuracy": sum(prep.right) / len(prep.right),
                                   "varied_right_traces": varied_right_traces(prep.traces, prep.problem_of, prep.right),
                                   "wall": sum(p["wall"] for p in clock.phases.values()),
                                   "cpu": sum(p["cpu"] for p in clock.phases.values())}
            t = teachers[str(seed)]
            log(f"seed {seed}: teacher {t_eval['accuracy']:.1%} held-out, traces right {t['trace_accuracy']:.1%}, "
                f"right traces of one problem with different steps {t['varied_right_traces']:.1%} "
                f"({t['cpu']:.0f} s CPU)", flush=True)
            per_seed[str(seed)] = {}
            for arm in q.arms:
                base = parse_arm(arm)[0]
                sel = ARMS[base][2]
                if sel not in data:
                    data[sel] = select(prep, sel, seed=seed)
                examples, kept_right = data[sel]
                student = fresh_student(prep, s)
                with clock(arm), tempfile.TemporaryDirectory(prefix="vcrd-quality-cache-") as tmp:
                    teacher, cache = prep.teacher, None
                    if base in OFFLINE_K:
                        with torch.random.fork_rng(devices=[]):
                            cache = build_teacher_cache(prep.teacher, prep.tok, examples, OFFLINE_K[base], tmp,
                                                        batch_size=s.eval_batch)
                        teacher = None
                    curves = distil(student, teacher, prep.tok, examples, arm_config(arm), s, s.student_steps,
                                    seed + 3, cache=cache)
                    acc = evaluate(student, prep.tok, prep.held_out, s)["accuracy"]
                per_seed[str(seed)][arm] = {"accuracy": acc, "loss": list(head_tail(curves["loss"])),
                                            "kept_right": kept_right, **clock.phases[arm]}
                log(f"  seed {seed} {arm:<{width}} {acc:6.1%}  ({clock.phases[arm]['cpu']:.0f} s CPU, "
                    f"{clock.phases[arm]['wall']:.0f} s wall)", flush=True)
                save()
    save()
    return write_report(results, out, log)


def write_report(results: Dict[str, object], out: Path, log=print) -> Dict[str, object]:
    """``results.md`` and ``quality.png`` from a ``results`` dict (as saved in ``results.json``)."""
    seeds, arms, per_seed, teachers = results["seeds"], results["arms"], results["per_seed"], results["teachers"]
    rows = summarize(per_seed, arms, seeds)
    d = results["settings"]
    t_acc = [teachers[str(s)]["accuracy"] for s in seeds]
    load = results["load_average"]
    task = d.get("task", "two_step")  # results written before the task option are two-step runs
    varied = [teachers[str(s)].get("varied_right_traces") for s in seeds]
    varied_text = ("" if None in varied else " Problems whose right traces take different intermediate steps: "
                   + ", ".join(f"{100 * v:.1f}" for v in varied) + " % per seed.")
    header = (f"Task {task}, seeds {list(seeds)} (paired across arms); per seed one teacher (128-d, 4 layers, "
              f"{d['teacher_steps']} steps, batch {d['batch_size']}, {d['n_train']} problems), {d['samples']} sampled "
              f"traces for {d['n_trace']} problems; students 64-d, 2 layers, {d['student_steps']} steps, batch "
              f"{d['batch_size']}; {d['n_eval']} held-out problems per seed, greedy. Teacher accuracy "
              f"{fmt_ci(*mean_ci(t_acc))} % (per seed: {', '.join(f'{100 * a:.1f}' for a in t_acc)}).{varied_text} "
              f"{results['seconds']:.0f} s wall, {results['cpu_seconds']:.0f} s CPU, {results['threads']} thread(s) "
              "per process "
              f"(load average {load['start'][0]:.1f} at the start, {load['end'][0]:.1f} at the end).")
    table = format_table(rows)
    plotted = _plot(rows, out / "quality.png")
    cmd = results.get("command") or "vcrd bench-quality"
    md = ["# vcrd quality benchmark", "", f"Command: `{cmd}`", "", header, "", *table, "",
          "![quality](quality.png)" if plotted else "", ""]
    (out / "results.md").write_text("\n".join(md))
    log("\n" + header + "\n\n" + "\n".join(table) + f"\n\nwrote {out / 'results.json'}, {out / 'results.md'}")
    return results


def merge(parts: Sequence[str], out: str, command: Optional[str] = None, log=print) -> Dict[str, object]:
    """Combine the ``results.json`` of runs over different seeds with the same settings and arms
    (e.g. one process per seed) into one report: wall seconds are the longest part's (the parts
    ran side by side), CPU seconds their sum."""
    loaded = [json.loads((Path(p) / "results.json").read_text()) for p in parts]
    first = loaded[0]
    for r in loaded[1:]:
        if r["settings"] != first["settings"] or r["arms"] != first["arms"]:
            raise ValueError("merge: the parts differ in settings or arms")
    ran = [[int(s) for s in r["per_seed"]] for r in loaded]  # the seeds each part started (an interrupted
    seeds = sorted({s for part in ran for s in part})           # part's unstarted seeds may be rerun elsewhere)
    if len(seeds) != sum(len(part) for part in ran):
        raise ValueError("merge: a seed appears in two parts")
    results = {"command": command, "parts": [{"dir": str(p), "command": r["command"]} for p, r in zip(parts, loaded)],
               "seeds": seeds, "arms": first["arms"],
               "per_seed": {k: v for r in loaded for k, v in r["per_seed"].items()},
               "teachers": {k: v for r in loaded for k, v in r["teachers"].items()},
               "seconds": max(r["seconds"] for r in loaded), "cpu_seconds": sum(r["cpu_seconds"] for r in loaded),
               "threads": first["threads"],
               "load_average": {"start": max((r["load_average"]["start"] for r in loaded), key=lambda x: x[0]),
                                "end": max((r["load_average"]["end"] for r in loaded), key=lambda x: x[0])},
               "settings": first["settings"]}
    results["summary"] = [{**r, "accuracy": list(r["accuracy"])}
                          for r in summarize(results["per_seed"], results["arms"], seeds)]
    dest = Path(out)
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "results.json").write_text(json.dumps(results, indent=1, default=list))
    return write_report(results, dest, log)
