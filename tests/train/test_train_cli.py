"""`vcrd train --config`: runs, checkpoints, resumes to the same weights, refuses bad input safely."""

from __future__ import annotations

import pytest

from vcrd.app.cli import main

from ..helpers import make_workspace, saved_weights, train_config


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    return make_workspace(tmp_path_factory.mktemp("train"), 16)[0]


def test_resume_gives_the_weights_of_an_uninterrupted_run(workspace):
    import shutil

    assert main(["train", "--config", train_config(workspace, "full")]) == 0
    assert (workspace / "full" / "checkpoint-2").is_dir() and (workspace / "full" / "checkpoint-4").is_dir()
    # a run stopped after step 2 of 4: its output folder holds only checkpoint-2
    shutil.copytree(workspace / "full" / "checkpoint-2", workspace / "cut" / "checkpoint-2")
    assert main(["train", "--config", train_config(workspace, "cut"), "--resume"]) == 0
    full, cut = saved_weights(workspace / "full" / "final"), saved_weights(workspace / "cut" / "final")
    assert full.keys() == cut.keys()
    worst = max((cut[name] - full[name]).abs().max().item() for name in full)
    assert worst <= 1e-6, worst


@pytest.mark.parametrize("change,message", [
    ({"max_steps": 0}, "max_steps"), ({"preset": "gkd"}, "preset"), ({"loss": {"temperature": -1}}, "temperature"),
    ({"loss": {"tempreature": 2}}, "loss"), ({"teacher": "nowhere"}, "teacher"), ({"epochs": 3}, "unknown keys"),
])
def test_bad_config_is_refused_and_checkpoints_stay(workspace, capsys, change, message):
    out = workspace / "full"
    before = sorted(p.name for p in out.iterdir()) if out.exists() else None
    assert main(["train", "--config", train_config(workspace, "full", **change)]) == 2
    assert message in capsys.readouterr().err
    assert (sorted(p.name for p in out.iterdir()) if out.exists() else None) == before


def test_bad_data_line_is_named(workspace, capsys):
    bad = workspace / "bad.jsonl"
    bad.write_text('{"prompt": "p", "response": "r"}\n{"prompt": 1, "response": "r"}\n')
    assert main(["train", "--config", train_config(workspace, "badrun", data=str(bad))]) == 2
    assert f"{bad}:2" in capsys.readouterr().err and not (workspace / "badrun").exists()
