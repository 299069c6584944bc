"""VCRDTrainer under real data parallelism: two CPU processes (gloo), launched like torchrun
(tests/helpers.spawn: the environment torchrun sets, the group already initialised).

SPEC §11: each rank normalises by the token count over all ranks and the Trainer's DDP averages the
ranks' gradients, so one optimizer step equals the single-process step on the union of the ranks'
batches (exactly for ``normalize="tokens"``; for ``"weights"``, Σ_r (n_r / M)·∇(weighted mean of rank
r), as SPEC §6). The expected steps are computed by hand in this process from the batches each rank
actually received.
"""

from __future__ import annotations

import copy
import json
import os

import torch

from vcrd.train.data import DistillCollator
from vcrd.train.trainer import distill_loss

from ..helpers import KD, WEIGHTED, assert_same_step, make_setup, spawn, student_like, trainer_for

CONFIGS = {"kd": KD, "vcrd": WEIGHTED}
LR = 0.5


class _RecordingCollator(DistillCollator):
    """Remembers the prompts of every batch it builds (which examples this rank trained on)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.seen = []

    def __call__(self, examples):
        self.seen.append([e.prompt for e in examples])
        return super().__call__(examples)


def _worker(rank: int, world: int, out: str) -> None:
    tok, examples, teacher, _ = make_setup()
    init = student_like(teacher, 21)
    record = {}
    for name, cfg in CONFIGS.items():
        student = copy.deepcopy(init)
        collate = _RecordingCollator(tok, max_length=192)
        trainer = trainer_for(student, teacher, collate, examples[:4], os.path.join(out, name), cfg, max_steps=1,
                              per_device_train_batch_size=2, learning_rate=LR, ddp_backend="gloo")
        assert trainer.args.world_size == world
        trainer.train()
        record[name] = collate.seen[0]
        torch.save({n: p.detach() for n, p in student.named_parameters()}, os.path.join(out, f"{name}{rank}.pt"))
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(record, f)


def test_trainer_ddp_two_processes_equals_single_process_step(tmp_path):
    world = 2
    spawn(_worker, world, str(tmp_path))
    tok, examples, teacher, _ = make_setup()
    init = student_like(teacher, 21)
    collate = DistillCollator(tok, max_length=192)
    by_prompt = {e.prompt: e for e in examples}
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(world)]
    for name, cfg in CONFIGS.items():
        shards = [collate([by_prompt[p] for p in r[name]]) for r in ranks]
        assert sorted(p for r in ranks for p in r[name]) == sorted(e.prompt for e in examples[:4])
        counts = [int((b["labels"][:, 1:] != -100).sum()) for b in shards]
        by_hand = copy.deepcopy(init)
        for batch, n in zip(shards, counts):
            loss, _ = distill_loss(by_hand, teacher, batch, cfg)  # this shard's own mean
            (loss * n / sum(counts)).backward()
        expected = {n: p.detach() - LR * p.grad for n, p in by_hand.named_parameters()}
        params = [torch.load(tmp_path / f"{name}{r}.pt") for r in range(world)]
        for key, value in params[0].items():  # the ranks end with identical parameters
            assert all(torch.equal(value, p[key]) for p in params[1:]), (name, key)
        trained = copy.deepcopy(init)
        trained.load_state_dict(params[0], strict=False)
        assert_same_step(trained, expected, init, f"DDP {name}")
