"""The fused-linear loss (hidden states + LM heads in) against the reference on materialised logits."""

from __future__ import annotations

import pytest
import torch

from vcrd import FusedLinearVCRDLoss, VCRDConfig, fused_linear_vcrd_loss

from .conftest import TOL, assert_three_way, ignore_some, step_ids_for


def heads(N=47, Hs=31, Ht=40, V=1271, Vt=None, bias=True, seed=0, dtype=torch.float32):
    """Hidden states and LM heads whose logits look like trained models' (std ~10, correlated)."""
    g = torch.Generator().manual_seed(seed)
    hs = torch.randn(N, Hs, generator=g, dtype=torch.float64)
    Ws = torch.randn(V, Hs, generator=g, dtype=torch.float64) * (10 / Hs ** 0.5)
    ht = torch.cat([hs, torch.randn(N, Ht - Hs, generator=g, dtype=torch.float64)], 1) if Ht > Hs else hs[:, :Ht]
    Wt = torch.cat([Ws, torch.randn(V, Ht - Hs, generator=g, dtype=torch.float64) * 2], 1) if Ht > Hs else Ws[:, :Ht]
    Wt = Wt + torch.randn(Wt.shape, generator=g, dtype=torch.float64) * (4 / Ht ** 0.5)
    if Vt:
        Wt = torch.cat([Wt, torch.randn(Vt - V, Ht, generator=g, dtype=torch.float64)], 0)
    bs = torch.randn(V, generator=g, dtype=torch.float64) if bias else None
    y = ignore_some((hs @ Ws.T).argmax(-1), seed=seed)
    steps = step_ids_for(N, seed=seed, p_new=0.15)
    cast = lambda t: None if t is None else t.to(dtype)  # noqa: E731
    return dict(hs=cast(hs), Ws=cast(Ws), bs=cast(bs), ht=cast(ht), Wt=cast(Wt), y=y, steps=steps)


def run(d, cfg, dtype, impl, **kw):
    """Loss and the gradients of student hidden, weight, bias for one implementation in ``dtype``."""
    leaves = [None if d[k] is None else d[k].detach().to(dtype).requires_grad_() for k in ("hs", "Ws", "bs")]
    loss = fused_linear_vcrd_loss(leaves[0], leaves[1], d["ht"].to(dtype), d["Wt"].to(dtype), d["y"],
                                  student_bias=leaves[2], step_ids=d["steps"], config=cfg, impl=impl, **kw)
    loss.backward()
    return [loss.detach()] + [t.grad for t in leaves if t is not None]


def three_way(d, cfg, dtype=torch.float32, impl="torch", **kw):
    truth = run(d, cfg, torch.float64, "reference", **{k: v for k, v in kw.items() if k != "chunk_size"})
    base = run(d, cfg, torch.float32, "reference", **{k: v for k, v in kw.items() if k != "chunk_size"})
    got = run(d, cfg, dtype, impl, **kw)
    for name, a, b, c in zip(("loss", "grad_hidden", "grad_weight", "grad_bias"), got, base, truth):
        assert_three_way(name, a, b.to(torch.float64) if dtype != torch.float64 else b, c, dtype)


CONFIGS = {"kd": VCRDConfig.preset("kd"), "vcrd": VCRDConfig(),
           "jsd-T2-ce-expected": VCRDConfig(divergence="jsd", beta=0.3, temperature=2.0, ce_weight=0.3,
                                            validity="expected"),
           "rkl-weights": VCRDConfig(divergence="rkl", normalize="weights", window_steps=1)}


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("chunk", [7, "auto"])
def test_matches_reference_fp32(name, chunk):
    three_way(heads(), CONFIGS[name], chunk_size=chunk)


def test_matches_reference_float64():
    d = heads(N=29, V=301)
    got = run(d, VCRDConfig(ce_weight=0.2), torch.float64, "torch", chunk_size=5)
    want = run(d, VCRDConfig(ce_weight=0.2), torch.float64, "reference")
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_bf16_heads_and_hidden():
    d = heads(N=40, V=777)
    three_way({k: (v.to(torch.bfloat16).to(torch.float64) if k in ("hs", "Ws", "bs", "ht", "Wt") and v is not None
                   else v) for k, v in d.items()}, CONFIGS["vcrd"], dtype=torch.bfloat16, chunk_size=9)


def test_batched_input_vocab_mismatch_and_no_bias():
    d = heads(N=48, V=500, Vt=512, bias=False)
    d["hs"], d["ht"], d["y"] = d["hs"].reshape(4, 12, -1), d["ht"].reshape(4, 12, -1), d["y"].reshape(4, 12)
    d["steps"] = torch.stack([step_ids_for(12, seed=b) for b in range(4)])
    three_way(d, CONFIGS["vcrd"], vocab_size=500, chunk_size=11)


def test_gradient_accumulation_with_num_items_in_batch():
    """Two micro-batches (one sequence each) with the global token count sum to the full batch."""
    d = heads(N=48, V=300)
    steps = torch.cat([d["steps"][:24] - d["steps"][0], d["steps"][24:] - d["steps"][24]])
    n_valid = int((d["y"] != -100).sum())
    hs, Ws = d["hs"].clone().requires_grad_(), d["Ws"].clone().requires_grad_()
    total = 0.0
    for rows in (slice(0, 24), slice(24, 48)):
        loss = fused_linear_vcrd_loss(hs[rows], Ws, d["ht"][rows], d["Wt"], d["y"][rows], step_ids=steps[rows],
                                      num_items_in_batch=n_valid, impl="torch")
        loss.backward()
        total = total + loss.detach()
    hs2, Ws2 = d["hs"].clone().requires_grad_(), d["Ws"].clone().requires_grad_()
    whole = fused_linear_vcrd_loss(hs2, Ws2, d["ht"], d["Wt"], d["y"], step_ids=steps,
                                   cu_seqlens=torch.tensor([0, 24, 48]), impl="torch")
    whole.backward()
    torch.testing.assert_close(total, whole.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(hs.grad, hs2.grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(Ws.grad, Ws2.grad, rtol=1e-5, atol=1e-7)


def test_stats_and_module():
    d = heads(N=30, V=211)
    loss, stats = FusedLinearVCRDLoss("vcrd", chunk_size=4, impl="torch")(
        d["hs"], d["Ws"], d["ht"], d["Wt"], d["y"], student_bias=d["bs"], step_ids=d["steps"], return_stats=True)
    s = d["hs"].double() @ d["Ws"].double().T + d["bs"].double()
    u = d["ht"].double() @ d["Wt"].double().T
    from vcrd import vcrd_loss

    want, ws = vcrd_loss(s, u, d["y"], step_ids=d["steps"], impl="reference", return_stats=True)
    torch.testing.assert_close(loss.double(), want, rtol=1e-5, atol=TOL[torch.float32])
    for name in ("D", "w_val", "w_dc", "n", "lp_s", "lp_u"):
        torch.testing.assert_close(getattr(stats, name).double(), getattr(ws, name), rtol=1e-4, atol=1e-4)
    assert torch.equal(stats.valid, ws.valid)


def test_frozen_head_gets_no_gradient_and_hidden_still_does():
    d = heads(N=20, V=100)
    hs = d["hs"].clone().requires_grad_()
    fused_linear_vcrd_loss(hs, d["Ws"], d["ht"], d["Wt"], d["y"], impl="torch").backward()
    assert hs.grad is not None and d["Ws"].grad is None


BAD = {
    "teacher-hidden-grad": (lambda d: {**d, "ht": d["ht"].clone().requires_grad_()}, {}, ValueError, "teacher_hidden"),
    "teacher-weight-grad": (lambda d: {**d, "Wt": d["Wt"].clone().requires_grad_()}, {}, ValueError, "teacher_weight"),
    "hidden-size": (lambda d: {**d, "Ws": d["Ws"][:, :-1]}, {}, ValueError, "student_weight"),
    "rows": (lambda d: {**d, "ht": d["ht"][:-1]}, {}, ValueError, "teacher_hidden"),
    "labels": (lambda d: {**d, "y": d["y"][:-1]}, {}, ValueError, "labels"),
    "bias": (lambda d: {**d, "bs": d["bs"][:-1]}, {}, ValueError, "student_bias"),
    "vocab": (lambda d: {**d, "Wt": d["Wt"][:-1]}, {}, ValueError, "vocab_size"),
    "chunk": (lambda d: d, {"chunk_size": 0}, ValueError, "chunk_size"),
    "reduction": (lambda d: d, {"reduction": "none"}, ValueError, "reduction"),
    "int-hidden": (lambda d: {**d, "hs": d["hs"].long()}, {}, TypeError, "student_hidden"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input(case):
    make, kw, error, name = BAD[case]
    d = make(heads(N=12, V=50))
    with pytest.raises(error, match=name):
        fused_linear_vcrd_loss(d["hs"], d["Ws"], d["ht"], d["Wt"], d["y"], student_bias=d["bs"], impl="torch", **kw)
