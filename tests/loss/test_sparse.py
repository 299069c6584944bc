"""SPEC §10: the sparse (top-K) teacher against the dense formulas on the completed teacher."""

from __future__ import annotations

import math

import pytest
import torch

from vcrd import (
    SparseTeacher,
    VCRDConfig,
    fused_linear_sparse_vcrd_loss,
    fused_linear_vcrd_loss,
    reference,
    sparse_vcrd_loss,
    vcrd_loss,
)
from vcrd.core import sparse_teacher as sparse_module

from ..helpers import assert_parity, ignore_some, realistic_logits, step_ids_for

CONFIGS = {
    "kd": VCRDConfig.preset("kd"),
    "vcrd": VCRDConfig.preset("vcrd"),
    "discord-T2": VCRDConfig.preset("discord", temperature=2.0),
    "jsd0.3-expected": VCRDConfig(divergence="jsd", beta=0.3, validity="expected"),
    "rkl-T2": VCRDConfig.preset("vcrd", divergence="rkl", temperature=2.0),
}


def completed_dense(teacher_logits: torch.Tensor, k: int) -> torch.Tensor:
    """The test's own completion (SPEC §10), written apart from vcrd: top-k log-probs kept, the rest
    of the mass spread uniformly over the other V - k tokens."""
    logq = torch.log_softmax(teacher_logits.double(), -1)
    V = logq.shape[-1]
    top, ids = logq.topk(k, -1)
    if k == V:
        return logq
    tail = torch.log1p(-top.exp().sum(-1, keepdim=True).clamp(max=1.0))
    out = (tail - math.log(V - k)).expand_as(logq).clone()
    return out.scatter(-1, ids, top)


def problem(N=150, V=257, seed=0):
    s, u, y = realistic_logits(N, V, std=3.0, agreement=0.8, seed=seed)
    return s, u, ignore_some(y, seed=seed), step_ids_for(N, seed=seed)


def test_from_logits_fields():
    _, u, _, _ = problem()
    t = SparseTeacher.from_logits(u, 16)
    logq = torch.log_softmax(u.double(), -1)
    assert t.topk_ids.shape == (150, 16) and torch.equal(t.topk_ids[:, 0], u.argmax(-1))
    torch.testing.assert_close(t.topk_logprobs.double(), logq.gather(1, t.topk_ids), rtol=0, atol=1e-5)
    rest = logq.scatter(1, t.topk_ids, -math.inf).logsumexp(-1)
    torch.testing.assert_close(t.tail_logprob.double(), rest, rtol=1e-4, atol=1e-5)
    assert torch.isinf(SparseTeacher.from_logits(u, 257).tail_logprob).all()


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("k", [8, 64, 257], ids=["K8", "K64", "K=V"])
def test_sparse_loss_equals_dense_formulas_on_the_completed_teacher(name, k):
    s, u, y, steps = problem()
    cfg = CONFIGS[name]
    t = SparseTeacher.from_logits(u, k)
    dense = completed_dense(u, k)
    out = {}
    for which, fn in (("impl", lambda x: sparse_vcrd_loss(x, t, y, step_ids=steps, config=cfg, impl="torch")),
                      ("base", lambda x: reference.vcrd_loss(x, dense.float(), y, step_ids=steps, config=cfg)),
                      ("truth", lambda x: reference.vcrd_loss(x, dense, y, step_ids=steps, config=cfg))):
        x = s.clone().to(torch.float64 if which == "truth" else torch.float32).requires_grad_()
        loss = fn(x)
        loss.backward()
        out[which] = (loss.detach(), x.grad)
    for i, what in enumerate(("loss", "grad")):
        assert_parity(what, out["impl"][i], out["base"][i], out["truth"][i], torch.float32)


def test_k_equal_v_equals_the_dense_loss():
    s, u, y, steps = problem(seed=3)
    t = SparseTeacher.from_logits(u, u.shape[-1])
    for cfg in CONFIGS.values():
        a = sparse_vcrd_loss(s, t, y, step_ids=steps, config=cfg)
        b = vcrd_loss(s, u, y, step_ids=steps, config=cfg)
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("k", [16, 96])
def test_fused_linear_sparse_matches_its_reference_and_the_dense_fused_loss_at_k_equal_v(k):
    g = torch.Generator().manual_seed(5)
    B, T, H, V = 3, 70, 24, 96
    h = torch.randn(B, T, H, generator=g)
    w = (torch.randn(V, H, generator=g) * 0.6).requires_grad_()
    ht, wt = torch.randn(B, T, H, generator=g), torch.randn(V, H, generator=g) * 0.6
    y = ignore_some(torch.randint(0, V, (B, T), generator=g))
    t = SparseTeacher.from_logits(ht @ wt.T, k)
    grads = {}
    for impl in ("torch", "reference"):
        x = h.clone().requires_grad_()
        w.grad = None
        loss = fused_linear_sparse_vcrd_loss(x, w, t, y, config="vcrd", impl=impl, chunk_size=64)
        loss.backward()
        grads[impl] = (loss.detach().double(), x.grad.double(), w.grad.double())
    for a, b in zip(grads["torch"], grads["reference"]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6 * float(b.abs().max()))
    if k == V:
        dense = fused_linear_vcrd_loss(h, w, ht, wt, y, config="vcrd")
        torch.testing.assert_close(grads["torch"][0].float(), dense.detach(), rtol=1e-5, atol=1e-6)


def test_bad_sparse_teachers_are_refused_with_the_row():
    _, u, y, _ = problem(N=10, V=31)
    t = SparseTeacher.from_logits(u, 4)
    with pytest.raises(ValueError, match="topk_logprobs.*row 2"):
        lp = t.topk_logprobs.clone()
        lp[2, 1] = 0.5
        SparseTeacher(t.topk_ids, lp, t.tail_logprob)
    with pytest.raises(ValueError, match="tail_logprob.*row 0"):
        SparseTeacher(t.topk_ids, t.topk_logprobs, t.tail_logprob + 1.0)
    bad_ids = t.topk_ids.clone()
    bad_ids[7, 0] = 31
    with pytest.raises(ValueError, match="topk_ids.*row 7"):
        sparse_vcrd_loss(torch.randn(10, 31), SparseTeacher(bad_ids, t.topk_logprobs, t.tail_logprob), y)
    twice = t.topk_ids.clone()
    twice[5, 3] = twice[5, 1]
    with pytest.raises(ValueError, match=f"distinct ids.*row 5 repeats {int(twice[5, 1])}"):
        sparse_vcrd_loss(torch.randn(10, 31), SparseTeacher(twice, t.topk_logprobs, t.tail_logprob), y)
    with pytest.raises(ValueError, match="K=4 exceeds"):
        sparse_vcrd_loss(torch.randn(10, 3), t, None, config="kd")
    with pytest.raises(ValueError, match="rows shaped"):
        sparse_vcrd_loss(torch.randn(9, 31), t, y[:9])
    with pytest.raises(TypeError, match="SparseTeacher"):
        sparse_vcrd_loss(torch.randn(10, 31), u, y)
    with pytest.raises(ValueError, match="k: expected"):
        SparseTeacher.from_logits(u, 0)


@pytest.mark.parametrize("name,k", [("kd", 64), ("vcrd", 1031), ("discord-T2", 64), ("jsd0.3-expected", 256)],
                         ids=["kd-K64", "vcrd-K=V", "discord-T2-K64", "jsd-K256"])
def test_sparse_losses_at_realistic_size_with_default_settings(name, k):
    """N >= 1024 rows, default settings (compile on, 64-row chunks, automatic fused chunks), through the
    entry points users call (the O(K) CPU path), against the float64 reference on the completed teacher
    (three-way rule)."""
    g = torch.Generator().manual_seed(11)
    B, T, H, V = 4, 280, 48, 1031
    h = torch.randn(B, T, H, generator=g)
    w = torch.randn(V, H, generator=g) * 0.7
    u = (h + 0.5 * torch.randn(B, T, H, generator=g)) @ (w + 0.3 * torch.randn(V, H, generator=g)).T
    y = ignore_some(u.argmax(-1), seed=3)
    steps = torch.stack([step_ids_for(T, seed=b) for b in range(B)])
    teacher = SparseTeacher.from_logits(u, k)
    dense = completed_dense(u, k)
    cfg = CONFIGS[name]
    out = {}
    for which in ("impl", "base", "truth"):
        dtype = torch.float64 if which == "truth" else torch.float32
        x, wx = h.to(dtype).clone().requires_grad_(), w.to(dtype).clone().requires_grad_()
        if which == "impl":
            loss = fused_linear_sparse_vcrd_loss(x, wx, teacher, y, step_ids=steps, config=cfg)
        else:
            loss = reference.vcrd_loss(x @ wx.T, dense.to(dtype), y, step_ids=steps, config=cfg)
        loss.backward()
        out[which] = (loss.detach(), x.grad, wx.grad)
    for i, what in enumerate(("loss", "grad_hidden", "grad_weight")):
        assert_parity(what, out["impl"][i], out["base"][i], out["truth"][i], torch.float32)
    s = (h @ w.T).requires_grad_()
    logits_loss = sparse_vcrd_loss(s, teacher, y, step_ids=steps, config=cfg)
    logits_loss.backward()
    x = (h.double() @ w.double().T).requires_grad_()
    reference.vcrd_loss(x, dense, y, step_ids=steps, config=cfg).backward()
    torch.testing.assert_close(logits_loss.double(), out["truth"][0], rtol=1e-5, atol=0)
    assert (s.grad.double() - x.grad).abs().max() <= 1e-5 * x.grad.abs().max()


def test_the_cpu_path_never_densifies_the_teacher(monkeypatch):
    """O(K) teacher work (SPEC §10): neither entry point builds a [C, V] completed teacher on CPU."""
    s, u, y, steps = problem(N=40, V=97)
    t = SparseTeacher.from_logits(u, 8)
    want = sparse_vcrd_loss(s, t, y, step_ids=steps, impl="reference")

    def refuse(*args, **kwargs):
        raise AssertionError("the completed teacher was densified")

    monkeypatch.setattr(sparse_module, "complete", refuse)
    torch.testing.assert_close(sparse_vcrd_loss(s, t, y, step_ids=steps, impl="torch"), want.float(), rtol=1e-5,
                               atol=0)
    w = torch.eye(97)[:, :97]  # hidden states = logits
    torch.testing.assert_close(fused_linear_sparse_vcrd_loss(s, w, t, y, step_ids=steps), want.float(), rtol=1e-5,
                               atol=0)
    with pytest.raises(AssertionError, match="densified"):  # the guard itself works
        sparse_vcrd_loss(s, t, y, step_ids=steps, impl="reference")


@pytest.mark.parametrize("impl", ["torch", pytest.param("triton", marks=pytest.mark.triton)])
@pytest.mark.parametrize("name", ["vcrd", "jsd0.3-expected"])
def test_a_teacher_with_no_tail_mass_left(name, impl):
    """A teacher that masks all but 8 tokens of most rows (tail = -inf with K < V): the completed teacher
    gives the other tokens probability 0, as the dense formulas do (CE_su = inf, so w_val = 1 under
    validity="expected")."""
    s, u, y, steps = problem(N=60, V=101, seed=4)
    keep = u.topk(8, -1).indices
    masked = torch.full_like(u, -math.inf).scatter(1, keep, u.gather(1, keep))
    t = SparseTeacher.from_logits(torch.where(torch.arange(60)[:, None] % 4 == 0, u, masked), 8)
    assert torch.isinf(t.tail_logprob).sum() == 45
    dense = t.completed_logprobs(slice(None), 101, torch.float64)
    cfg = CONFIGS[name]
    x, xd = s.clone().requires_grad_(), s.double().requires_grad_()
    loss, stats = sparse_vcrd_loss(x, t, y, step_ids=steps, config=cfg, impl=impl, return_stats=True)
    want, want_stats = reference.vcrd_loss(xd, dense, y, step_ids=steps, config=cfg, return_stats=True)
    (loss + 0 * x.sum()).backward()
    want.backward()
    torch.testing.assert_close(loss.double(), want, rtol=1e-5, atol=0)
    torch.testing.assert_close(stats.w_val.double(), want_stats.w_val, rtol=1e-5, atol=1e-6)
    assert (x.grad.double() - xd.grad).abs().max() <= 1e-5 * xd.grad.abs().max()


TRITON_CASES = {  # name: (config, K); V = 1031 spans three 512-wide tiles
    "kd-K16": (CONFIGS["kd"], 16),
    "kd-K=V": (CONFIGS["kd"], 1031),
    "vcrd-K16": (CONFIGS["vcrd"], 16),
    "vcrd-K=V": (CONFIGS["vcrd"], 1031),
    "vcrd-T2-ce-K16": (VCRDConfig.preset("vcrd", temperature=2.0, ce_weight=0.5), 16),
    "rkl-T2-K16": (CONFIGS["rkl-T2"], 16),
    "rkl-ce-K=V": (VCRDConfig.preset("vcrd", divergence="rkl", ce_weight=0.3), 1031),
    "jsd-K16": (CONFIGS["jsd0.3-expected"], 16),
    "jsd-T2-ce-K=V": (VCRDConfig.preset("vcrd", divergence="jsd", beta=0.7, temperature=2.0, ce_weight=0.4), 1031),
}


@pytest.mark.triton
@pytest.mark.parametrize("case", list(TRITON_CASES))
def test_triton_path_matches_the_completed_teacher(case):
    """The Triton path (the sparse kernels) through both entry points (the fused-linear one writes the
    gradient over the logits), three-way against the float64 reference on the test's own completion;
    ignored rows included."""
    cfg, k = TRITON_CASES[case]
    V = 1031
    s, u, y, steps = problem(N=100, V=V, seed=6)
    t, dense = SparseTeacher.from_logits(u, k), completed_dense(u, k)
    w = torch.eye(V)  # hidden states = logits: the fused-linear loss sees the same rows
    out = {}
    for which, fn in (
            ("logits", lambda x: sparse_vcrd_loss(x, t, y, step_ids=steps, config=cfg, impl="triton")),
            ("fused", lambda x: fused_linear_sparse_vcrd_loss(x, w, t, y, step_ids=steps, config=cfg, impl="triton",
                                                              chunk_size=48)),
            ("base", lambda x: reference.vcrd_loss(x, dense.float(), y, step_ids=steps, config=cfg)),
            ("truth", lambda x: reference.vcrd_loss(x, dense, y, step_ids=steps, config=cfg))):
        x = s.clone().to(torch.float64 if which == "truth" else torch.float32).requires_grad_()
        loss = fn(x)
        loss.backward()
        out[which] = (loss.detach(), x.grad)
    for impl in ("logits", "fused"):
        for i, what in enumerate(("loss", "grad")):
            assert_parity(f"{impl} {what}", out[impl][i], out["base"][i], out["truth"][i], torch.float32)


@pytest.mark.triton
def test_the_triton_path_never_densifies_the_teacher(monkeypatch):
    """O(K) teacher work (SPEC §10) on the Triton path: neither entry point builds a [C, V] completed
    teacher, for any divergence, with and without a gradient."""
    s, u, y, steps = problem(N=40, V=97)
    t = SparseTeacher.from_logits(u, 8)
    w = torch.eye(97)
    names = ("vcrd", "rkl-T2", "jsd0.3-expected")
    wants = {name: sparse_vcrd_loss(s, t, y, step_ids=steps, config=CONFIGS[name], impl="reference") for name in names}

    def refuse(*args, **kwargs):
        raise AssertionError("the completed teacher was densified")

    monkeypatch.setattr(sparse_module, "complete", refuse)
    for name, want in wants.items():
        cfg = CONFIGS[name]
        x = s.clone().requires_grad_()
        loss = sparse_vcrd_loss(x, t, y, step_ids=steps, config=cfg, impl="triton")
        loss.backward()
        assert x.grad.isfinite().all() and x.grad.abs().sum() > 0
        torch.testing.assert_close(loss.detach(), want.float(), rtol=1e-5, atol=0)
        torch.testing.assert_close(fused_linear_sparse_vcrd_loss(s, w, t, y, step_ids=steps, config=cfg,
                                                                 impl="triton"), want.float(), rtol=1e-5, atol=0)
    with pytest.raises(AssertionError, match="densified"):  # the guard itself works
        sparse_vcrd_loss(s, t, y, step_ids=steps, impl="reference")
