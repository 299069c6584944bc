"""``benches/results/quality.json`` (issue 26's committed per-seed results): the per-seed values reproduce the
summaries stored beside them and the README's headline, with statistics written here (not vcrd.app.quality's)."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "benches" / "results" / "quality.json"
# two-sided 95 % quantiles of Student's t by degrees of freedom (printed tables)
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
        11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131}


def interval(xs):
    return statistics.fmean(xs), T975[len(xs) - 1] * statistics.stdev(xs) / math.sqrt(len(xs))


def groups():
    saved = json.loads(RESULTS.read_text())
    yield "two_step", saved
    if "totals" in saved:
        yield "totals", saved["totals"]


@pytest.mark.parametrize("task", ["two_step", "totals"])
def test_the_stored_summaries_follow_from_the_per_seed_values(task):
    found = dict(groups())
    if task not in found:
        pytest.skip(f"no {task} results committed")
    g = found[task]
    seeds = [str(s) for s in g["evaluation_seeds"]]
    kd = [g["per_seed"]["kd"][s] for s in seeds]
    for row in g["summary"]:
        values = [g["per_seed"][row["arm"]][s] for s in seeds]
        assert row["n_seeds"] == len(seeds) and row["accuracy"] == pytest.approx(interval(values), rel=1e-9)
        if row["arm"] != "kd":
            m, h = interval([a - b for a, b in zip(values, kd)])
            assert row["vs_kd"] == pytest.approx((m, h), rel=1e-9)
            assert row["verdict"] == ("helps" if m - h > 0 else "hurts" if m + h < 0 else "cannot tell")


def test_tuning_and_evaluation_seeds_are_disjoint():
    saved = json.loads(RESULTS.read_text())
    assert saved["tuning_seeds"] and not set(saved["tuning_seeds"]) & set(saved["evaluation_seeds"])
    if "totals" in saved:
        assert not set(saved["tuning_seeds"]) & set(saved["totals"]["evaluation_seeds"])


def test_the_readme_headline_states_the_paired_difference():
    readme = (ROOT / "README.md").read_text()
    for task, g in groups():
        values = {a: [g["per_seed"][a][str(s)] for s in g["evaluation_seeds"]] for a in ("kd", "vcrd")}
        m, h = interval([a - b for a, b in zip(values["vcrd"], values["kd"])])
        stated = f"{100 * m:+.1f} ± {100 * h:.1f} points"
        assert stated in readme, (task, stated)
