"""The quality benchmark: its statistics on known numbers, and a tiny end-to-end run."""

from __future__ import annotations

import json
import math
import re

import pytest

from vcrd.app.cli import main
from vcrd.app.quality import (
    ARMS,
    arm_config,
    mean_ci,
    paired_difference,
    parse_arm,
    split_arms,
    summarize,
    t_quantile,
    varied_right_traces,
    vary_arms,
)
from vcrd.core.config import VCRDConfig


def test_t_quantiles():
    assert t_quantile(1) == 12.706 and t_quantile(2) == 4.303 and t_quantile(30) == 2.042
    assert t_quantile(40) == pytest.approx(2.021, abs=1e-3)
    assert t_quantile(120) == pytest.approx(1.980, abs=1e-3)
    with pytest.raises(ValueError):
        t_quantile(0)


def test_mean_ci_and_paired_difference_on_known_numbers():
    m, h = mean_ci([1.0, 2.0, 3.0])  # sd 1, n 3: 4.303 / sqrt(3)
    assert m == 2.0 and h == pytest.approx(4.303 / math.sqrt(3))
    m, h = mean_ci([0.5])
    assert m == 0.5 and math.isnan(h)
    m, h = paired_difference([0.5, 0.6, 0.7], [0.4, 0.4, 0.6])  # differences 0.1, 0.2, 0.1
    assert m == pytest.approx(0.4 / 3) and h == pytest.approx(4.303 * math.sqrt(1 / 300) / math.sqrt(3))
    m, h = paired_difference([0.3, 0.5], [0.2, 0.4])  # a constant shift: zero spread
    assert m == pytest.approx(0.1) and h == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError):
        paired_difference([1.0], [1.0, 2.0])


def test_summary_pairs_seeds_and_arms_build_valid_configs():
    per_seed = {"0": {"kd": {"accuracy": 0.5, "loss": [4.0, 1.0]}, "vcrd": {"accuracy": 0.6, "loss": [4.0, 2.0]}},
                "1": {"kd": {"accuracy": 0.3, "loss": [4.0, 1.0]}, "vcrd": {"accuracy": 0.5, "loss": [4.0, 2.0]}}}
    rows = {r["arm"]: r for r in summarize(per_seed, ["kd", "vcrd"], [0, 1])}
    assert rows["vcrd"]["vs_kd"][0] == pytest.approx(0.15) and rows["kd"]["accuracy"][0] == pytest.approx(0.4)
    assert rows["vcrd"]["loss_drop"][0] == pytest.approx(0.5) and "vs_kd" not in rows["kd"]
    for name in ARMS:
        arm_config(name)
    assert arm_config("per-token window").window_steps is None and arm_config("window 1").window_steps == 1


def test_bench_quality_tiny_end_to_end(tmp_path, capsys):
    out = tmp_path / "q"
    args = ["bench-quality", "--seeds", "2", "--arms", "kd,vcrd,random selection,offline vcrd", "--n-train", "8",
            "--n-trace",
            "4", "--n-eval", "4", "--teacher-steps", "2", "--student-steps", "2", "--max-new-tokens", "8",
            "--out", str(out)]
    assert main(args) == 0
    saved = json.loads((out / "results.json").read_text())
    arms = ["kd", "vcrd", "random selection", "offline vcrd"]
    assert saved["seeds"] == [0, 1] and set(saved["per_seed"]["1"]) == set(arms)
    assert [r["arm"] for r in saved["summary"]] == arms
    for seed in ("0", "1"):  # the top-64 cache of a 100-token vocabulary keeps nearly all the teacher's mass:
        live, cached = saved["per_seed"][seed]["vcrd"]["loss"], saved["per_seed"][seed]["offline vcrd"]["loss"]
        assert cached[0] == pytest.approx(live[0], rel=0.05) and cached[0] != live[0]  # same batches, top-K teacher
    md = (out / "results.md").read_text()
    assert "Δ vs kd" in md and "| random selection |" in md and "teacher's top-64 cache" in md
    assert main(["bench-quality", "--arms", "nope", "--out", str(out)]) == 2


def test_bench_quality_merges_runs_over_other_seeds(tmp_path):
    base = ["bench-quality", "--seeds", "1", "--arms", "kd,vcrd", "--n-train", "8", "--n-trace", "4", "--n-eval", "4",
            "--teacher-steps", "2", "--student-steps", "2", "--max-new-tokens", "8"]
    assert main(base + ["--first-seed", "0", "--out", str(tmp_path / "s0")]) == 0
    assert main(base + ["--first-seed", "1", "--out", str(tmp_path / "s1")]) == 0
    assert main(["bench-quality", "--merge", str(tmp_path / "s0"), str(tmp_path / "s1"), "--out",
                 str(tmp_path / "all")]) == 0
    saved = json.loads((tmp_path / "all" / "results.json").read_text())
    assert saved["seeds"] == [0, 1] and saved["summary"][1]["n_seeds"] == 2 and "vs_kd" in saved["summary"][1]
    assert main(["bench-quality", "--merge", str(tmp_path / "s0"), str(tmp_path / "s0"), "--out",
                 str(tmp_path / "bad")]) == 2
    # a part interrupted before its second seed started (it asked for seeds 0-1), that seed rerun elsewhere
    cut = json.loads((tmp_path / "s0" / "results.json").read_text())
    cut["seeds"] = [0, 1]
    (tmp_path / "cut").mkdir()
    (tmp_path / "cut" / "results.json").write_text(json.dumps(cut))
    assert main(["bench-quality", "--merge", str(tmp_path / "cut"), str(tmp_path / "s1"), "--out",
                 str(tmp_path / "resumed")]) == 0
    assert json.loads((tmp_path / "resumed" / "results.json").read_text())["per_seed"] == saved["per_seed"]


def test_arm_specs_override_config_fields():
    assert parse_arm(" vcrd [validity_tau=0.5, window_steps=None]") == ("vcrd", {"validity_tau": 0.5,
                                                                               "window_steps": None})
    assert split_arms("kd,vcrd[validity=expected,correction=False],per-token window") == (
        "kd", "vcrd[validity=expected,correction=False]", "per-token window")
    assert vary_arms("window_steps=2, 8") == ("vcrd[window_steps=2]", "vcrd[window_steps=8]")
    assert arm_config("vcrd[validity_tau=0.5]") == VCRDConfig(validity_tau=0.5)
    assert arm_config("per-token window[window_steps=2]") == VCRDConfig(window_steps=2)  # the spec's value wins
    assert arm_config("kd[temperature=2]") == VCRDConfig.preset("kd", temperature=2.0)
    for bad, says in [("vcrd[tau=1]", "'tau=1'"), ("vcrd[validity_tau=1,validity_tau=2]", "validity_tau=2"),
                      ("nope", "'nope'"), ("vcrd[validity_tau=-1]", "validity_tau: expected a number > 0"),
                      ("vcrd[window_steps=2.5]", "window_steps"), ("vcrd[validity_tau", "vcrd")]:
        with pytest.raises(ValueError, match=re.escape(says)):
            split_arms(bad)
    with pytest.raises(ValueError, match="vary: expected FIELD=VALUE"):
        vary_arms("validity_tau")


def test_bench_quality_override_arms_and_task_end_to_end(tmp_path):
    out = tmp_path / "q"
    as_kd = "vcrd[validity=None,correction=False,normalize=tokens]"  # the kd preset, reached by overrides
    args = ["bench-quality", "--seeds", "1", "--arms", f"kd,vcrd,{as_kd}", "--vary", "validity_tau=0.5",
            "--task", "totals", "--n-train", "8", "--n-trace", "4", "--n-eval", "4", "--teacher-steps", "2",
            "--student-steps", "3", "--max-new-tokens", "8", "--out", str(out)]
    assert main(args) == 0
    saved = json.loads((out / "results.json").read_text())
    assert saved["arms"] == ["kd", "vcrd", as_kd, "vcrd[validity_tau=0.5]"] and saved["settings"]["task"] == "totals"
    runs = saved["per_seed"]["0"]
    assert runs[as_kd]["loss"] == runs["kd"]["loss"] and runs["vcrd"]["loss"] != runs["kd"]["loss"]
    assert "vs_vcrd" in saved["summary"][3] and "validity_tau=0.5" in (out / "results.md").read_text()
    assert "Task totals" in (out / "results.md").read_text()
    assert main(["bench-quality", "--vary", "validity_tau=0", "--out", str(out)]) == 2
    assert main(["bench-quality", "--arms", "vcrd[window_steps=2]", "--vary", "window_steps=2", "--out", str(out)]) == 2


def test_varied_right_traces_counts_problems_reaching_the_answer_by_other_steps():
    traces = ["4+3=7\n\n7+5=12\n\nAnswer: 12", "5+3=8\n\n8+4=12\n\nAnswer: 12",  # problem 0: two orders
              "2+2=4\n\n4+1=5\n\nAnswer: 5", "Ana and Ben have 2+2=4, so far.\n\nWith Eli's 1, so 4+1=5.\n\nAnswer: 5",
              "1+1=2\n\nAnswer: 2", "1+1=3\n\nAnswer: 3",  # problem 2: one right trace only
              "3+3=6\n\nAnswer: 6", "3+3=6\n\n6-1=5\n\nAnswer: 5"]  # problem 3: a longer right trace
    problem_of, right = [0, 0, 1, 1, 2, 2, 3, 3], [True, True, True, True, True, False, True, True]
    assert varied_right_traces(traces, problem_of, right) == pytest.approx(2 / 3)  # problems 0 and 3 of 0, 1, 3
    assert varied_right_traces(traces[:4], problem_of[:4], [True, False, True, True]) == 0.0
