"""Issue #28: oracles for what the suite could not see (mutations that survived it), each independent of the
code under test and each shown to fail on its mutation (recorded in the issue's report):

- ``rank_teachers``' ``mean_galp`` (mutation: computed from the LALP values);
- the trainer's logged weight means over accumulated micro-batches (mutation: only the last one kept);
- ``teacher_bias`` in the fused-linear loss (mutation: ignored);
- the reference's NaN rule (SPEC §6: never a finite gradient beside a NaN loss), against the CPU path.
(Windows with hand-written sequence ids: tests/core/test_windows.py.)
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

from vcrd import VCRDConfig
from vcrd.core.reference import vcrd_loss as reference_loss

from ..helpers import make_setup, tiny_llama, trainer_for


# ------------------------------------------------------------------------------------------ rank_teachers
def test_rank_teachers_means_are_the_hand_computed_ones():
    from vcrd.select.naturalness import ResponseScore
    from vcrd.select.selection import rank_teachers

    nan = math.nan
    prompts = ["p", "q", "p", "q"]
    teachers = ["a", "a", "b", "b"]
    scores = [ResponseScore(lalp=-1.0, galp=-2.0), ResponseScore(lalp=-3.0, galp=-0.5),
              ResponseScore(lalp=-2.0, galp=nan), ResponseScore(lalp=-0.5, galp=-4.0)]
    ranked = rank_teachers(prompts, teachers, scores)
    # by hand: a: LALP (-1 - 3)/2 = -2, GALP (-2 - 0.5)/2 = -1.25; b: LALP (-2 - 0.5)/2 = -1.25, GALP -4 (NaN
    # skipped); p won by a (-1 > -2), q by b (-0.5 > -3)
    assert [(r.teacher, r.mean_lalp, r.mean_galp, r.win_rate, r.n_responses) for r in ranked] == [
        ("b", -1.25, -4.0, 0.5, 2), ("a", -2.0, -1.25, 0.5, 2)]


# ------------------------------------------------------------------------------------------ trainer logs
def test_logged_weight_means_cover_every_accumulated_micro_batch(tmp_path):
    """One optimizer step of two micro-batches (sequential order: examples 0-1, then 2-3), one log: its
    ``w_val``/``w_dc`` are the token means over BOTH micro-batches, computed here with the float64
    reference on the untouched student (learning rate 0)."""
    tok, examples, teacher, collate = make_setup()
    student = tiny_llama(tok, 32, 4)
    frozen = copy.deepcopy(student).eval()
    cfg = VCRDConfig.preset("vcrd")
    sums, counts, per_batch = {"w_val": 0.0, "w_dc": 0.0}, 0, []
    for lo in (0, 2):
        batch = collate(examples[lo:lo + 2])
        ids, mask = batch["input_ids"], batch["attention_mask"]
        with torch.no_grad():
            s = frozen(input_ids=ids, attention_mask=mask).logits
            u = teacher(input_ids=ids, attention_mask=mask).logits
        _, stats = reference_loss(s[:, :-1].double(), u[:, :-1].double(), batch["labels"][:, 1:],
                                  step_ids=batch["step_ids"][:, 1:], config=cfg, return_stats=True)
        valid = batch["labels"][:, 1:] != -100
        for name in sums:
            sums[name] += float(getattr(stats, name)[valid].sum())
        counts += int(valid.sum())
        per_batch.append({name: float(getattr(stats, name)[valid].mean()) for name in sums})
    # the micro-batches are distinguishable (the last one alone would log another mean)
    assert abs(per_batch[0]["w_dc"] - per_batch[1]["w_dc"]) > 1e-3, per_batch
    trainer = trainer_for(student, teacher, collate, examples[:4], tmp_path, cfg, max_steps=1, logging_steps=1,
                          per_device_train_batch_size=2, gradient_accumulation_steps=2, learning_rate=0.0)
    trainer.train()
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logged) == 1
    for name in sums:
        assert logged[0][name] == pytest.approx(sums[name] / counts, abs=2e-4), (name, logged[0], per_batch)


# ------------------------------------------------------------------------------------------ fused-linear bias
def test_fused_linear_teacher_bias_matches_the_reference_on_biased_logits():
    from vcrd.loss.fused_linear import fused_linear_vcrd_loss

    g = torch.Generator().manual_seed(3)
    N, H, V = 37, 8, 53
    hs, ht = torch.randn(N, H, generator=g), torch.randn(N, H, generator=g)
    Ws, Wt = torch.randn(V, H, generator=g) * 0.5, torch.randn(V, H, generator=g) * 0.5
    bs, bt = torch.randn(V, generator=g), torch.randn(V, generator=g) * 3.0
    y = torch.randint(0, V, (N,), generator=g)
    y[::5] = -100
    cfg = VCRDConfig.preset("vcrd")

    def truth(with_bias: bool):
        h, W, b = (x.double().requires_grad_(True) for x in (hs, Ws, bs))
        teacher = ht.double() @ Wt.double().T + (bt.double() if with_bias else 0.0)
        loss = reference_loss(h @ W.T + b, teacher, y, config=cfg)
        loss.backward()
        return [loss.detach(), h.grad, W.grad, b.grad]

    h, W, b = (x.clone().requires_grad_(True) for x in (hs, Ws, bs))
    loss = fused_linear_vcrd_loss(h, W, ht, Wt, y, student_bias=b, teacher_bias=bt, config=cfg, impl="torch",
                                  chunk_size=16)
    loss.backward()
    got = [loss.detach(), h.grad, W.grad, b.grad]
    want, unbiased = truth(True), truth(False)
    assert abs(float(want[0] - unbiased[0])) > 1e-2  # the teacher's bias matters here
    for name, a, e in zip(("loss", "grad_hidden", "grad_weight", "grad_bias"), got, want):
        torch.testing.assert_close(a.double(), e, rtol=1e-4, atol=1e-5 * float(e.abs().max()), msg=name)


# ------------------------------------------------------------------------------------------ NaN rule (SPEC §6)
@pytest.mark.parametrize("divergence", ["fkl", "rkl", "jsd"])
@pytest.mark.parametrize("where", ["student", "teacher"])
@pytest.mark.parametrize("preset", ["kd", "vcrd"])
def test_reference_nan_rule_is_spec_6_and_the_cpu_path(preset, where, divergence):
    """A NaN in one non-ignored row's logits: the loss is NaN, that row's whole gradient is NaN (never a
    finite gradient beside a NaN loss), and the rows with a NaN gradient are the CPU path's. Without
    windows (``kd``) every other row's gradient stays finite; ignored rows never matter."""
    from vcrd.loss.functional import vcrd_loss

    g = torch.Generator().manual_seed(1)
    s, u = torch.randn(8, 11, generator=g, dtype=torch.float64), torch.randn(8, 11, generator=g, dtype=torch.float64)
    y = torch.randint(0, 11, (8,), generator=g)
    y[6] = -100
    (s if where == "student" else u)[2, 3] = math.nan
    (s if where == "student" else u)[6, 0] = math.nan  # an ignored row: never matters
    cfg = VCRDConfig.preset(preset, normalize="tokens", divergence=divergence)
    results = []
    for fn, kw in ((reference_loss, {}), (vcrd_loss, {"impl": "torch"})):
        x = s.clone().requires_grad_(True)
        loss = fn(x, u, y, config=cfg, **kw)
        loss.backward()
        results.append((loss.detach(), x.grad))
    (ref_loss, ref_grad), (cpu_loss, cpu_grad) = results
    assert torch.isnan(ref_loss) and torch.isnan(cpu_loss)
    assert torch.isnan(ref_grad[2]).all(), ref_grad[2]
    assert torch.equal(ref_grad.isnan().any(1), cpu_grad.isnan().any(1)), (ref_grad.isnan().any(1), cpu_grad)
    assert not ref_grad[6].isnan().any()
    if preset == "kd":
        others = [r for r in range(8) if r != 2]
        assert torch.isfinite(ref_grad[others]).all()
