"""Tier 2: the CPU fast path (impl="torch", default settings: compiled) against the reference, with the
three-way rule of DESIGN.md on the loss and the gradient (random upstream gradient)."""

from __future__ import annotations

import math

import pytest
import torch

from vcrd import VCRDConfig, vcrd_loss

from ..helpers import LOGITS_CONFIGS as CONFIGS
from ..helpers import batch, three_way


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    """Chunks of 16 rows, so windows and steps straddle chunk boundaries at these small sizes
    (tests/backends/test_large_n.py runs the default 64-row chunks at realistic sizes)."""
    monkeypatch.setenv("VCRD_CHUNK_ROWS", "16")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_matches_reference(name, dtype):
    three_way(*batch(dtype=dtype), CONFIGS[name])


@pytest.mark.parametrize("std,agreement", [(30.0, 0.8), (10.0, 0.999), (1.0, 0.3)],
                         ids=["std30", "near-equal", "soft"])
@pytest.mark.parametrize("name", ["vcrd", "jsd0.3-T2-ce"])
def test_logit_scales(name, std, agreement):
    three_way(*batch(std=std, agreement=agreement, V=2053), CONFIGS[name])


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("name", ["kd", "vcrd"])
def test_reductions_with_random_upstream_gradient(reduction, name):
    three_way(*batch(B=3), CONFIGS[name], reduction=reduction, upstream="random")


def test_packed_layout_and_vocab_truncation():
    s, u, y, steps = batch(N=50, V=300)
    s = torch.cat([s, torch.randn(50, 7) * 40], 1)
    u = torch.cat([u, torch.randn(50, 11) * 40], 1)
    out = three_way(s, u, y, steps, CONFIGS["vcrd"], cu_seqlens=torch.tensor([0, 20, 20, 50]), vocab_size=300)
    assert out["impl"][1][:, 300:].abs().max() == 0


def _accumulate(s, u, y, steps, cfg, parts, num_items):
    """Σ over micro-batches (slices of the batch dim) of the loss with ``num_items_in_batch``, and the
    gradient accumulated into one leaf."""
    x = s.clone().requires_grad_()
    total = 0.0
    for part in parts:
        loss = vcrd_loss(x[part], u[part], y[part], step_ids=steps[part], config=cfg, num_items_in_batch=num_items,
                         impl="torch")
        loss.backward()
        total = total + loss.detach()
    return total, x.grad


def test_gradient_accumulation_with_num_items_in_batch_tokens():
    """normalize="tokens" (kd): the sum over micro-batches equals the full-batch loss, exactly (SPEC §6)."""
    s, u, y, steps = batch(N=64, B=4)
    cfg = CONFIGS["kd"]
    n_valid = int((y != -100).sum())
    total, grad = _accumulate(s, u, y, steps, cfg, (slice(0, 1), slice(1, 4)), n_valid)
    full = s.clone().requires_grad_()
    vcrd_loss(full, u, y, step_ids=steps, config=cfg, impl="torch").backward()
    ref = vcrd_loss(s.double(), u.double(), y, step_ids=steps, config=cfg, impl="reference")
    torch.testing.assert_close(total.double(), ref, rtol=1e-5, atol=0)
    torch.testing.assert_close(grad, full.grad, rtol=1e-5, atol=1e-8)


def test_gradient_accumulation_with_num_items_in_batch_weights():
    """normalize="weights" (vcrd) with ``num_items_in_batch = M``: ``Z = (Σ m·w / Σ m)·M`` per
    micro-batch, so the sum over micro-batches is the token-weighted average of each micro-batch's
    weighted mean (SPEC §6), and exactly the full-batch loss with one micro-batch."""
    s, u, y, steps = batch(N=64, B=4)
    cfg = CONFIGS["vcrd"]
    assert cfg.normalize == "weights"
    n_valid = int((y != -100).sum())
    parts = (slice(0, 1), slice(1, 4))
    total, grad = _accumulate(s, u, y, steps, cfg, parts, n_valid)
    want, want_grad = 0.0, torch.zeros_like(s, dtype=torch.float64)
    for part in parts:
        x = s[part].double().requires_grad_()
        mean_p = vcrd_loss(x, u[part].double(), y[part], step_ids=steps[part], config=cfg, impl="reference")
        share = int((y[part] != -100).sum()) / n_valid
        (share * mean_p).backward()
        want = want + share * mean_p.detach()
        want_grad[part] = x.grad
    torch.testing.assert_close(total.double(), want, rtol=1e-5, atol=0)
    torch.testing.assert_close(grad.double(), want_grad, rtol=1e-4, atol=1e-5 * want_grad.abs().max().item())
    # one micro-batch: M = Σ m gives the plain weighted mean
    one, _ = _accumulate(s, u, y, steps, cfg, (slice(0, 4),), n_valid)
    torch.testing.assert_close(one.double(), vcrd_loss(s.double(), u.double(), y, step_ids=steps, config=cfg,
                                                       impl="reference"), rtol=1e-5, atol=0)


@pytest.mark.parametrize("div", ["fkl", "rkl", "jsd"])
def test_gradient_equals_finite_differences_float64(div, monkeypatch):
    """fp64 central differences of the chunked path's own loss value against its gradient, where the
    loss is a smooth function of s (no weights: they are detached by definition). The same check
    as torch.autograd.gradcheck, which needs a re-entrant backward this path refuses on purpose.
    Eager on purpose (VCRD_COMPILE=0): 182 calls, and the compiled fp64 path is checked against the
    reference in test_compiled.py."""
    monkeypatch.setenv("VCRD_COMPILE", "0")
    s, u, y, _ = batch(N=7, V=13, std=2.0)
    cfg = VCRDConfig.preset("kd", divergence=div, beta=0.3, temperature=1.7, ce_weight=0.4)
    s, u = s.double(), u.double()
    x = s.clone().requires_grad_()
    vcrd_loss(x, u, y, config=cfg, impl="torch").backward()
    eps = 1e-6
    numeric = torch.zeros_like(s)
    for idx in range(s.numel()):
        hi, lo = s.clone().reshape(-1), s.clone().reshape(-1)
        hi[idx] += eps
        lo[idx] -= eps
        f = lambda z: vcrd_loss(z.reshape(s.shape), u, y, config=cfg, impl="torch")  # noqa: E731
        numeric.reshape(-1)[idx] = (f(hi) - f(lo)) / (2 * eps)
    torch.testing.assert_close(x.grad, numeric, rtol=1e-6, atol=1e-8)


# num_items_in_batch only applies to the mean reductions, so the other reductions run without one
ALL_IGNORED_CASES = [(r, n) for r in ("mean", "batchmean") for n in (None, 0, 7)] + [("sum", None), ("none", None)]


@pytest.mark.parametrize("reduction,num_items", ALL_IGNORED_CASES,
                         ids=[f"{r}-{'no-count' if n is None else f'count{n}'}" for r, n in ALL_IGNORED_CASES])
@pytest.mark.parametrize("normalize", ["tokens", "weights"])
def test_all_ignored_batch_gives_zero(reduction, normalize, num_items):
    """SPEC §6: an all-ignored (micro-)batch gives loss 0 and zero gradients, never NaN, whatever
    ``num_items_in_batch`` is (0 included)."""
    s, u, y, steps = batch(N=20, V=50)
    for impl in ("torch", "reference"):
        x = s.clone().requires_grad_()
        loss = vcrd_loss(x, u, torch.full_like(y, -100), step_ids=steps, config=VCRDConfig(normalize=normalize),
                         reduction=reduction, num_items_in_batch=num_items, impl=impl)
        loss.sum().backward()
        assert torch.all(loss == 0) and torch.all(x.grad == 0), impl


def test_stats_match_reference():
    s, u, y, steps = batch()
    _, got = vcrd_loss(s, u, y, step_ids=steps, impl="torch", return_stats=True)
    _, want = vcrd_loss(s.double(), u.double(), y, step_ids=steps, impl="reference", return_stats=True)
    for name in ("D", "w_val", "w_dc", "g", "n", "lp_s", "lp_u"):
        torch.testing.assert_close(getattr(got, name).double(), getattr(want, name), rtol=1e-4, atol=1e-4,
                                   msg=lambda m, name=name: f"{name}: {m}")
    assert torch.equal(got.agree, want.agree) and torch.equal(got.valid, want.valid)
    means = got.means()
    assert set(means) == {"D", "w_val", "w_dc", "g", "n", "lp_s", "lp_u", "agree"}
    torch.testing.assert_close(means["w_dc"], want.w_dc[want.valid].mean(), rtol=1e-4, atol=1e-6)


def test_no_grad_and_eval_inputs():
    s, u, y, steps = batch(N=20, V=50)
    with torch.no_grad():
        a = vcrd_loss(s.clone().requires_grad_(), u, y, step_ids=steps, impl="torch")
    b = vcrd_loss(s, u, y, step_ids=steps, impl="torch")
    assert not a.requires_grad and torch.equal(a, b)


def test_extreme_and_masked_logits():
    """-inf entries (masked vocabulary) in both models and ±1e4 logits give finite results."""
    s, u, y, steps = batch(N=30, V=97)
    s[:, 90:] = float("-inf")
    u[:, 90:] = float("-inf")
    s[0, 3], u[1, 5] = 1e4, -1e4
    y = torch.where(y >= 90, 1, y)
    for div in ("fkl", "rkl", "jsd"):
        three_way(s, u, y, steps, VCRDConfig(divergence=div, validity="expected"))


def _sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def test_support_log_ratio_is_clamped_and_a_label_both_models_mask_is_neutral():
    """SPEC §5: ``l_r = clamp(lp_s - lp_u, -50, 50)``, and 0 when both log-probs are -inf. Row 3's
    label is masked (-inf) in both models; row 7's is -1e4 below the rest in the teacher only (l is
    clamped to +50), row 12's in the student only (l clamped to -50). Every later window must stay
    finite and equal the formula."""
    s, u, y, steps = batch(N=24, V=97)
    y[:] = torch.where(y == -100, 5, y)  # every row valid: windows are the last 5 rows (no step ids)
    y[3], y[7], y[12] = 11, 13, 17
    s[3, 11] = u[3, 11] = float("-inf")
    u[7, 13] = -1e4
    s[12, 17] = -1e4
    cfg = VCRDConfig(validity=None, window_steps=4, normalize="tokens")
    _, st = vcrd_loss(s, u, y, config=cfg, impl="torch", return_stats=True)
    _, ref = vcrd_loss(s.double(), u.double(), y, config=cfg, impl="reference", return_stats=True)
    lp_s, lp_u = ref.lp_s, ref.lp_u
    assert lp_s[3] == lp_u[3] == -math.inf and lp_u[7] < -1000 and lp_s[12] < -1000
    ratio = torch.where(torch.isinf(lp_s) & torch.isinf(lp_u), 0.0, (lp_s - lp_u).clamp(-50, 50))
    assert ratio[3] == 0 and ratio[7] == 50 and ratio[12] == -50
    want = torch.tensor([_sigmoid(ratio[max(0, r - 4):r + 1].mean().item()) for r in range(24)], dtype=torch.float64)
    assert torch.isfinite(st.w_dc).all() and torch.isfinite(ref.w_dc).all()
    torch.testing.assert_close(ref.w_dc, want, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(st.w_dc.double(), want, rtol=1e-4, atol=1e-6)


def test_label_masked_by_both_models_gives_a_finite_loss():
    """A row whose label both models mask (-inf) has a finite D and, with ``ce_weight=0``, no CE term:
    the loss and gradient are finite and match the reference (SPEC §5–6: such a label must not
    poison the loss)."""
    s, u, y, steps = batch(N=24, V=97)
    y[3] = 11
    s[3, 11] = u[3, 11] = float("-inf")
    out = three_way(s, u, y, steps, VCRDConfig(validity=None, window_steps=4))
    assert all(torch.isfinite(t).all() for t in out["impl"])
