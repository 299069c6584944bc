"""VCRDTrainer's on-policy data (TRL's GKD lmbda / seq_kd): the student's own tokens, labelled as TRL does."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import TrainingArguments

from vcrd.train.data import DistillCollator
from vcrd.train.trainer import VCRDTrainer

from ..helpers import assert_same_step, make_setup, student_like, trainer_for


@pytest.fixture(scope="module")
def setup():
    return make_setup()


def trainer(student, teacher, collate, examples, tmp_path, **kw):
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4, learning_rate=0.5,
                             optim="sgd", lr_scheduler_type="constant", max_grad_norm=0.0, logging_steps=1,
                             save_strategy="no", report_to=[], use_cpu=True, remove_unused_columns=False,
                             train_sampling_strategy="sequential", disable_tqdm=True)
    return VCRDTrainer(model=student, teacher_model=teacher, vcrd_config="kd", args=args, train_dataset=examples,
                       data_collator=collate, **kw)


def test_on_policy_batch_holds_the_students_own_greedy_tokens(setup, tmp_path):
    tok, examples, teacher, _ = setup
    collate = DistillCollator(tok, max_length=1024)
    student = student_like(teacher, 3)
    t = trainer(student, teacher, collate, examples[:4], tmp_path, lmbda=1.0, max_new_tokens=12,
                generation_temperature=0.0)
    batch = collate(examples[:3])
    new = t.generated_batch(student, batch)
    for b in range(3):
        n_prompt = int((batch["labels"][b] == -100).long().argmin())
        prompt = batch["input_ids"][b, :n_prompt]
        want = student.generate(input_ids=prompt[None], attention_mask=torch.ones_like(prompt)[None],
                                max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id,
                                eos_token_id=tok.eos_token_id)[0, n_prompt:]
        if (want == tok.eos_token_id).any():
            want = want[:int((want == tok.eos_token_id).nonzero()[0, 0]) + 1]
        n = len(want)
        assert torch.equal(new["input_ids"][b, :n_prompt], prompt)
        assert torch.equal(new["input_ids"][b, n_prompt:n_prompt + n], want)  # the student's own tokens
        assert torch.equal(new["labels"][b, n_prompt:n_prompt + n], want)  # ... are the labels
        assert (new["labels"][b, :n_prompt] == -100).all() and (new["labels"][b, n_prompt + n:] == -100).all()
        assert int(new["attention_mask"][b].sum()) == n_prompt + n


def test_lmbda_one_trains_on_generated_batches_and_lmbda_zero_is_the_plain_trainer(setup, tmp_path):
    tok, examples, teacher, _ = setup
    collate = DistillCollator(tok, max_length=1024)
    init = student_like(teacher, 4)
    plain, zero, onpol = copy.deepcopy(init), copy.deepcopy(init), copy.deepcopy(init)
    trainer_for(plain, teacher, collate, examples[:8], tmp_path / "plain", "kd", per_device_train_batch_size=4).train()
    trainer(zero, teacher, collate, examples[:8], tmp_path / "zero", lmbda=0.0).train()
    assert_same_step(zero, plain, init, "lmbda=0 vs the plain trainer")
    seen = []
    t = trainer(onpol, teacher, collate, examples[:8], tmp_path / "on", lmbda=1.0, max_new_tokens=8)
    original = t.generated_batch
    t.generated_batch = lambda model, inputs: seen.append(original(model, inputs)) or seen[-1]
    t.train()
    assert len(seen) == 2 and all(int((b["labels"] != -100).sum()) > 0 for b in seen)
    logged = [h["loss"] for h in t.state.log_history if "loss" in h]
    assert logged and all(torch.isfinite(torch.tensor(logged)))
    moved = max((a - b).abs().max().item() for a, b in zip(onpol.parameters(), init.parameters()))
    assert moved > 0


@pytest.mark.parametrize("bad", [dict(lmbda=1.5), dict(lmbda=-0.1), dict(max_new_tokens=0),
                                 dict(generation_temperature=-1.0)])
def test_bad_generation_options_are_refused(setup, tmp_path, bad):
    tok, examples, teacher, _ = setup
    with pytest.raises(ValueError, match=next(iter(bad))):
        trainer(student_like(teacher, 5), teacher, DistillCollator(tok, max_length=1024), examples[:4], tmp_path, **bad)
