"""Issue #17: no silent NaN, crash-safe checkpoints, one run per folder, every check before the work.

One tiny training run (4 steps, checkpoints at 2 and 4) is shared; every other case either fails
before a model loads, or copies that run's folder and damages it (a kill at a random point of a
save leaves a missing or 0-byte file; a crashed rename leaves a ``.tmp`` folder)."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch

from vcrd.app.cli import main
from vcrd.train.data import write_jsonl
from vcrd.train.resume import find_resume_checkpoint
from vcrd.train.run_lock import LOCK_NAME, RunLock
from vcrd.train.signals import signals_exit

from ..helpers import make_workspace, tiny_llama, train_config


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    root, tok = make_workspace(tmp_path_factory.mktemp("rel"), 8)
    nan = tiny_llama(tok, 32, 3)
    with torch.no_grad():
        nan.model.norm.weight.fill_(float("nan"))
    nan.save_pretrained(root / "nan_student")
    tok.save_pretrained(root / "nan_student")
    assert main(["train", "--config", train_config(root, "base")]) == 0
    return root


def copy_run(ws, name):
    shutil.copytree(ws / "base", ws / name, ignore=shutil.ignore_patterns("final"))
    return ws / name


# ------------------------------------------------------------------ checks before any work (exit 2)
@pytest.mark.parametrize("lr", [float("inf"), 1e300, float("nan"), 0])
def test_learning_rate_must_be_finite_and_sane(ws, capsys, lr):
    path = train_config(ws, "lr")
    text = open(path).read().replace('"learning_rate": 0.003', f'"learning_rate": {json.dumps(lr)}')
    open(path, "w").write(text)
    assert main(["train", "--config", path]) == 2
    assert "learning_rate" in capsys.readouterr().err and not (ws / "lr").exists()


def test_input_files_are_named_not_tracebacks(ws, capsys, monkeypatch):
    bad = ws / "latin1.jsonl"
    bad.write_bytes(b'{"prompt": "p", "response": "r"}\n{"prompt": "caf\xe9", "response": "r"}\n')
    assert main(["train", "--config", train_config(ws, "enc", data=str(bad))]) == 2
    assert f"{bad}:2: not UTF-8" in capsys.readouterr().err
    cfg = ws / "latin1.json"
    cfg.write_bytes(b'{\n "teacher": "caf\xe9"}\n')
    assert main(["train", "--config", str(cfg)]) == 2
    assert f"{cfg}:2: not UTF-8" in capsys.readouterr().err
    assert main(["train", "--config", train_config(ws, "dir", data=str(ws))]) == 2
    assert "is a directory" in capsys.readouterr().err
    import pathlib

    real_open = pathlib.Path.open

    def denied(self, *a, **k):
        if self.name == "data.jsonl":
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real_open(self, *a, **k)

    monkeypatch.setattr(pathlib.Path, "open", denied)
    assert main(["train", "--config", train_config(ws, "perm")]) == 2
    assert "permission denied" in capsys.readouterr().err
    assert not any((ws / n).exists() for n in ("enc", "dir", "perm"))


def test_truncated_weights_vocabulary_and_positions_refused(ws, capsys):
    broken = ws / "broken_student"
    shutil.copytree(ws / "student", broken, dirs_exist_ok=True)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    assert main(["train", "--config", train_config(ws, "trunc", student=str(broken))]) == 2
    assert f"{weights}: truncated" in capsys.readouterr().err
    from transformers import LlamaConfig, LlamaForCausalLM

    small = LlamaForCausalLM(LlamaConfig(vocab_size=20, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1))
    small.save_pretrained(ws / "small_teacher")
    assert main(["train", "--config", train_config(ws, "vocab", teacher=str(ws / "small_teacher"))]) == 2
    err = capsys.readouterr().err
    assert "teacher: its vocabulary has 20 tokens" in err and "data.jsonl:" in err
    assert main(["train", "--config", train_config(ws, "pos", max_length=4096)]) == 2
    assert "max_position_embeddings=512" in capsys.readouterr().err
    assert not any((ws / n).exists() for n in ("trunc", "vocab", "pos"))


def test_rows_without_loss_are_warned_with_file_line(ws, capsys):
    data = ws / "noloss.jsonl"
    good = json.loads((ws / "data.jsonl").read_text().splitlines()[0])
    data.write_text(json.dumps(good) + "\n" + json.dumps({"prompt": "p", "response": ""}) + "\n"
                    + json.dumps({"prompt": "x" * 300, "response": "r"}) + "\n")
    (ws / "taken").write_text("a file where output_dir should be")  # stops the run right after the data checks
    assert main(["train", "--config", train_config(ws, "taken", data=str(data))]) == 2
    err = capsys.readouterr().err
    assert "2 of 3 data rows carry no loss" in err and f"{data}:2 (empty response)" in err
    assert f"{data}:3 (its prompt is" in err and "not a directory" in err


# ---------------------------------------------------------------------------------- the run lock
def test_second_run_on_a_folder_fails_with_the_holders_pid(ws, capsys):
    out = copy_run(ws, "locked")
    with RunLock(out, print):
        assert main(["train", "--config", train_config(ws, "locked"), "--resume"]) == 2
        assert f"in use by another vcrd train run (pid {os.getpid()}" in capsys.readouterr().err
    assert not (out / LOCK_NAME).exists()


def test_stale_lock_of_a_dead_pid_is_taken_over(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": dead.pid, "host": "h", "started": "t"}))
    said = []
    with RunLock(tmp_path, said.append):
        assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
    assert said and f"stale lock of pid {dead.pid}" in said[0]


# ----------------------------------------------------------------------------------- checkpoints
@pytest.mark.parametrize("damage", ["optimizer.pt:empty", "scheduler.pt:missing", "model.safetensors:cut",
                                    "vcrd_checkpoint.json:missing+trainer_state.json:empty"])
def test_resume_skips_incomplete_checkpoints(ws, damage):
    out = copy_run(ws, f"dmg-{damage.replace(':', '_').replace('+', '_')}")
    for part in damage.split("+"):
        name, how = part.split(":")
        file = out / "checkpoint-4" / name
        if how == "missing":
            file.unlink()
        elif how == "empty":
            file.write_bytes(b"")
        else:
            file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
    said = []
    path, manifest = find_resume_checkpoint(out, said.append)
    assert path.name == "checkpoint-2" and manifest["run"]["preset"] == "vcrd"
    assert "skipping checkpoint-4" in said[0] and name in said[0] and "continuing from" in said[1]


def test_resume_refuses_a_changed_config_unless_allowed(ws, capsys):
    out = copy_run(ws, "changed")
    (out / ".checkpoint-6.tmp-999999").mkdir()  # left by a run killed in the middle of a save
    assert main(["train", "--config", train_config(ws, "changed", learning_rate=1e-2), "--resume"]) == 2
    err = capsys.readouterr().err
    assert "learning_rate: checkpoint 0.003, now 0.01" in err and "--allow-mismatch" in err
    assert main(["train", "--config", train_config(ws, "changed", learning_rate=1e-2), "--resume",
                 "--allow-mismatch"]) == 0  # checkpoint-4 of 4 steps: no step left, only the final save
    err = capsys.readouterr().err
    assert "continuing from" in err and "checkpoint-4" in err and "half-written" in err
    assert (out / "final" / "model.safetensors").is_file()
    assert not [p for p in out.iterdir() if ".tmp" in p.name or p.name == LOCK_NAME]


def test_disk_full_during_a_save_names_it_and_keeps_earlier_checkpoints(ws, capsys, monkeypatch):
    out = ws / "full_disk"
    real_save = torch.save

    def save(obj, f, *a, **k):
        if "checkpoint-4" in str(f) and str(f).endswith("optimizer.pt"):
            with open(f, "wb") as partial:
                partial.write(b"half")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", save)
    assert main(["train", "--config", train_config(ws, "full_disk")]) == 1
    err = capsys.readouterr().err
    assert "saving checkpoint-4 failed (the disk is full)" in err and "optimizer.pt" in err
    assert "earlier checkpoints are intact: checkpoint-2" in err
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-2"]  # no partial folder, no lock
    assert find_resume_checkpoint(out, lambda m: None)[0].name == "checkpoint-2"


# ------------------------------------------------------------------------------ non-finite loss
def test_nan_loss_stops_at_the_first_step_naming_the_data_lines(ws, capsys):
    assert main(["train", "--config", train_config(ws, "nan", student=str(ws / "nan_student"))]) == 1
    err = capsys.readouterr().err
    assert "non-finite loss (nan) at optimizer step 1" in err and f"{ws / 'data.jsonl'}:" in err
    assert not (ws / "nan" / "checkpoint-2").exists()


# ------------------------------------------------------------------------------------ vcrd score
def test_score_nan_is_null_and_output_is_a_normal_file(ws, capsys):
    out = ws / "scored" / "sel.jsonl"
    old = os.umask(0o027)
    try:
        assert main(["score", "--model", str(ws / "nan_student"), "--data", str(ws / "data.jsonl"),
                     "--out", str(out)]) == 0
    finally:
        os.umask(old)
    rows = [json.loads(line) for line in out.read_text().splitlines()]  # strict JSON: no NaN token
    assert rows and all(r["lalp"] is None for r in rows)
    assert "8 response(s) have no finite score" in capsys.readouterr().out
    assert out.stat().st_mode & 0o777 == 0o640
    assert [p.name for p in out.parent.iterdir()] == ["sel.jsonl"]


def test_score_refuses_a_directory_and_long_prompts_before_scoring(ws, capsys):
    args = ["score", "--model", str(ws / "student"), "--data", str(ws / "data.jsonl")]
    assert main(args + ["--out", str(ws)]) == 2
    assert "is a directory" in capsys.readouterr().err
    assert main(args + ["--out", str(ws / "s.jsonl"), "--max-prompt-tokens", "5"]) == 2
    err = capsys.readouterr().err
    assert "longer than the cap of 5 tokens" in err and f"{ws / 'data.jsonl'}:1" in err
    assert not (ws / "s.jsonl").exists()


def test_sigterm_during_a_write_leaves_no_tmp(tmp_path):
    def rows():
        yield {"a": 1}
        os.kill(os.getpid(), signal.SIGTERM)
        yield {"a": 2}

    with pytest.raises(SystemExit) as info, signals_exit():
        write_jsonl(tmp_path / "out.jsonl", rows())
    assert info.value.code == 128 + signal.SIGTERM and list(tmp_path.iterdir()) == []
