"""Each family's logit post-processing read from its config (TRL's rules), checked against the
family's own forward in transformers: the model's logits equal c·tanh(a·h·W/c) with the values read."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from vcrd.core.logit_processing import logit_processing

TINY = dict(vocab_size=61, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
            num_key_value_heads=1, max_position_embeddings=64)


def family(name: str):
    import transformers as tr

    if name == "cohere":
        return tr.CohereForCausalLM(tr.CohereConfig(**TINY, logit_scale=0.0625)), 0.0625, None
    if name == "granite":
        return tr.GraniteForCausalLM(tr.GraniteConfig(**TINY, logits_scaling=8.0)), 1 / 8.0, None
    if name == "gemma2":
        return tr.Gemma2ForCausalLM(tr.Gemma2Config(**TINY, head_dim=16, final_logit_softcapping=3.0)), 1.0, 3.0
    if name == "llama":
        return tr.LlamaForCausalLM(tr.LlamaConfig(**TINY)), 1.0, None
    raise AssertionError(name)


@pytest.mark.parametrize("name", ["cohere", "granite", "gemma2", "llama"])
def test_the_rule_reproduces_the_familys_own_logits(name):
    torch.manual_seed(0)
    model, scale, cap = family(name)
    model.eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(40.0)  # logits large enough that a soft-cap of 3 bends them
        ids = torch.randint(0, 61, (2, 9))
        out = model(ids, output_hidden_states=True)
        z = out.hidden_states[-1].double() @ model.lm_head.weight.double().T
    got = logit_processing(model.config)
    assert got.scale == pytest.approx(scale) and got.softcap == cap
    want = scale * z if cap is None else cap * torch.tanh(scale * z / cap)  # written here, from the values above
    torch.testing.assert_close(out.logits.double(), want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))
    if name != "llama":  # the post-processing is not a no-op on these logits: the check can fail
        assert float((out.logits.double() - z).abs().max()) > 0.1 * float(z.abs().max())


def test_trls_order_and_hyperclovax():
    ns = SimpleNamespace
    assert logit_processing(ns(logit_scale=None, output_multiplier=2.0)).scale == 2.0  # None: unscaled, next name
    assert logit_processing(ns(logit_scale=0.5, lm_head_multiplier=3.0)).scale == 0.5  # the first set one wins
    assert logit_processing(ns(lm_head_multiplier=3.0, logits_scaling=4.0)).scale == 3.0
    assert logit_processing(ns(model_type="minicpm3", logits_scaling=4.0)).scale == 0.25
    assert logit_processing(ns(model_type="hyperclovax", logits_scaling=4.0)).scale == 4.0
    plain = logit_processing(ns())
    assert plain.is_identity and plain.describe() == "none"
    capped = logit_processing(ns(logits_scaling=8.0, final_logit_softcapping=30))
    assert capped.describe() == ("config.logits_scaling=8.0 (logits divided by it), "
                                 "config.final_logit_softcapping=30.0")


def test_multimodal_configs_are_read_through_get_text_config():
    text = SimpleNamespace(final_logit_softcapping=30.0)
    outer = SimpleNamespace(get_text_config=lambda: text, final_logit_softcapping=None)
    assert logit_processing(outer).softcap == 30.0


def test_bad_values_are_refused():
    with pytest.raises(ValueError, match=r"final_logit_softcapping: expected None or a number > 0, got -1"):
        logit_processing(SimpleNamespace(final_logit_softcapping=-1))
    with pytest.raises(ValueError, match="logits_scaling: expected a non-zero divisor"):
        logit_processing(SimpleNamespace(logits_scaling=0))
    with pytest.raises(TypeError, match=r"config.logit_scale: expected a number, got str"):
        logit_processing(SimpleNamespace(logit_scale="2"))


@pytest.mark.parametrize("student_name,teacher_name", [("granite", "llama"), ("cohere", "gemma2")])
def test_distill_loss_trains_on_the_models_own_distribution(student_name, teacher_name):
    """distill_loss reads each model's scale and soft-cap from its config: its loss equals the float64
    reference (default options) on the models' own logits, ``model(ids).logits``."""
    from vcrd.core import reference
    from vcrd.train.trainer import distill_loss

    torch.manual_seed(0)
    student, _, _ = family(student_name)
    teacher, _, _ = family(teacher_name)
    with torch.no_grad():
        for model in (student, teacher):
            model.lm_head.weight.mul_(40.0)
    teacher.eval().requires_grad_(False)
    ids = torch.randint(0, 61, (2, 9))
    labels = ids.clone()
    labels[0, :3] = -100
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    got, _ = distill_loss(student, teacher, batch, "kd")
    with torch.no_grad():
        s, u = student(ids).logits.double(), teacher(ids).logits.double()
    want = reference.vcrd_loss(s[:, :-1], u[:, :-1], labels[:, 1:], config="kd")
    assert got.item() == pytest.approx(want.item(), rel=1e-5)
    raw = reference.vcrd_loss(student(ids, output_hidden_states=True).hidden_states[-1].double()[:, :-1]
                              @ student.lm_head.weight.double().T, u[:, :-1], labels[:, 1:], config="kd")
    assert abs(raw.item() - want.item()) > 1e-2 * want.item()  # ignoring the student's scale would fail


def test_the_scorer_refuses_a_post_processing_model_naming_the_attribute():
    import transformers as tr

    from vcrd.app.tokenizer import build_char_tokenizer
    from vcrd.select.naturalness import score_responses

    tok = build_char_tokenizer()
    torch.manual_seed(0)
    cohere = tr.CohereForCausalLM(tr.CohereConfig(**{**TINY, "vocab_size": len(tok)}, logit_scale=0.0625))
    with pytest.raises(ValueError, match=r"model: CohereForCausalLM post-processes its logits "
                                         r"\(config.logit_scale=0.0625\)"):
        score_responses(cohere, tok, ["1+1="], ["2\n\n= 2"])
