"""Issue #17: a real SIGKILL at any moment of a ``vcrd train`` run, saves included, loses nothing.

A run is started as its own process and killed with SIGKILL (no cleanup code runs) at a moment
chosen by watching its output folder: while a checkpoint is being staged (``.checkpoint-N.tmp-PID``
exists), a few milliseconds later (the fsync/rename), or at a random moment between steps. Then
``--resume`` must continue from the newest complete checkpoint and end with exactly the weights of
an uninterrupted run, or refuse clearly when nothing complete exists yet. Every run is its own
``vcrd train`` process, as users start it (the test process's torch settings, e.g. a thread count
changed by an earlier test, would change the last bits of the arithmetic).
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

from vcrd.train.checkpoint_folders import STAGING_RE
from vcrd.train.resume import find_resume_checkpoint

from ..helpers import make_workspace, saved_weights, train_config

STEPS = 6


def _train(root, name: str, *extra: str) -> subprocess.Popen:
    """``vcrd train`` on run ``name`` (6 steps, a checkpoint after each) in a fresh process."""
    cmd = [sys.executable, "-m", "vcrd.app.cli", "train", "--config",
           train_config(root, name, max_steps=STEPS, save_steps=1), *extra]
    return subprocess.Popen(cmd, env={**os.environ, "PYTHONPATH": os.getcwd()}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """The workspace and the final weights of an uninterrupted run."""
    root = make_workspace(tmp_path_factory.mktemp("kill"), 24)[0]
    whole = _train(root, "whole")
    assert whole.wait(timeout=600) == 0, whole.stderr.read()
    return root, saved_weights(root / "whole" / "final")


def _staging(out) -> list:
    try:
        return [e.name for e in os.scandir(out) if STAGING_RE.match(e.name)]
    except FileNotFoundError:
        return []


def _kill(root, name: str, moment: str, seed: int):
    """Start a run in a fresh process and SIGKILL it at ``moment``; return its output folder."""
    out = root / name
    proc = _train(root, name)
    rng = random.Random(seed)
    target = rng.randint(2, STEPS - 1)  # kill while checkpoint-target is written (or around it)
    deadline = time.monotonic() + 300
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            staged = _staging(out)
            if moment == "random-between-saves" and (out / f"checkpoint-{target}").is_dir():
                time.sleep(rng.uniform(0.0, 0.05))
                break
            if any(s.startswith(f".checkpoint-{target}.") for s in staged):
                if moment == "later-in-the-save":
                    time.sleep(rng.uniform(0.001, 0.01))
                break
            time.sleep(0.0005)
        assert proc.poll() is None, f"the run ended (exit {proc.returncode}) before the kill at {moment}"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    return out


def _kill_and_resume(run, moment: str, seed: int):
    root, whole = run
    name = f"killed-{moment}-{seed}"
    out = _kill(root, name, moment, seed)
    if moment == "while-staging":
        assert _staging(out), "the kill was meant to land while a checkpoint was staged"
    said = []
    newest, _ = find_resume_checkpoint(out, said.append)  # what --resume is going to use
    resume = _train(root, name, "--resume")
    err = resume.communicate(timeout=600)[1]
    assert resume.returncode == 0, err
    assert f"continuing from {out / newest.name} (step" in err, err
    assert not _staging(out), "a staging folder of the killed run was left behind after the resume"
    resumed = saved_weights(out / "final")
    assert resumed.keys() == whole.keys()
    different = [k for k in whole if not torch.equal(resumed[k], whole[k])]
    assert not different, f"resumed from {newest.name}: {len(different)} tensors differ from the uninterrupted run"


@pytest.mark.parametrize("moment,seed", [("while-staging", 0), ("later-in-the-save", 1),
                                         ("random-between-saves", 2)])
def test_resume_after_sigkill_is_bit_identical(run, moment, seed):
    _kill_and_resume(run, moment, seed)


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(3, 13))
def test_resume_after_sigkill_at_random_moments(run, seed):
    moment = random.Random(seed).choice(["while-staging", "later-in-the-save", "random-between-saves"])
    _kill_and_resume(run, moment, seed)
