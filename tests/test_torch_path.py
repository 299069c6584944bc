"""Tier 2: the CPU fast path (impl="torch") against the reference, with the three-way rule."""

from __future__ import annotations

import pytest
import torch

from vcrd import VCRDConfig, vcrd_loss

from .conftest import assert_three_way, ignore_some, realistic_logits, step_ids_for

CONFIGS = {
    "kd": VCRDConfig.preset("kd"),
    "discord": VCRDConfig.preset("discord"),
    "vcrd": VCRDConfig.preset("vcrd"),
    "rkl-expected": VCRDConfig(divergence="rkl", validity="expected"),
    "jsd0.3-T2-ce": VCRDConfig(divergence="jsd", beta=0.3, temperature=2.0, ce_weight=0.5),
    "fkl-T2-weights": VCRDConfig(temperature=2.0, normalize="weights", window_steps=1),
}


def batch(N=63, V=1271, std=10.0, agreement=0.8, dtype=torch.float32, B=None, seed=0):
    s, u, y = realistic_logits(N, V, std=std, agreement=agreement, seed=seed)
    y = ignore_some(y, seed=seed)
    steps = step_ids_for(N, seed=seed)
    if B:
        s, u, y = s.reshape(B, N // B, V), u.reshape(B, N // B, V), y.reshape(B, N // B)
        steps = torch.stack([step_ids_for(N // B, seed=seed + b) for b in range(B)])
    return s.to(dtype), u.to(dtype), y, steps


def three_way(s, u, y, steps, cfg, reduction="mean", upstream=None, impl="torch", **kw):
    """Loss and gradient: ``impl`` in the input dtype vs reference in fp64 (truth) and fp32 (base)."""
    out = {}
    for name, dtype, which in [("impl", s.dtype, impl), ("base", torch.float32, "reference"),
                               ("truth", torch.float64, "reference")]:
        x = s.detach().to(dtype).requires_grad_()
        loss = vcrd_loss(x, u.to(dtype), y, step_ids=steps, config=cfg, reduction=reduction, impl=which, **kw)
        g = torch.randn(loss.shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64) \
            if upstream == "random" else torch.ones(loss.shape, dtype=torch.float64)
        loss.backward(g.to(loss.dtype))
        out[name] = (loss.detach(), x.grad)
    for i, what in enumerate(("loss", "grad")):
        assert_three_way(what, out["impl"][i], out["base"][i], out["truth"][i], s.dtype)
    return out


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    """Chunks of 16 rows, so windows and steps straddle chunk boundaries."""
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
def test_reductions_with_random_upstream_gradient(reduction):
    three_way(*batch(B=3), CONFIGS["vcrd"], reduction=reduction, upstream="random")


def test_packed_layout_and_vocab_truncation():
    s, u, y, steps = batch(N=50, V=300)
    s = torch.cat([s, torch.randn(50, 7) * 40], 1)
    u = torch.cat([u, torch.randn(50, 11) * 40], 1)
    out = three_way(s, u, y, steps, CONFIGS["vcrd"], cu_seqlens=torch.tensor([0, 20, 20, 50]), vocab_size=300)
    assert out["impl"][1][:, 300:].abs().max() == 0


def test_gradient_accumulation_with_num_items_in_batch():
    s, u, y, steps = batch(N=64, B=4)
    n_valid = int((y != -100).sum())
    full = s.clone().requires_grad_()
    vcrd_loss(full, u, y, step_ids=steps, impl="torch").backward()
    half = s.clone().requires_grad_()
    total = 0.0
    for part in (slice(0, 2), slice(2, 4)):
        loss = vcrd_loss(half[part], u[part], y[part], step_ids=steps[part], num_items_in_batch=n_valid, impl="torch")
        loss.backward()
        total = total + loss.detach()
    ref = vcrd_loss(s, u, y, step_ids=steps, impl="reference")
    torch.testing.assert_close(total, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(half.grad, full.grad, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("div", ["fkl", "rkl", "jsd"])
def test_gradient_equals_finite_differences_float64(div):
    """fp64 central differences of the chunked path's own loss value against its gradient, where the
    loss is a smooth function of s (no weights: they are detached by definition). The same check
    as torch.autograd.gradcheck, which needs a re-entrant backward this path refuses on purpose."""
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


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("normalize", ["tokens", "weights"])
def test_all_ignored_batch_gives_zero(reduction, normalize):
    s, u, y, steps = batch(N=20, V=50)
    x = s.clone().requires_grad_()
    loss = vcrd_loss(x, u, torch.full_like(y, -100), step_ids=steps, config=VCRDConfig(normalize=normalize),
                     reduction=reduction, impl="torch")
    loss.sum().backward()
    assert torch.all(loss == 0) and torch.all(x.grad == 0)


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
