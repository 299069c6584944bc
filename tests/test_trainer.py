"""The thin trainer: collator, the loop-agnostic helper, and VCRDTrainer on tiny models."""

from __future__ import annotations

import pytest
import torch

from vcrd.data import DistillCollator, Example
from vcrd.synthetic import make_dataset
from vcrd.tokenizer import build_char_tokenizer
from vcrd.trainer import VCRDTrainer, distill_loss


def tiny_llama(tok, hidden: int, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    return LlamaForCausalLM(cfg)


@pytest.fixture(scope="module")
def setup():
    tok = build_char_tokenizer()
    examples = [Example(p.question, p.solution(style)) for p, style in zip(make_dataset(8, seed=2),
                                                                          ["terse", "verbose"] * 4)]
    return tok, examples, tiny_llama(tok, 48, 1).eval(), DistillCollator(tok, max_length=1024)


def test_collator_masks_prompt_and_numbers_steps(setup):
    tok, examples, _, collate = setup
    batch = collate(examples[:3])
    B, T = batch["input_ids"].shape
    assert B == 3 and batch["labels"].shape == (B, T) == batch["step_ids"].shape
    for b, e in enumerate(examples[:3]):
        n_prompt = 1 + len(tok(e.prompt, add_special_tokens=False)["input_ids"])
        assert torch.all(batch["labels"][b, :n_prompt] == -100)
        assert torch.all(batch["step_ids"][b, :n_prompt] == 0)
        assert torch.all(batch["step_ids"][b, 1:] >= batch["step_ids"][b, :-1])
        n = int(batch["attention_mask"][b].sum())
        assert batch["input_ids"][b, n - 1] == tok.eos_token_id and torch.all(batch["labels"][b, n:] == -100)
    with pytest.raises(ValueError, match="max_length"):
        DistillCollator(tok, max_length=1)


def test_helper_in_a_plain_loop_lowers_the_loss(setup):
    tok, examples, teacher, collate = setup
    student = tiny_llama(tok, 32, 3)
    opt = torch.optim.Adam(student.parameters(), lr=3e-3)
    batch = collate(examples[:4])
    losses = []
    for _ in range(15):
        loss, stats = distill_loss(student, teacher, batch, "vcrd")
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses
    assert teacher.model.embed_tokens.weight.grad is None
    assert 0 < float(stats.means()["w_val"]) <= 1


def test_vcrd_trainer_runs_and_logs_weights(setup, tmp_path):
    from transformers import TrainingArguments

    tok, examples, teacher, collate = setup
    student = tiny_llama(tok, 32, 4)
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=4, learning_rate=3e-3,
                             logging_steps=2, save_strategy="no", report_to=[], use_cpu=True,
                             remove_unused_columns=False, gradient_accumulation_steps=2)
    trainer = VCRDTrainer(model=student, teacher_model=teacher, vcrd_config="vcrd", args=args,
                          train_dataset=examples, data_collator=collate)
    trainer.train()
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert logged and all(k in logged[0] for k in ("w_val", "w_dc", "agree", "naturalness"))
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in logged)
