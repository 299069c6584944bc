"""The thin trainer on real tiny HF Llamas: the collator, ``distill_loss`` (through ``model.forward``)
against plain autograd, gradient accumulation, ``evaluate()``, bf16 autocast, refusals and errors."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from vcrd.core.reference import vcrd_loss as reference_loss
from vcrd.train.data import DistillCollator
from vcrd.train.trainer import VCRDTrainer, distill_loss

from ..helpers import (
    KD,
    WEIGHTED,
    assert_same_step,
    make_setup,
    rel_err,
    student_like,
    tiny_family,
    tiny_llama,
    trainer_for,
)


@pytest.fixture(scope="module")
def setup():
    return make_setup()


def grads_of(model):
    return {n: (p.grad.detach().clone() if p.grad is not None else None) for n, p in model.named_parameters()}


def reference_through_logits(student, teacher, batch, cfg, num_items_in_batch=None):
    """The same loss with plain autograd: full ``[B, T, V]`` logits from ``model(...)``, shifted, into
    the float64 reference of SPEC §1-6."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    s = student(input_ids=ids, attention_mask=mask).logits
    with torch.no_grad():
        u = teacher(input_ids=ids, attention_mask=mask).logits
    return reference_loss(s[:, :-1].double(), u[:, :-1].double(), batch["labels"][:, 1:],
                          step_ids=batch["step_ids"][:, 1:], config=cfg, num_items_in_batch=num_items_in_batch)


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


@pytest.mark.parametrize("cfg", [KD, WEIGHTED], ids=["kd", "vcrd"])
def test_distill_loss_matches_autograd_through_the_model_for_every_parameter(setup, cfg, monkeypatch):
    """8 sequences x up to ~310 tokens through a real 2-layer Llama: loss and the gradient of every
    student parameter (embeddings, attention, MLP, norms, LM head) equal plain autograd on full logits
    into the float64 reference, with the default (compiled) CPU path. Catches a wrong hidden state
    (pre-norm: the final norm gets no gradient), a wrong shift, a missing bias/head gradient."""
    monkeypatch.setenv("VCRD_COMPILE", "1")
    tok, examples, teacher, collate = setup
    student = student_like(teacher, 3)
    batch = collate(examples[:8])
    assert batch["input_ids"].shape[0] == 8 and batch["input_ids"].shape[1] >= 200

    head_inputs = []
    hook = student.lm_head.register_forward_hook(lambda m, args, out: head_inputs.append(tuple(args[0].shape)))
    loss, stats = distill_loss(student, teacher, batch, cfg)
    hook.remove()
    assert head_inputs == [(8, 1, 48)], head_inputs  # the model computed last-position logits only
    loss.backward()
    ours = grads_of(student)

    student.zero_grad(set_to_none=True)
    ref = reference_through_logits(student, teacher, batch, cfg)
    ref.backward()
    truth = grads_of(student)

    assert abs(loss.item() - ref.item()) <= 1e-5 * abs(ref.item()), (loss.item(), ref.item())
    assert stats.valid.sum() == (batch["labels"][:, 1:] != -100).sum()
    assert len(truth) == len(list(student.parameters())) >= 20
    for name, g in truth.items():
        assert g is not None and g.abs().max() > 0, name
        assert ours[name] is not None, f"{name}: no gradient from distill_loss"
        assert rel_err(ours[name], g) <= 1e-4, f"{name}: relative error {rel_err(ours[name], g):.2e}"
    if cfg is WEIGHTED:  # the weights are really on and spread (not a kd loss in disguise)
        for w in (stats.w_val[stats.valid], stats.w_dc[stats.valid]):
            assert w.min() < 0.3 and w.max() > 0.7, (w.min(), w.max())


def test_num_items_in_batch_weights_follow_spec(setup):
    """SPEC §6: with normalize='weights' and num_items_in_batch=M, Z = (Σ m·w / Σ m)·M, i.e. the loss and
    gradients are this batch's weighted mean times n_valid / M; with 'tokens' Σ / M."""
    tok, examples, teacher, collate = setup
    student = tiny_llama(tok, 32, 5)
    batch = collate(examples[:3])
    n = int((batch["labels"][:, 1:] != -100).sum())
    M = 3 * n + 7
    for cfg in (KD, WEIGHTED):
        student.zero_grad(set_to_none=True)
        base, _ = distill_loss(student, teacher, batch, cfg)
        base.backward()
        g_base = grads_of(student)
        student.zero_grad(set_to_none=True)
        scaled, _ = distill_loss(student, teacher, batch, cfg, num_items_in_batch=torch.tensor(M))
        scaled.backward()
        assert scaled.item() == pytest.approx(base.item() * n / M, rel=1e-5)
        for name, g in grads_of(student).items():
            assert rel_err(g, g_base[name] * n / M) <= 1e-5, name


def test_distill_loss_goes_through_the_wrapper_forward(setup):
    """A wrapper's forward runs (DDP-style ``.module`` wrapper that casts under autocast and counts calls);
    the LM head comes from the wrapped model; gradients equal the unwrapped call's."""
    tok, examples, teacher, collate = setup
    student = tiny_llama(tok, 32, 6)
    batch = collate(examples[:2])

    class Wrapper(torch.nn.Module):
        def __init__(self, module):
            super().__init__()
            self.module, self.calls = module, 0

        def forward(self, **kwargs):
            self.calls += 1
            return self.module(**kwargs)

    plain, _ = distill_loss(student, teacher, batch, KD)
    plain.backward()
    expected = grads_of(student)
    student.zero_grad(set_to_none=True)
    wrapped = Wrapper(student)
    loss, _ = distill_loss(wrapped, teacher, batch, KD)
    loss.backward()
    assert wrapped.calls == 1
    assert loss.item() == pytest.approx(plain.item(), rel=1e-6)
    for name, g in grads_of(student).items():
        assert rel_err(g, expected[name]) <= 1e-6, name


def test_ddp_wrapped_student(setup, tmp_path):
    """A real DistributedDataParallel (gloo, one process): forward through DDP, gradients reduced by its
    hooks, equal to the unwrapped student's."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    tok, examples, teacher, collate = setup
    student = tiny_llama(tok, 32, 7)
    batch = collate(examples[:2])
    plain, _ = distill_loss(student, teacher, batch, WEIGHTED)
    plain.backward()
    expected = grads_of(student)
    student.zero_grad(set_to_none=True)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        ddp = DDP(student)
        loss, _ = distill_loss(ddp, teacher, batch, WEIGHTED)
        loss.backward()
    finally:
        dist.destroy_process_group()
    assert loss.item() == pytest.approx(plain.item(), rel=1e-6)
    for name, g in grads_of(student).items():
        assert rel_err(g, expected[name]) <= 1e-6, name


def test_all_ignored_batch_gives_zero_loss_and_gradients(setup):
    tok, examples, teacher, collate = setup
    student = tiny_llama(tok, 32, 8)
    batch = collate(examples[:2])
    batch["labels"][:] = -100
    for cfg in (KD, WEIGHTED):
        for count in (None, 0, 17):
            student.zero_grad(set_to_none=True)
            loss, _ = distill_loss(student, teacher, batch, cfg, num_items_in_batch=count)
            loss.backward()
            assert loss.item() == 0.0, (cfg.normalize, count)
            assert all(g is None or torch.all(g == 0) for g in grads_of(student).values())


def test_user_autocast_bf16(setup):
    """distill_loss inside the caller's torch.autocast(bf16): the student forward runs in bf16, the loss
    in fp32 (close to the fp32 loss, gradients aligned)."""
    tok, examples, teacher, collate = setup
    student = tiny_llama(tok, 32, 9)
    batch = collate(examples[:4])
    ref, _ = distill_loss(student, teacher, batch, WEIGHTED)
    ref.backward()
    expected = grads_of(student)
    student.zero_grad(set_to_none=True)
    seen = []
    hook = student.model.layers[0].self_attn.q_proj.register_forward_hook(lambda m, a, out: seen.append(out.dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = distill_loss(student, teacher, batch, WEIGHTED)
    hook.remove()
    loss.backward()
    assert torch.bfloat16 in seen
    assert loss.dtype == torch.float32 and loss.item() == pytest.approx(ref.item(), rel=3e-2)
    flat = torch.cat([g.flatten() for g in grads_of(student).values()]).double()
    flat_ref = torch.cat([g.flatten() for g in expected.values()]).double()
    assert torch.nn.functional.cosine_similarity(flat, flat_ref, dim=0) > 0.99


def test_model_whose_hidden_states_are_not_the_head_input_is_refused(setup):
    """``hidden_states[-1]`` before the final norm (config.tie_last_hidden_states=False) would silently
    train on the wrong features: the last-position logits check refuses it."""
    tok, examples, teacher, collate = setup
    student = tiny_llama(tok, 32, 10)
    student.config.tie_last_hidden_states = False
    with pytest.raises(ValueError, match=r"student: LlamaForCausalLM's logits are not hidden_states\[-1\]"):
        distill_loss(student, teacher, collate(examples[:2]), KD)


@pytest.mark.parametrize("pair", [("gemma2", "granite"), ("granite", "gemma2")], ids=["gemma2-student",
                                                                                       "granite-student"])
@pytest.mark.parametrize("cfg", [KD, WEIGHTED], ids=["kd", "vcrd"])
def test_softcapped_and_scaled_models_train_on_their_own_distribution(setup, pair, cfg):
    """A Gemma-2 (soft-cap 30) and a Granite (logits / 8) as student and teacher: distill_loss reads each
    model's post-processing from its config, and its loss and the gradient of every student parameter
    equal the float64 reference (default options) on the models' OWN logits, ``model(ids).logits``."""
    tok, examples, _, collate = setup
    student = tiny_family(tok, pair[0], 5).train()
    teacher = tiny_family(tok, pair[1], 6).eval().requires_grad_(False)
    batch = collate(examples[:4])
    with torch.no_grad():  # the post-processing really changes these logits (the cap bends, the scale shrinks)
        for model in (student, teacher):
            out = model(input_ids=batch["input_ids"], output_hidden_states=True)
            raw = out.hidden_states[-1] @ model.lm_head.weight.T
            assert (out.logits - raw).abs().max() > 0.2 * raw.abs().max()
            if getattr(model.config, "final_logit_softcapping", None) is not None:
                assert raw.abs().max() > 45.0

    loss, _ = distill_loss(student, teacher, batch, cfg)
    loss.backward()
    ours = grads_of(student)
    student.zero_grad(set_to_none=True)
    ref = reference_through_logits(student, teacher, batch, cfg)  # default options on the models' own logits
    ref.backward()
    truth = grads_of(student)

    assert abs(loss.item() - ref.item()) <= 1e-5 * abs(ref.item()), (loss.item(), ref.item())
    for name, g in truth.items():
        assert g is not None and g.abs().max() > 0, name
        assert rel_err(ours[name], g) <= 1e-4, f"{name}: relative error {rel_err(ours[name], g):.2e}"
        assert rel_err(0.5 * g, g) > 1e-4  # the check is sharp: a halved gradient fails it

    # an explicit option equal to the model's is accepted; one that disagrees is refused naming both
    cap = "student_softcap" if pair[0] == "gemma2" else "teacher_softcap"
    scale = "teacher_logit_scale" if pair[0] == "gemma2" else "student_logit_scale"
    same, _ = distill_loss(student, teacher, batch, cfg.replace(**{cap: 30.0, scale: 0.125}))
    assert same.item() == loss.item()
    with pytest.raises(ValueError, match=rf"{cap}=50.0 disagrees with the .* model Gemma2ForCausalLM: its config "
                                         r"gives config.final_logit_softcapping=30.0"):
        distill_loss(student, teacher, batch, cfg.replace(**{cap: 50.0}))
    with pytest.raises(ValueError, match=rf"{scale}=0.5 disagrees with the .* model GraniteForCausalLM: its config "
                                         r"gives config.logits_scaling=8.0 \(logits divided by it\)"):
        distill_loss(student, teacher, batch, cfg.replace(**{scale: 0.5}))


def test_trainer_takes_the_models_post_processing(setup, tmp_path):
    """VCRDTrainer accepts a soft-capped teacher and refuses, at construction, a config that disagrees with it."""
    from transformers import TrainingArguments

    tok, examples, teacher, collate = setup
    gemma = tiny_family(tok, "gemma2", 7).requires_grad_(False)
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, remove_unused_columns=False)
    student = student_like(teacher, 4)
    VCRDTrainer(model=student, teacher_model=gemma, args=args, train_dataset=examples, data_collator=collate)
    with pytest.raises(ValueError, match=r"teacher_softcap=20.0 disagrees with the teacher model Gemma2ForCausalLM"):
        VCRDTrainer(model=student, teacher_model=gemma, args=args, train_dataset=examples, data_collator=collate,
                    vcrd_config=KD.replace(teacher_softcap=20.0))
    with pytest.raises(ValueError, match=r"student_logit_scale=0.5 disagrees with the student model LlamaForCausalLM: "
                                         r"its config gives neither a scale nor a soft-cap attribute"):
        VCRDTrainer(model=student, teacher_model=gemma, args=args, train_dataset=examples, data_collator=collate,
                    vcrd_config=KD.replace(student_logit_scale=0.5))


@pytest.mark.parametrize("cfg", [KD, WEIGHTED], ids=["kd", "vcrd"])
def test_trainer_step_on_softcapped_and_scaled_models_equals_the_float64_oracle(setup, tmp_path, cfg):
    """One SGD step of VCRDTrainer, a Granite student (logits / 8) and a Gemma-2 teacher (soft-cap 30): the
    update equals −lr · ∇ of the float64 reference on the models' own logits (``model(ids).logits``)."""
    tok, examples, _, collate = setup
    init = tiny_family(tok, "granite", 5).train()
    teacher = tiny_family(tok, "gemma2", 6).eval().requires_grad_(False)
    lr, batch = 0.5, collate(examples[:8])
    expected = copy.deepcopy(init)
    reference_through_logits(expected, teacher, batch, cfg).backward()
    with torch.no_grad():
        for p in expected.parameters():
            p -= lr * p.grad
    student = copy.deepcopy(init)
    trainer_for(student, teacher, collate, examples[:8], tmp_path, cfg, max_steps=1, learning_rate=lr).train()
    assert_same_step(student, expected, init, f"VCRDTrainer {cfg.divergence} step")


def test_bad_inputs_raise_clear_errors(setup):
    tok, examples, teacher, collate = setup
    student = tiny_llama(tok, 32, 11)
    batch = collate(examples[:2])
    B, T = batch["input_ids"].shape
    cases = [
        (TypeError, "batch: expected a mapping", [batch["input_ids"]], {}),
        (ValueError, r"batch: missing 'labels'", {"input_ids": batch["input_ids"]}, {}),
        (TypeError, r"batch\['input_ids'\]: expected an integer tensor, got torch.float32",
         {**batch, "input_ids": batch["input_ids"].float()}, {}),
        (ValueError, rf"batch\['labels'\]: expected shape \({B}, {T}\) like batch\['input_ids'\], got \({B}, {T - 1}\)",
         {**batch, "labels": batch["labels"][:, 1:]}, {}),
        (ValueError, r"batch\['input_ids'\]: expected shape \[B, T\] with T >= 2, got \(2, 1\)",
         {k: v[:, :1] for k, v in batch.items()}, {}),
        (ValueError, r"batch\['step_ids'\]: expected shape", {**batch, "step_ids": batch["step_ids"][:1]}, {}),
        (TypeError, r"loss_fn: expected a FusedLinearVCRDLoss, a VCRDConfig, a preset name or None, got int",
         batch, {"loss_fn": 3}),
        (ValueError, r"preset: expected one of", batch, {"loss_fn": "nope"}),
        (ValueError, r"num_items_in_batch: expected a number or a one-element tensor, got a tensor of shape \(2,\)",
         batch, {"num_items_in_batch": torch.tensor([3, 4])}),
        (TypeError, r"num_items_in_batch: expected an int, a float, a one-element tensor or None, got str",
         batch, {"num_items_in_batch": "8"}),
    ]
    for exc, pattern, b, kwargs in cases:
        with pytest.raises(exc, match=pattern):
            distill_loss(student, teacher, b, **kwargs)
    with pytest.raises(TypeError, match="student: expected a torch.nn.Module"):
        distill_loss(lambda **kw: None, teacher, batch)
    with pytest.raises(ValueError, match=r"labels: expected values in \[0, 100\)"):
        distill_loss(student, teacher, {**batch, "labels": batch["labels"].masked_fill(batch["labels"] == -100, 100)})


def test_plain_loop_learns_kd(setup):
    """24 Adam steps of a plain loop with preset kd on 4 problems: the distillation loss falls >= 30 %."""
    tok, examples, teacher, _ = setup
    student = tiny_llama(tok, 32, 3)
    opt = torch.optim.Adam(student.parameters(), lr=3e-3)
    batch = DistillCollator(tok, max_length=192)(examples[:4])
    losses = []
    for _ in range(24):
        loss, stats = distill_loss(student, teacher, batch, "kd")
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] <= 0.7 * losses[0], losses
    assert teacher.model.embed_tokens.weight.grad is None
    assert float(stats.means()["w_val"]) == 1.0


# --- VCRDTrainer -------------------------------------------------------------------------------------------------


def test_trainer_gradient_accumulation_equals_one_big_batch(setup, tmp_path):
    """kd (normalize='tokens'): 2 SGD steps with 2 micro-batches of 4 give the same parameters as with
    one batch of 8 (the Trainer's num_items_in_batch reaches the loss, nothing divides it twice)."""
    tok, examples, teacher, _ = setup
    collate = DistillCollator(tok, max_length=192)
    init = student_like(teacher, 12)
    runs = []
    for bs, ga in ((4, 1), (2, 2)):
        student = copy.deepcopy(init)
        trainer_for(student, teacher, collate, examples[:8], tmp_path / f"ga{ga}", KD, per_device_train_batch_size=bs,
                    gradient_accumulation_steps=ga).train()
        runs.append(student)
    assert_same_step(runs[1], runs[0], init, "GA=2 vs GA=1")


def test_trainer_weights_normalisation_with_accumulation_follows_spec(setup, tmp_path):
    """normalize='weights' (SPEC §6): one batch of 8 → the SGD step of its weighted mean; 2 micro-batches
    of 4 → the step of Σ_k (n_k / M)·(weighted mean of micro-batch k), M = n_1 + n_2. Computed by hand."""
    tok, examples, teacher, _ = setup
    collate = DistillCollator(tok, max_length=192)
    init = student_like(teacher, 13)
    lr = 0.5
    micro = [collate(examples[:2]), collate(examples[2:4])]
    counts = [int((b["labels"][:, 1:] != -100).sum()) for b in micro]
    M = sum(counts)
    assert counts[0] != counts[1]  # unequal micro-batches: a plain average of the two means would differ
    for ga, parts in ((1, [(collate(examples[:4]), 1.0)]), (2, [(b, n / M) for b, n in zip(micro, counts)])):
        by_hand = copy.deepcopy(init)
        for b, scale in parts:
            loss, _ = distill_loss(by_hand, teacher, b, WEIGHTED)
            (loss * scale).backward()
        expected = {n: p.detach() - lr * p.grad for n, p in by_hand.named_parameters()}
        student = copy.deepcopy(init)
        trainer_for(student, teacher, collate, examples[:4], tmp_path / f"w{ga}", WEIGHTED, max_steps=1,
                    per_device_train_batch_size=4 // ga, gradient_accumulation_steps=ga, learning_rate=lr).train()
        assert_same_step(student, expected, init, f"GA={ga}")


def test_trainer_evaluate_returns_eval_loss(setup, tmp_path):
    """evaluate(): eval_loss equals distill_loss on the eval set (one eval batch), the mean of the batch
    losses with two equal batches, plus the eval weight means; compute_metrics sees per-row stats."""
    tok, examples, teacher, collate = setup
    student = student_like(teacher, 14)
    train, held_out = examples[:8], examples[8:16]
    with torch.no_grad():
        whole = distill_loss(student, teacher, collate(held_out), WEIGHTED)[0].item()
        halves = [distill_loss(student, teacher, collate(held_out[i:i + 4]), WEIGHTED)[0].item() for i in (0, 4)]
        _, stats = distill_loss(student, teacher, collate(held_out), WEIGHTED)
    trainer = trainer_for(student, teacher, collate, train, tmp_path, WEIGHTED, per_device_eval_batch_size=8)
    metrics = trainer.evaluate(held_out)
    assert math.isfinite(metrics["eval_loss"])
    assert metrics["eval_loss"] == pytest.approx(whole, rel=1e-5)
    assert metrics["eval_w_val"] == pytest.approx(float(stats.means()["w_val"]), abs=1e-4)
    assert 0.05 < metrics["eval_w_dc"] < 0.95 and 0.05 < metrics["eval_w_val"] < 0.95
    trainer.args.per_device_eval_batch_size = 4
    assert trainer.evaluate(held_out)["eval_loss"] == pytest.approx(sum(halves) / 2, rel=1e-5)

    seen = {}

    def metrics_fn(pred):
        D, w_val = pred.predictions[0], pred.predictions[1]
        seen["shape"] = D.shape
        return {"rows": float((w_val > 0).sum())}

    trainer.compute_metrics = metrics_fn
    out = trainer.evaluate(held_out)
    assert seen["shape"][0] == 8 and out["eval_rows"] == float(stats.valid.sum())
    assert trainer.state.log_history[-1]["eval_loss"] == pytest.approx(sum(halves) / 2, rel=1e-5)


def test_trainer_bf16_runs_student_under_autocast(setup, tmp_path):
    """TrainingArguments(bf16=True) on CPU: the student's forward runs under autocast (bf16 activations),
    the loss is finite and falls."""
    tok, examples, teacher, collate = setup
    student = tiny_llama(tok, 32, 15)
    seen = []
    student.model.layers[0].mlp.down_proj.register_forward_hook(lambda m, a, out: seen.append(out.dtype))
    trainer = trainer_for(student, teacher, collate, examples[:8], tmp_path, KD, bf16=True, max_steps=4,
                          per_device_train_batch_size=4, optim="adamw_torch", learning_rate=3e-3)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert seen and all(d == torch.bfloat16 for d in seen), set(seen)
    assert len(losses) == 4 and all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0], losses


def test_vcrd_trainer_runs_and_logs_weights(setup, tmp_path):
    tok, examples, teacher, collate = setup
    student = tiny_llama(tok, 32, 4)
    trainer = trainer_for(student, teacher, collate, examples[:8], tmp_path, "vcrd", max_steps=4, logging_steps=2,
                          per_device_train_batch_size=2, gradient_accumulation_steps=2, optim="adamw_torch",
                          learning_rate=3e-3)
    trainer.train()
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logged) == 2 and all(k in logged[0] for k in ("w_val", "w_dc", "agree", "naturalness", "divergence"))
    assert all(math.isfinite(h["loss"]) and 0 < h["w_val"] <= 1 and 0 < h["w_dc"] < 1 for h in logged)
    assert all(p.grad is None for p in teacher.parameters())
