"""vcrd inside TRL's own GKDTrainer (docs/migration.md): with the kd settings it trains exactly as
TRL's loss does; with the vcrd preset the weights change the loss."""

from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("trl")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")


def run(trainer_cls, tmp_path, tok, data, llama, accumulation=1, bf16=True):
    from trl.experimental.gkd import GKDConfig

    args = GKDConfig(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4, learning_rate=1e-2,
                     lmbda=0.0, beta=0.5, logging_steps=1, save_strategy="no", report_to=[], use_cpu=True,
                     max_length=64, seed=0, disable_tqdm=True, gradient_accumulation_steps=accumulation,
                     bf16=bf16)  # TRL's configs default to bf16 autocast, on CPU too
    student, teacher = llama(1), llama(2)
    with torch.no_grad():
        teacher.lm_head.weight.mul_(20.0)  # a peaked teacher: the loss is far from zero
    trainer = trainer_cls(model=student, teacher_model=teacher, args=args, train_dataset=data, processing_class=tok)
    trainer.train()
    return [h["loss"] for h in trainer.state.log_history if "loss" in h], student


def tiny_setup():
    from transformers import LlamaConfig, LlamaForCausalLM

    from vcrd.app.tokenizer import build_char_tokenizer

    tok = build_char_tokenizer()
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}{% if m['role'] == 'user' %}\n{% endif %}{% endfor %}"

    def llama(seed):
        torch.manual_seed(seed)
        return LlamaForCausalLM(LlamaConfig(
            vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
            num_key_value_heads=4, max_position_embeddings=256, bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))

    return tok, llama


def test_gkd_trainer_with_vcrd_loss_matches_trl_with_kd_and_differs_with_vcrd(tmp_path):
    from datasets import Dataset
    from trl.experimental.gkd import GKDTrainer

    from vcrd.train.gkd import as_generalized_jsd_loss

    tok, llama = tiny_setup()
    data = Dataset.from_list([{"messages": [{"role": "user", "content": f"{a}+{b}="},
                                            {"role": "assistant", "content": f"{a + b}"}]}
                              for a in range(4) for b in range(4)])

    class KD(GKDTrainer):
        generalized_jsd_loss = staticmethod(as_generalized_jsd_loss("kd"))

    class VCRD(GKDTrainer):
        generalized_jsd_loss = staticmethod(as_generalized_jsd_loss("vcrd"))

    trl_losses, trl_student = run(GKDTrainer, tmp_path / "trl", tok, data, llama)
    kd_losses, kd_student = run(KD, tmp_path / "kd", tok, data, llama)
    vcrd_losses, _ = run(VCRD, tmp_path / "vcrd", tok, data, llama)
    assert len(trl_losses) == 3 and min(trl_losses) > 1e-2
    torch.testing.assert_close(torch.tensor(kd_losses), torch.tensor(trl_losses), rtol=1e-4, atol=0)
    for a, b in zip(kd_student.parameters(), trl_student.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert abs(vcrd_losses[0] - trl_losses[0]) > 1e-3 * trl_losses[0]  # the weights are on


def test_gkd_hook_keeps_trls_token_count_under_gradient_accumulation(tmp_path):
    """Accumulation 2 with micro-batches of different token counts: TRL divides each micro-batch's
    summed loss by the token count of the whole accumulated batch (``num_items_in_batch``); the hook
    must pass it on. A hook that drops the count (a per-micro-batch mean) trains another student:
    shown here too, so this test can see that mutation. In fp32 (TRL's default bf16 autocast rounds
    the gradients to bf16, and Adam turns those last bits into parameter differences of ~lr)."""
    from datasets import Dataset
    from trl.experimental.gkd import GKDTrainer

    from vcrd.train.gkd import as_generalized_jsd_loss

    tok, llama = tiny_setup()
    # answers of very different lengths, so the micro-batches hold different numbers of tokens
    data = Dataset.from_list([{"messages": [{"role": "user", "content": f"{a}*{b}="},
                                            {"role": "assistant", "content": "so " * (a * b % 7) + f"{a * b}"}]}
                              for a in range(1, 5) for b in range(1, 5)])
    kd = as_generalized_jsd_loss("kd")

    class KD(GKDTrainer):
        generalized_jsd_loss = staticmethod(kd)

    class DropsCount(GKDTrainer):
        @staticmethod
        def generalized_jsd_loss(*args, num_items_in_batch=None, **kwargs):
            return kd(*args, **kwargs)

    trl_losses, trl_student = run(GKDTrainer, tmp_path / "trl", tok, data, llama, accumulation=2, bf16=False)
    kd_losses, kd_student = run(KD, tmp_path / "kd", tok, data, llama, accumulation=2, bf16=False)
    _, dropped_student = run(DropsCount, tmp_path / "dropped", tok, data, llama, accumulation=2, bf16=False)
    torch.testing.assert_close(torch.tensor(kd_losses), torch.tensor(trl_losses), rtol=1e-4, atol=0)
    for a, b in zip(kd_student.parameters(), trl_student.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    moved = max((a - b).abs().max().item() for a, b in zip(dropped_student.parameters(), trl_student.parameters()))
    assert moved > 1e-4  # the mutation trains another student: the equality above can fail
