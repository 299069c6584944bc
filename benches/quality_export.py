"""Collect `vcrd bench-quality` runs into ``benches/results/quality.json`` and print the verdict tables.

    python benches/quality_export.py --two-step runs/q-eval-100 runs/q-eval-106 \
        --totals runs/task2-100 runs/task2-106 --tuning runs/sens-200 --out benches/results/quality.json

Only seeds on which every arm of a run finished are kept (a run stopped mid-seed leaves that seed
out, never a partial pairing). For each task: per arm the mean held-out exact match ± 95 % t interval
over seeds, the paired difference to ``kd`` (mean ± 95 % t interval of the per-seed differences) and
a verdict decided by that interval alone: ``helps`` (it lies above 0), ``hurts`` (below 0) or
``cannot tell`` (it covers 0).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Dict, List, Sequence

from vcrd.app.quality import mean_ci, paired_difference


def complete_seeds(dirs: Sequence[str]) -> Dict[str, object]:
    """``{"arms": [...], "per_seed": {arm: {seed: accuracy}}, "seeds": [...]}`` over the seeds every arm finished."""
    arms: List[str] = []
    per_seed: Dict[str, Dict[str, float]] = {}
    for d in dirs:
        r = json.loads((Path(d) / "results.json").read_text())
        arms = arms or list(r["arms"])
        if list(r["arms"]) != arms:
            raise ValueError(f"{d}: arms {r['arms']} differ from {arms}")
        for seed, by_arm in r["per_seed"].items():
            if all(a in by_arm for a in arms):
                per_seed[seed] = {a: by_arm[a]["accuracy"] for a in arms}
    seeds = sorted(per_seed, key=int)
    return {"arms": arms, "seeds": [int(s) for s in seeds],
            "per_seed": {a: {s: per_seed[s][a] for s in seeds} for a in arms}}


def verdict(lo: float, hi: float) -> str:
    return "helps" if lo > 0 else "hurts" if hi < 0 else "cannot tell"


def summary(group: Dict[str, object]) -> List[Dict[str, object]]:
    """Per arm: accuracy mean ± half-width, and (arms other than kd) the paired difference to kd and its verdict."""
    rows = []
    seeds = [str(s) for s in group["seeds"]]
    kd = [group["per_seed"]["kd"][s] for s in seeds]
    for arm in group["arms"]:
        acc = [group["per_seed"][arm][s] for s in seeds]
        row: Dict[str, object] = {"arm": arm, "n_seeds": len(seeds), "accuracy": mean_ci(acc)}
        if arm != "kd":
            m, h = paired_difference(acc, kd)
            row.update(vs_kd=(m, h), verdict=verdict(m - h, m + h))
        rows.append(row)
    return rows


def table(rows: List[Dict[str, object]]) -> str:
    out = ["| arm | seeds | held-out exact match, % (mean ± 95% CI) | arm − kd, points (paired, mean ± 95% CI) "
           "| verdict |",
           "|---|---|---|---|---|"]
    for r in rows:
        m, h = r["accuracy"]
        diff = f"{100 * r['vs_kd'][0]:+.1f} ± {100 * r['vs_kd'][1]:.1f}" if "vs_kd" in r else "-"
        out.append(f"| {r['arm']} | {r['n_seeds']} | {100 * m:.1f} ± {100 * h:.1f} | {diff} | "
                   f"{r.get('verdict', '-')} |")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--two-step", nargs="+", required=True, help="bench-quality output folders, task two_step")
    ap.add_argument("--totals", nargs="*", default=[], help="bench-quality output folders, task totals")
    ap.add_argument("--tuning", nargs="*", default=[], help="bench-quality output folders of the tuning seeds")
    ap.add_argument("--out", default="benches/results/quality.json")
    args = ap.parse_args(argv)
    main_task = complete_seeds(args.two_step)
    tuning = complete_seeds(args.tuning) if args.tuning else {"seeds": [], "per_seed": {}, "arms": []}
    if set(main_task["seeds"]) & set(tuning["seeds"]):
        raise ValueError("tuning and evaluation seeds overlap")
    result = {"task": "two_step", "per_seed": main_task["per_seed"], "evaluation_seeds": main_task["seeds"],
              "tuning_seeds": tuning["seeds"], "arms": main_task["arms"], "summary": summary(main_task),
              "tuning": tuning}
    print(f"two_step, evaluation seeds {main_task['seeds']}:\n{table(result['summary'])}\n")
    if args.totals:
        totals = complete_seeds(args.totals)
        result["totals"] = {**totals, "evaluation_seeds": totals["seeds"], "summary": summary(totals)}
        print(f"totals, evaluation seeds {totals['seeds']}:\n{table(result['totals']['summary'])}")
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
