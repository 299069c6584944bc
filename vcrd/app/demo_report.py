"""The demo's report: ``results.json`` (every figure of a run), ``results.md`` (the tables and notes, with
``curves.png``) and the same tables printed."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

from .demo_settings import DemoSettings, Prepared

OFFLINE = "vcrd_offline"  # results key of the student distilled from the teacher cache


def folder_bytes(folder: Union[str, Path]) -> int:
    """Bytes of the files under ``folder``."""
    return sum(f.stat().st_size for f in Path(folder).rglob("*") if f.is_file())


def head_tail(values: Sequence[float], n: int = 10) -> Tuple[float, float]:
    """Mean of the first ``n`` and of the last ``n`` values (fewer when there are fewer)."""
    k = max(1, min(n, len(values)))
    return sum(values[:k]) / k, sum(values[-k:]) / k


def _nanmean(values: Sequence[float]) -> float:
    """Mean of the values that are not NaN (NaN when there are none)."""
    real = [v for v in values if not math.isnan(v)]
    return sum(real) / len(real) if real else math.nan


def demo_results(s: DemoSettings, prep: Prepared, kept: Tuple[int, float], evals: Dict[str, Dict[str, float]],
                 curves: Dict[str, Dict[str, List[float]]], offline: Optional[Dict[str, object]],
                 ranking: Dict[str, List[Dict[str, object]]], machine: Dict[str, object]) -> Dict[str, object]:
    """Every figure of a run: held-out accuracy (``evals["teacher"]`` and each student's), losses, weights,
    the traces kept (``kept``: their number and share right), the offline cache, the style ranking, the
    machine (``seconds``, ``cpu_seconds``, ``threads``, ``load_average``, ``phases``) and the settings."""
    from dataclasses import asdict

    students_run = [*s.presets, *([OFFLINE] if offline else [])]
    return {
        "accuracy": {p: evals[p]["accuracy"] for p in ["teacher", *students_run]}, "n_eval": len(prep.held_out),
        "seconds": machine["seconds"], "cpu_seconds": machine["cpu_seconds"], "threads": machine["threads"],
        "load_average": machine["load_average"], "loss": {p: list(head_tail(curves[p]["loss"])) for p in students_run},
        "teacher_loss": list(head_tail(prep.teacher_losses)),
        "teacher_trace_accuracy": sum(prep.right) / len(prep.right), "kept_trace_accuracy": kept[1],
        "n_traces": len(prep.traces), "n_kept": kept[0],
        "verbose_share": {p: evals[p]["verbose_share"] for p in ["teacher", *students_run]},
        "weights_last20": {p: {k: _nanmean(curves[p][k][-20:]) for k in ("w_val", "w_dc", "w_dc_digits", "w_dc_other")}
                           for p in students_run},
        "offline": offline, "style_ranking": ranking, "phases": machine["phases"],
        "settings": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(s).items()},
    }


def accuracy_table(s: DemoSettings, results: Dict) -> List[str]:
    """The markdown table of held-out accuracy, loss and mean weights, teacher then each student."""
    accuracy, loss = results["accuracy"], results["loss"]
    table = ["| model | held-out exact match | distillation loss, mean of first 10 → last 10 steps | "
             "mean w_val (last 20) | mean w_dc (last 20): all / digits / other tokens |",
             "|---|---|---|---|---|",
             f"| teacher (128-d, 4 layers) | {accuracy['teacher']:.1%} | - | - | - |"]
    for p in loss:
        f, l_ = loss[p]
        w = results["weights_last20"][p]
        name = f"vcrd, offline top-{s.offline_k} cache" if p == OFFLINE else p
        table.append(f"| student (64-d, 2 layers), preset {name} | {accuracy[p]:.1%} | {f:.3f} → {l_:.3f} "
                     f"({1 - l_ / f:.0%} lower) | {_fmt(w['w_val'])} | {_fmt(w['w_dc'])} / {_fmt(w['w_dc_digits'])} "
                     f"/ {_fmt(w['w_dc_other'])} |")
    return table


def ranking_table(ranking: Dict[str, List[Dict[str, object]]]) -> List[str]:
    """The markdown table of the two styles ranked as teachers, under each student that scored them."""
    rank_table = ["| scored under | style (as a teacher) | traces | right | mean LALP | mean GALP | LALP win rate |",
                  "|---|---|---|---|---|---|---|"]
    for under, ranks in ranking.items():
        rank_table += [f"| {under} | {r['style']} | {r['traces']} | {r['right']:.1%} | {r['mean_lalp']:.3f} | "
                       f"{r['mean_galp']:.3f} | {r['win_rate']:.1%} |" for r in ranks]
    return rank_table


def summary(s: DemoSettings, results: Dict) -> str:
    """One paragraph: the task, the teacher, the traces kept, the students, the machine."""
    load = results["load_average"]
    return (f"vcrd demo, seed {s.seed}: two-step arithmetic (difficulty {s.difficulty}); teacher trained "
            f"{s.teacher_steps} steps (batch {s.batch_size}) on {s.n_train} problems in both styles; it sampled "
            f"{s.samples} traces per problem for {results['n_traces'] // s.samples} problems "
            f"({results['teacher_trace_accuracy']:.0%} of traces right); the best-LALP trace per problem was kept "
            f"({results['kept_trace_accuracy']:.0%} right); students distilled {s.student_steps} steps each (batch "
            f"{s.batch_size}); {results['n_eval']} held-out problems, greedy decoding. {results['seconds']:.0f} s "
            f"wall, {results['cpu_seconds']:.0f} s CPU on {results['threads']} torch thread(s) (load average "
            f"{load['start'][0]:.1f} at the start, {load['end'][0]:.1f} at the end).")


def notes(s: DemoSettings, results: Dict) -> List[str]:
    """What the figures say: discord's weights on the digits, the offline cache, LALP selection."""
    accuracy, loss, offline = results["accuracy"], results["loss"], results["offline"]
    kept_right, trace_right = results["kept_trace_accuracy"], results["teacher_trace_accuracy"]
    out = []
    if "discord" in s.presets:
        w = results["weights_last20"]["discord"]
        f, l_ = loss["discord"]
        starved = w["w_dc_digits"] < w["w_dc_other"]
        out.append(
            f"Preset discord: loss {f:.3f} → {l_:.3f}, held-out accuracy {accuracy['discord']:.1%}. Its per-token "
            f"correction weight w_dc = sigmoid(lp_s - lp_u) is small where the student gives the teacher's "
            f"token a low probability; in the last 20 steps it averaged {_fmt(w['w_dc_digits'])} on digit tokens "
            f"(the arithmetic) against {_fmt(w['w_dc_other'])} on the other tokens"
            + (". With normalize=\"weights\" the loss is a weighted mean, so it leans on the tokens the student "
               "already predicts and can fall while the digits stay unlearned; vcrd averages the weight over a "
               "4-step window, so hard tokens keep the weight of their neighbourhood." if starved else
               " (no starvation of the digits in this run)."))
    if offline:
        out.append(
            f"Offline: the teacher's top-{offline['k']} cache of the {results['n_kept']} kept traces "
            f"({offline['rows']} token rows; `build_cache`, what `vcrd cache-teacher` runs) takes "
            f"{offline['cache_bytes'] / 1e6:.2f} MB on disk ({offline['bytes_per_row']} bytes per row in the shards, "
            f"against "
            f"{offline['dense_bf16_bytes_per_row']} for the full bf16 row of this {offline['vocab']}-token vocabulary: "
            f"top-K storage pays off for large vocabularies only), built in {offline['cache_seconds']:.1f} s; the "
            f"offline vcrd student trains from it alone (same initial weights, batches and steps as the online vcrd "
            f"student), the tail completed uniformly (SPEC §10).")
    out.append(f"LALP selection scores the traces under the untrained initial student (the method scores under "
               f"the student), where every trace scores close to log(1/V): it keeps {kept_right:.0%} right traces "
               f"against {trace_right:.0%} of all traces. Greedy answers are terse "
               "(verbose share of greedy answers: " + ", ".join(
                   f"{k} {v:.0%}" for k, v in results["verbose_share"].items()) + ").")
    return out


def _plot(curves: Dict[str, Dict[str, List[float]]], teacher_losses: List[float], path: Path) -> bool:
    """``curves.png``: the teacher's loss, each student's loss and mean weights; ``False`` without matplotlib."""
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
    """``x`` formatted, ``-`` for ``None`` or NaN."""
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def write_report(s: DemoSettings, results: Dict, curves: Dict[str, Dict[str, List[float]]],
                 teacher_losses: List[float]) -> None:
    """``results.json``, ``curves.png`` and ``results.md`` in ``s.out``; the tables and notes printed."""
    out = Path(s.out)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    header, table, rank_table = summary(s, results), accuracy_table(s, results), ranking_table(results["style_ranking"])
    said = notes(s, results)
    plotted = _plot(curves, teacher_losses, out / "curves.png")
    md = "\n".join(["# vcrd demo results", "", header, "", *table, "",
                    "The two teacher styles ranked as two teachers (`rank_teachers`, window 4):", "", *rank_table, "",
                    *[n + "\n" for n in said],
                    "![curves](curves.png)" if plotted else "", "",
                    "Command: `vcrd demo` (what `make demo` runs); the same seed and thread count give the same "
                    "table.", ""])
    (out / "results.md").write_text(md)
    print("\n" + header + "\n")
    print("\n".join(table))
    print("\n" + "\n".join(rank_table) + "\n")
    print("\n".join(said))
    print(f"\nwrote {out / 'results.json'}, {out / 'results.md'} and {out / 'curves.png'}")


__all__ = ["OFFLINE", "accuracy_table", "demo_results", "folder_bytes", "head_tail", "notes", "ranking_table",
           "summary", "write_report"]
