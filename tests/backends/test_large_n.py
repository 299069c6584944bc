"""Parity at realistic sizes with vcrd's DEFAULT settings: the compiled CPU path, 64-row chunks, the
fused-linear loss's automatic chunking. Issue 9: every earlier parity test ran at most one 64-row
chunk under torch.compile, and the compiled fused-linear gradient was 1e5–1e7× off past it.

Nothing here sets ``VCRD_COMPILE``, ``VCRD_CHUNK_ROWS`` or ``VCRD_FUSED_BUDGET_MB``; the autouse
fixture removes them from the environment, so the defaults run whatever the caller exported.
Runtime: each divergence × dtype is one compiled graph pair; shapes are shared across tests.
"""

from __future__ import annotations

import functools

import pytest
import torch

from vcrd import VCRDConfig, vcrd_loss
from vcrd.core import settings

from ..helpers import (
    assert_parities,
    ignore_some,
    linear_heads,
    logits_three_way,
    realistic_logits,
    run_fused_linear,
    run_materialised,
    run_with_grads,
    step_ids_for,
    upstream_gradient,
)

CONFIGS = {
    "kd": VCRDConfig.preset("kd"),
    "discord": VCRDConfig.preset("discord"),
    "vcrd": VCRDConfig.preset("vcrd"),
    "rkl-expected": VCRDConfig(divergence="rkl", validity="expected"),
    "jsd0.3-T2-ce": VCRDConfig(divergence="jsd", beta=0.3, temperature=2.0, ce_weight=0.5),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
V = 3001
PACKED_BOUNDS = [0, 400, 401, 777, 1031]  # packed sequences, one of a single row
B, T = 4, 257


@pytest.fixture(autouse=True)
def default_settings(monkeypatch):
    for name in ("VCRD_COMPILE", "VCRD_CHUNK_ROWS", "VCRD_FUSED_BUDGET_MB"):
        monkeypatch.delenv(name, raising=False)
    assert settings.compile_enabled() and settings.chunk_rows() == 64


@functools.cache
def logits_batch(layout: str):
    """fp32 student/teacher logits (std 20 or 12, correlated), labels with 20 % ignored, step ids."""
    if layout == "batched":
        s, u, y = realistic_logits(B * T, V, std=20.0, agreement=0.8, seed=11)
        steps = torch.stack([step_ids_for(T, seed=20 + b) for b in range(B)])
        return s.reshape(B, T, V), u.reshape(B, T, V), ignore_some(y, seed=11).reshape(B, T), steps, {}
    n = PACKED_BOUNDS[-1]
    s, u, y = realistic_logits(n, V, std=12.0, agreement=0.9, seed=12)
    bounds = zip(PACKED_BOUNDS, PACKED_BOUNDS[1:])
    steps = torch.cat([step_ids_for(e - b, seed=30 + i) for i, (b, e) in enumerate(bounds)])
    return s, u, ignore_some(y, seed=12), steps, {"cu_seqlens": torch.tensor(PACKED_BOUNDS)}


@pytest.mark.parametrize("layout", ["batched", "packed"])
@pytest.mark.parametrize("dname", list(DTYPES))
@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_parity(name, dname, layout):
    """``vcrd_loss(impl="torch")`` at N >= 1028 rows (17 chunks), loss and gradient, random upstream."""
    s, u, y, steps, kw = logits_batch(layout)
    dtype = DTYPES[dname]
    logits_three_way(s.to(dtype), u.to(dtype), y, CONFIGS[name], step_ids=steps, **kw)


@pytest.mark.parametrize("reduction", ["none", "sum"])
def test_logits_parity_other_reductions(reduction):
    """Per-row (random upstream per row) and summed losses at N = 1028."""
    s, u, y, steps, _ = logits_batch("batched")
    logits_three_way(s, u, y, CONFIGS["vcrd"], step_ids=steps, reduction=reduction)


@pytest.mark.parametrize("name,dname", [("vcrd", "fp32"), ("kd", "bf16")])
def test_shifted_view_equals_contiguous_copy(name, dname):
    """``logits[:, :-1]`` of a ``[B, T, V]`` tensor with ``labels[:, 1:]`` (the usual causal-LM shift: a
    view whose rows cannot be flattened without a copy) gives the same loss and gradient as its
    contiguous copy, the reference's, and a zero gradient at the dropped last position."""
    s, u, y, steps, _ = logits_batch("batched")
    dtype = DTYPES[dname]
    s, u = s.to(dtype), u.to(dtype)
    cfg = CONFIGS[name]
    up = upstream_gradient(torch.Size([]), seed=4)

    full = s.clone().requires_grad_()
    view = vcrd_loss(full[:, :-1], u[:, :-1], y[:, 1:], step_ids=steps[:, 1:], config=cfg, impl="torch")
    assert not full[:, :-1].is_contiguous()
    view.backward(up.to(view.dtype))
    assert torch.all(full.grad[:, -1] == 0)

    copy = run_with_grads(lambda x: vcrd_loss(x, u[:, :-1].contiguous(), y[:, 1:].contiguous(), step_ids=steps[:, 1:],
                                              config=cfg, impl="torch"), [s[:, :-1].contiguous()], "random", seed=4)
    torch.testing.assert_close(view.detach(), copy[0], rtol=1e-6, atol=0)
    torch.testing.assert_close(full.grad[:, :-1], copy[1], rtol=1e-5, atol=1e-6 * copy[1].abs().max().item())
    base, truth = (run_with_grads(lambda x, d=d: vcrd_loss(x, u[:, :-1].to(d), y[:, 1:], step_ids=steps[:, 1:],
                                                           config=cfg, impl="reference"),
                                  [s[:, :-1].to(d)], "random", seed=4) for d in (torch.float32, torch.float64))
    assert_parities(("loss", "grad"), [view.detach(), full.grad[:, :-1]], base, truth, dtype)


# ------------------------------------------------------------------------------------------------
# fused-linear
# ------------------------------------------------------------------------------------------------

FUSED_N, FUSED_V = 1280, 8191


@functools.cache
def fused_inputs():
    """N = 1280 rows ([4, 320] hidden, ~1000 kept) of H_s = 96 (teacher H_t = 128), V = 8191, logits
    std ~10, 20 % ignored."""
    d = linear_heads(N=FUSED_N, Hs=96, Ht=128, V=FUSED_V, seed=3)
    d["hs"], d["ht"], d["y"] = d["hs"].reshape(4, 320, -1), d["ht"].reshape(4, 320, -1), d["y"].reshape(4, 320)
    d["steps"] = torch.stack([step_ids_for(320, seed=40 + b, p_new=0.15) for b in range(4)])
    return d


@functools.cache
def fused_truth_and_base(name: str):
    d, cfg = fused_inputs(), CONFIGS[name]
    return run_fused_linear(d, cfg, torch.float64, "reference"), run_materialised(d, cfg, torch.float32)


@pytest.mark.parametrize("chunk", ["auto", 300])
@pytest.mark.parametrize("name", ["kd", "discord", "vcrd"])
def test_fused_linear_parity(name, chunk):
    """``fused_linear_vcrd_loss`` at N = 1280 ([4, 320, 96] hidden), V = 8191: ``"auto"`` gives one
    chunk of all ~1000 kept rows (16 compiled 64-row sub-chunks writing the gradient over the
    logits), 300 gives four chunks; loss and the gradients of hidden, weight and bias vs fp64."""
    d = fused_inputs()
    assert d["y"].numel() >= 1024 and int((d["y"] != -100).sum()) > 15 * 64
    truth, base = fused_truth_and_base(name)
    got = run_fused_linear(d, CONFIGS[name], torch.float32, "torch", chunk_size=chunk)
    assert_parities(("loss", "grad_hidden", "grad_weight", "grad_bias"), got, base, truth, torch.float32)
