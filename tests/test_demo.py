"""The main job end to end at a tiny size: it runs, writes its report, and the same seed repeats it."""

from __future__ import annotations

import json

from vcrd.app.cli import main


def test_demo_runs_writes_results_and_repeats(tmp_path, capsys):
    args = ["demo", "--n-train", "8", "--n-eval", "4", "--teacher-steps", "3", "--student-steps", "3"]
    assert main(args + ["--out", str(tmp_path / "a")]) == 0
    assert main(args + ["--out", str(tmp_path / "b")]) == 0
    out = capsys.readouterr().out
    assert "student, preset kd" in out and "student, preset vcrd" in out
    a = json.loads((tmp_path / "a" / "results.json").read_text())
    b = json.loads((tmp_path / "b" / "results.json").read_text())
    assert a["accuracy"] == b["accuracy"] and a["teacher_trace_accuracy"] == b["teacher_trace_accuracy"]
    assert all(0.0 <= v <= 1.0 for v in a["accuracy"].values())
    md = (tmp_path / "a" / "results.md").read_text()
    assert "| student, preset vcrd |" in md and (tmp_path / "a" / "curves.png").exists()


def test_quick_demo_prints_every_preset(capsys):
    assert main(["demo", "--quick", "--batch", "1", "--seq-len", "32", "--vocab", "300", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert all(f"\n{p} " in out for p in ("kd", "discord", "vcrd"))
