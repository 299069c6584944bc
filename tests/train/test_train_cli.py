"""`vcrd train --config`: runs, checkpoints, resumes to the same weights, refuses bad input safely."""

from __future__ import annotations

import json

import pytest

from vcrd.app.cli import main
from vcrd.app.synthetic import make_dataset
from vcrd.app.tokenizer import build_char_tokenizer

from .test_trainer import tiny_llama


def make_workspace(root, n_rows: int):
    """A teacher and a student model folder (with the char tokenizer) and ``n_rows`` data lines in ``root``."""
    tok = build_char_tokenizer()
    for name, hidden, seed in (("teacher", 48, 1), ("student", 32, 2)):
        tiny_llama(tok, hidden, seed).save_pretrained(root / name)
        tok.save_pretrained(root / name)
    rows = [{"prompt": p.question, "response": p.solution("terse")} for p in make_dataset(n_rows, seed=5)]
    (root / "data.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return root, tok


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    return make_workspace(tmp_path_factory.mktemp("train"), 16)[0]


def config(root, out, **over):
    cfg = {"teacher": str(root / "teacher"), "student": str(root / "student"), "data": str(root / "data.jsonl"),
           "output_dir": str(root / out), "max_steps": 4, "batch_size": 4, "save_steps": 2, "logging_steps": 1,
           "learning_rate": 3e-3, "max_length": 256, **over}
    path = root / f"{out}.json"
    path.write_text(json.dumps(cfg))
    return str(path)


def weights(folder):
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def test_resume_gives_the_weights_of_an_uninterrupted_run(workspace):
    import shutil

    assert main(["train", "--config", config(workspace, "full")]) == 0
    assert (workspace / "full" / "checkpoint-2").is_dir() and (workspace / "full" / "checkpoint-4").is_dir()
    # a run stopped after step 2 of 4: its output folder holds only checkpoint-2
    shutil.copytree(workspace / "full" / "checkpoint-2", workspace / "cut" / "checkpoint-2")
    assert main(["train", "--config", config(workspace, "cut"), "--resume"]) == 0
    full, cut = weights(workspace / "full" / "final"), weights(workspace / "cut" / "final")
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
    assert main(["train", "--config", config(workspace, "full", **change)]) == 2
    assert message in capsys.readouterr().err
    assert (sorted(p.name for p in out.iterdir()) if out.exists() else None) == before


def test_bad_data_line_is_named(workspace, capsys):
    bad = workspace / "bad.jsonl"
    bad.write_text('{"prompt": "p", "response": "r"}\n{"prompt": 1, "response": "r"}\n')
    assert main(["train", "--config", config(workspace, "badrun", data=str(bad))]) == 2
    assert f"{bad}:2" in capsys.readouterr().err and not (workspace / "badrun").exists()
