"""The main job end to end at a tiny size: it runs, writes its report, and the same seed repeats it."""

from __future__ import annotations

import json

from vcrd.app.cli import build_parser, main
from vcrd.app.demo import DemoSettings, run_demo
from vcrd.app.demo_eval import style_of

TINY = dict(n_train=8, n_trace=4, n_eval=4, teacher_steps=3, student_steps=3, max_new_tokens=12, eval_batch=8)


def test_demo_runs_writes_results_and_repeats(tmp_path, capsys):
    a = run_demo(DemoSettings(**TINY, out=str(tmp_path / "a")))
    b = run_demo(DemoSettings(**TINY, offline_k=0, out=str(tmp_path / "b")))  # no offline student
    out = capsys.readouterr().out
    assert "1 torch thread(s)" in out and "preset discord" in out
    saved = json.loads((tmp_path / "a" / "results.json").read_text())
    for key in ("accuracy", "n_eval", "seconds", "cpu_seconds", "threads", "loss", "load_average", "style_ranking",
                "teacher_trace_accuracy"):
        assert key in saved, key
    assert set(saved["accuracy"]) == {"teacher", "kd", "discord", "vcrd", "vcrd_offline"} and saved["n_eval"] == 4
    offline = saved["offline"]  # the student trained from the teacher's top-64 cache (SPEC §10)
    assert offline["k"] == 64 and offline["rows"] > 0 and offline["bytes_per_row"] == 6 * 64 + 4
    assert offline["shard_bytes"] >= offline["rows"] * offline["bytes_per_row"] and offline["cache_bytes"] > 0
    # it trained from the cache: near the online vcrd student's losses (same start, data and batches; the
    # teacher's top-64 of V=100 and a uniform tail), not equal to them
    online, cached = saved["loss"]["vcrd"], saved["loss"]["vcrd_offline"]
    assert cached != online and all(abs(c - o) <= 0.1 * abs(o) for c, o in zip(cached, online)), (cached, online)
    assert all(len(v) == 2 for v in saved["loss"].values()) and saved["threads"] == 1
    assert all(0.0 <= v <= 1.0 for v in saved["accuracy"].values())
    # determinism: the same seed gives the same table, and the offline student changes no other row
    assert "vcrd_offline" not in b["accuracy"] and b["offline"] is None
    assert a["accuracy"] == {**b["accuracy"], "vcrd_offline": a["accuracy"]["vcrd_offline"]}
    assert a["loss"] == {**b["loss"], "vcrd_offline": a["loss"]["vcrd_offline"]}
    assert a["teacher_trace_accuracy"] == b["teacher_trace_accuracy"]
    md = (tmp_path / "a" / "results.md").read_text()
    assert "| student (64-d, 2 layers), preset vcrd |" in md and "preset vcrd, offline top-64 cache |" in md
    assert (tmp_path / "a" / "curves.png").exists()
    assert "as two teachers" in md


def test_demo_cli_defaults_are_the_settings_defaults():
    args = build_parser().parse_args(["demo"])
    d = DemoSettings()
    names = ("n_train", "n_trace", "n_eval", "teacher_steps", "student_steps", "threads", "offline_k")
    assert [getattr(args, n) for n in names] == [getattr(d, n) for n in names]


def test_style_of():
    assert style_of("3+4=7\n\n7-2=5\n\nAnswer: 5") == "terse"
    assert style_of("Ana gets 4 more, so 3+4=7.\n\nAnswer: 7") == "verbose"


def test_quick_demo_prints_every_preset(capsys):
    assert main(["demo", "--quick", "--batch", "1", "--seq-len", "32", "--vocab", "300", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert all(f"\n{p} " in out for p in ("kd", "discord", "vcrd"))
