"""vcrd inside TRL's own ``DistillationTrainer`` (vcrd.train.trl_distillation, docs/migration.md).

TRL's trainer is on-policy: the student generates the completions (transformers' ``generate`` here,
no vLLM). Both trainers see the same completions: same seed, and the students stay equal to ~1e-7.
The students stop at any of a few "end" tokens, so completions end early and the completion mask
holds zeros; accumulation 2 with micro-batches of different token counts checks ``num_items_in_batch``.
SGD without momentum, so the final parameters show each step's gradient, not Adam's sign of it.
"""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("trl")

STOP_IDS = list(range(4, 100, 9))  # 11 of the 100 ids end a completion (about 1 token in 9)
MAX_COMPLETION = 8


def tokenizer():
    from vcrd.app.tokenizer import build_char_tokenizer

    tok = build_char_tokenizer()
    tok.padding_side = "left"  # TRL generates from left-padded prompts
    return tok


def tiny(family: str, seed: int, vocab: int, **config):
    """A tiny causal LM of ``family`` ("llama", "gemma2", "granite", "cohere") from its config (no hub)."""
    import transformers

    classes = {"llama": ("LlamaConfig", "LlamaForCausalLM"), "gemma2": ("Gemma2Config", "Gemma2ForCausalLM"),
               "granite": ("GraniteConfig", "GraniteForCausalLM"), "cohere": ("CohereConfig", "CohereForCausalLM")}
    config_cls, model_cls = (getattr(transformers, name) for name in classes[family])
    torch.manual_seed(seed)
    model = model_cls(config_cls(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=4, num_key_value_heads=4, head_dim=8,
                                 max_position_embeddings=128, tie_word_embeddings=False, **config))
    model.generation_config.eos_token_id = STOP_IDS
    with torch.no_grad():
        model.lm_head.weight.mul_(40.0 if seed == 2 else 10.0)  # teacher peaked; logits reach the soft-cap
    return model


def prompts():
    from datasets import Dataset

    return Dataset.from_list([{"prompt": f"{a}*{b}="} for a in range(1, 5) for b in range(1, 5)])


def train(trainer_cls, tmp_path, student, teacher, beta, max_steps=2, **kwargs):
    from trl import DistillationConfig

    args = DistillationConfig(output_dir=str(tmp_path), max_steps=max_steps, per_device_train_batch_size=2,
                              gradient_accumulation_steps=2, learning_rate=0.5, optim="sgd", max_grad_norm=0.0,
                              beta=beta, temperature=0.9, max_completion_length=MAX_COMPLETION, logging_steps=1,
                              save_strategy="no", report_to=[], use_cpu=True, seed=0, disable_tqdm=True,
                              bf16=False)  # TRL's configs default to bf16 autocast, on CPU too
    trainer = trainer_cls(model=student, teacher_model=teacher, args=args, train_dataset=prompts(),
                          processing_class=tokenizer(), **kwargs)
    trainer.train()
    return trainer, [h for h in trainer.state.log_history if "loss" in h]


FAMILIES = {"llama": {}, "gemma2": dict(final_logit_softcapping=30.0)}


@pytest.mark.parametrize("beta, divergence", [(0.0, "fkl"), (0.5, "jsd"), (1.0, "rkl")])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_kd_trains_exactly_as_trls_distillation_trainer(tmp_path, family, beta, divergence):
    from trl import DistillationTrainer

    from vcrd.train.trl_distillation import VCRDDistillationTrainer

    def models():
        return tiny(family, 1, 100, **FAMILIES[family]), tiny(family, 2, 100, **FAMILIES[family])

    trl_student, trl_teacher = models()
    _, trl_logs = train(DistillationTrainer, tmp_path / "trl", trl_student, trl_teacher, beta)
    student, teacher = models()
    trainer, logs = train(VCRDDistillationTrainer, tmp_path / "vcrd", student, teacher, beta, vcrd_config="kd")

    cfg = trainer.vcrd_config
    assert cfg.effective_divergence == divergence and cfg.temperature == 0.9
    assert cfg.student_softcap == cfg.teacher_softcap == FAMILIES[family].get("final_logit_softcapping")
    assert [h["completions/min_length"] for h in trl_logs] == [h["completions/min_length"] for h in logs]
    assert min(h["completions/min_length"] for h in logs) < MAX_COMPLETION  # masked positions exist
    trl_losses, losses = (torch.tensor([h["loss"] for h in x]) for x in (trl_logs, logs))
    assert len(losses) == 2 and trl_losses.min() > 1e-2
    torch.testing.assert_close(losses, trl_losses, rtol=2e-5, atol=0)
    moved = max((a - b).abs().max().item() for a, b in zip(trl_student.parameters(), models()[0].parameters()))
    assert moved > 1e-2  # the students trained
    for a, b in zip(student.parameters(), trl_student.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)  # fp32 (TRL computes in fp32); steps move 1e-2


def test_vcrd_preset_trains_another_student(tmp_path):
    from trl import DistillationTrainer

    from vcrd.train.trl_distillation import VCRDDistillationTrainer

    _, trl_logs = train(DistillationTrainer, tmp_path / "trl", tiny("llama", 1, 100), tiny("llama", 2, 100), 0.0)
    _, logs = train(VCRDDistillationTrainer, tmp_path / "vcrd", tiny("llama", 1, 100), tiny("llama", 2, 100), 0.0,
                    vcrd_config="vcrd")
    assert abs(logs[0]["loss"] - trl_logs[0]["loss"]) > 1e-3 * trl_logs[0]["loss"]  # the weights are on


def transformed(z: torch.Tensor, scale: float, cap, temperature: float) -> torch.Tensor:
    """SPEC §1 by hand: ``c·tanh(a·z/c)`` (``a·z`` without a cap), then ``/T``."""
    x = scale * z if cap is None else cap * torch.tanh(scale * z / cap)
    return x / temperature


def jsd_rows(s: torch.Tensor, u: torch.Tensor, beta: float) -> torch.Tensor:
    """TRL's generalized JSD per row, float64: ``β·KL(q‖m) + (1-β)·KL(p‖m)``, ``m = (1-β)p + βq``."""
    lp, lq = torch.log_softmax(s, -1), torch.log_softmax(u, -1)
    lm = torch.logsumexp(torch.stack([lp + math.log(1 - beta), lq + math.log(beta)]), 0)
    return beta * (lq.exp() * (lq - lm)).sum(-1) + (1 - beta) * (lp.exp() * (lp - lm)).sum(-1)


class Recording:
    """Keeps every micro-batch's inputs and token count (a test subclass calls it from ``_compute_loss``)."""

    def __init__(self):
        self.batches = []


def recording_trainer(record: Recording):
    from vcrd.train.trl_distillation import VCRDDistillationTrainer

    class RecordingTrainer(VCRDDistillationTrainer):
        def _compute_loss(self, unwrapped_student, inputs, num_items_in_batch):
            record.batches.append(({k: v.clone() for k, v in inputs.items() if torch.is_tensor(v)},
                                   num_items_in_batch))
            return super()._compute_loss(unwrapped_student, inputs, num_items_in_batch)

    return RecordingTrainer


@pytest.mark.parametrize("student_family, student_config, teacher_family, teacher_config, scale, cap", [
    ("gemma2", dict(final_logit_softcapping=30.0), "gemma2", dict(final_logit_softcapping=30.0), (1.0, 1.0),
     (30.0, 30.0)),
    ("granite", dict(logits_scaling=0.25), "cohere", dict(logit_scale=0.5), (4.0, 0.5), (None, None)),
])
def test_a_soft_capped_and_a_scaled_student_distil_as_a_float64_oracle_says(
        tmp_path, student_family, student_config, teacher_family, teacher_config, scale, cap):
    """One SGD step in float64 through TRL's DistillationTrainer with vcrd's loss (kd, JSD 0.5,
    T = 0.9): the logged loss and the step ``-lr·∇`` equal the oracle's, computed from the recorded
    completions with the transform and divergence written here (and the transform checked against
    the family's own logits)."""
    student = tiny(student_family, 1, 100, **student_config).double()
    teacher = tiny(teacher_family, 2, 100, **teacher_config).double()
    start = {k: v.clone() for k, v in student.named_parameters()}
    record = Recording()
    trainer, logs = train(recording_trainer(record), tmp_path, student, teacher, 0.5, max_steps=1,
                          vcrd_config="kd")
    assert (trainer.vcrd_config.student_logit_scale, trainer.vcrd_config.teacher_logit_scale) == scale
    assert (trainer.vcrd_config.student_softcap, trainer.vcrd_config.teacher_softcap) == cap

    oracle_student = tiny(student_family, 1, 100, **student_config).double()
    oracle_student.load_state_dict(start)
    teacher.eval()
    total, n_tokens = 0.0, None
    for inputs, count in record.batches:
        ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
        mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
        K = inputs["completion_ids"].shape[1]
        rows = []
        for model, a, c in ((oracle_student, scale[0], cap[0]), (teacher, scale[1], cap[1])):
            h = model.model(input_ids=ids, attention_mask=mask).last_hidden_state[:, -K - 1:-1]
            z = h @ model.lm_head.weight.T
            own = model(input_ids=ids, attention_mask=mask).logits[:, -K - 1:-1]
            torch.testing.assert_close(transformed(z, a, c, 1.0), own, rtol=1e-12, atol=1e-12)  # the family's own
            rows.append(transformed(z, a, c, 0.9))
        valid = inputs["completion_mask"].bool()
        total = total + jsd_rows(rows[0], rows[1].detach(), 0.5)[valid].sum() / count
        n_tokens = count
    assert not record.batches[0][0]["completion_mask"].all() or not record.batches[1][0]["completion_mask"].all()
    assert n_tokens == sum(b["completion_mask"].sum() for b, _ in record.batches)
    total.backward()
    assert logs[0]["loss"] == pytest.approx(total.item(), rel=1e-6)  # the logged loss is an fp32 sum
    for name, p in student.named_parameters():
        step = (start[name] - p.detach()) / 0.5
        grad = dict(oracle_student.named_parameters())[name].grad
        torch.testing.assert_close(step, grad, rtol=1e-8, atol=1e-11)
    assert max(g.abs().max().item() for g in (q.grad for q in oracle_student.parameters())) > 1e-3


def test_a_divergence_or_temperature_against_trls_is_refused():
    from vcrd import VCRDConfig
    from vcrd.train.trl_distillation import with_trl_options

    kd = VCRDConfig.preset("kd")
    assert with_trl_options(kd, 1.0, 0.9).effective_divergence == "rkl"
    assert with_trl_options(VCRDConfig.preset("kd", divergence="rkl"), 1.0, 1.0).effective_divergence == "rkl"
    with pytest.raises(ValueError, match=r"divergence='rkl'.*beta=0\.0"):
        with_trl_options(VCRDConfig.preset("kd", divergence="rkl"), 0.0, 1.0)
    with pytest.raises(ValueError, match=r"temperature=2\.0 disagrees with TRL's temperature=0\.9"):
        with_trl_options(VCRDConfig.preset("kd", temperature=2.0), 0.5, 0.9)
