"""`vcrd train --config` under `torchrun --standalone --nproc_per_node 2` (DDP through the Hugging Face
Trainer, gloo on CPU): it finishes, the parameters move, both ranks end with the same parameters (each
rank prints the SHA-256 of its final parameters; the test recomputes it from the saved model), the
checkpoints are written once (rank 0's files plus one RNG state per rank), a resume on 2 ranks gives the
weights of the uninterrupted run, and a resume with another world size is refused on every rank with
nothing written."""

from __future__ import annotations

import json
import re
import shutil

import pytest

from vcrd.app.cli import main
from vcrd.distributed.ranks import parameter_checksum
from vcrd.train.resume import verify_checkpoint

from ..helpers import make_workspace, saved_weights, torchrun, train_config

WORLD = 2


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    return make_workspace(tmp_path_factory.mktemp("torchrun"), 16)[0]


def _train(ws, out: str, *extra: str):
    run = torchrun(WORLD, "vcrd.app.cli", ["train", "--config", train_config(ws, out), *extra])
    return run, run.stdout + run.stderr


def _digests(text: str):
    """``{rank: sha256}`` from the ranks' "rank r/N: final parameters sha256 X" lines."""
    found = re.findall(r"rank (\d+)/(\d+): final parameters sha256 ([0-9a-f]{64})", text)
    assert all(int(w) == WORLD for _, w, _ in found), found
    return {int(r): d for r, _, d in found}


def _listing(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


@pytest.fixture(scope="module")
def full_run(ws):
    """One run of 4 steps of 2 x 4 rows, checkpoints at 2 and 4: its output."""
    run, text = _train(ws, "full")
    assert run.returncode == 0, text[-4000:]
    return text


def test_train_under_torchrun(ws, full_run):
    from transformers import AutoModelForCausalLM

    text = full_run
    digests = _digests(text)
    assert sorted(digests) == list(range(WORLD)) and len(set(digests.values())) == 1, digests
    final = AutoModelForCausalLM.from_pretrained(ws / "full" / "final", local_files_only=True)
    assert parameter_checksum(final) == digests[0]  # the printed checksum is the saved model's
    initial = saved_weights(ws / "student")
    moved = max((saved_weights(ws / "full" / "final")[n] - w).abs().max().item() for n, w in initial.items())
    assert moved > 1e-4, moved  # the parameters moved
    # each checkpoint once, complete: rank 0's files, one RNG state per rank, the world size in the manifest
    assert sorted(p.name for p in (ws / "full").iterdir()) == ["checkpoint-2", "checkpoint-4", "final"]
    for step in (2, 4):
        folder = ws / "full" / f"checkpoint-{step}"
        manifest = verify_checkpoint(folder)
        assert manifest["run"]["world_size"] == WORLD and manifest["step"] == step
        assert {f"rng_state_{r}.pth" for r in range(WORLD)} <= set(manifest["files"])

    # resume on 2 ranks from step 2: the weights of the uninterrupted run
    shutil.copytree(ws / "full" / "checkpoint-2", ws / "cut" / "checkpoint-2")
    run, text = _train(ws, "cut", "--resume")
    assert run.returncode == 0, text[-4000:]
    full, cut = saved_weights(ws / "full" / "final"), saved_weights(ws / "cut" / "final")
    worst = max((cut[n] - full[n]).abs().max().item() for n in full)
    assert worst <= 1e-6, worst
    assert len(set(_digests(text).values())) == 1


def test_resume_with_another_world_size_is_refused_on_every_rank(ws, full_run, capsys):
    # a checkpoint of 2 ranks, resumed by one process
    shutil.copytree(ws / "full" / "checkpoint-4", ws / "two" / "checkpoint-4")
    before = _listing(ws / "two")
    assert main(["train", "--config", train_config(ws, "two"), "--resume"]) == 2
    assert "world_size: checkpoint 2, now 1" in capsys.readouterr().err
    assert _listing(ws / "two") == before
    # a checkpoint of 3 ranks (its manifest says so), resumed by 2: both ranks refuse, nothing is written
    shutil.copytree(ws / "full" / "checkpoint-4", ws / "three" / "checkpoint-4")
    path = ws / "three" / "checkpoint-4" / "vcrd_checkpoint.json"
    manifest = json.loads(path.read_text())
    manifest["run"]["world_size"] = 3
    path.write_text(json.dumps(manifest))
    before = _listing(ws / "three")
    run, text = _train(ws, "three", "--resume")
    assert run.returncode != 0
    # the ranks share one stderr: their lines may run together, so count the messages, not the lines
    refusals = re.findall(r"vcrd train: error: [^\n]*?world_size: checkpoint 3, now 2", text)
    assert len(refusals) == WORLD, text[-4000:]
    assert _listing(ws / "three") == before
