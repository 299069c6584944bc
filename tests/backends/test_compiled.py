"""The CPU fast path's two modes, named explicitly: ``torch.compile`` of the per-chunk math (the
default, which the rest of the suite runs too) and the eager fallback (``VCRD_COMPILE=0``), each
against the reference, and against each other, past several chunks."""

from __future__ import annotations

import os

import pytest
import torch

from vcrd import VCRDConfig, vcrd_loss
from vcrd.core import settings

from ..helpers import batch, fused_three_way, linear_heads, three_way

MODES = {"compiled": "1", "eager": "0"}
CFGS = [VCRDConfig(), VCRDConfig(divergence="jsd", beta=0.3, temperature=2.0, ce_weight=0.5)]


def test_suite_runs_the_default_settings():
    """Nothing in the suite's setup may switch the default path off (issue 9: a conftest that set
    VCRD_COMPILE=0 hid a broken compiled path)."""
    assert settings.compile_enabled() and settings.chunk_rows() == 64


@pytest.mark.parametrize("cfg", CFGS, ids=["vcrd", "jsd-T2-ce"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("mode", list(MODES))
def test_matches_reference(mode, cfg, dtype, monkeypatch):
    monkeypatch.setenv("VCRD_COMPILE", MODES[mode])
    monkeypatch.setenv("VCRD_CHUNK_ROWS", "16")
    three_way(*batch(dtype=dtype, V=1271), cfg)
    three_way(*batch(dtype=dtype, N=37, V=3001, seed=1), cfg)  # another shape: no stale specialisation


def test_compiled_float64_matches_reference(monkeypatch):
    monkeypatch.setenv("VCRD_CHUNK_ROWS", "16")
    s, u, y, steps = batch(N=50, V=301)
    three_way(s.double(), u.double(), y, steps, VCRDConfig(ce_weight=0.3, temperature=1.5))


def test_compiled_equals_eager(monkeypatch):
    """The two modes compute the same thing: loss and gradient to fp32 rounding, past several 64-row
    chunks, with a random upstream gradient per row."""
    s, u, y, steps = batch(N=200, V=501, B=2)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(3))
    out = {}
    for mode, flag in MODES.items():
        monkeypatch.setenv("VCRD_COMPILE", flag)
        x = s.clone().requires_grad_()
        loss = vcrd_loss(x, u, y, step_ids=steps, reduction="none", impl="torch")
        loss.backward(g)
        out[mode] = loss.detach(), x.grad
    for a, b in zip(out["compiled"], out["eager"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6 * b.abs().max().item())


@pytest.mark.parametrize("chunk_rows", ["16", None], ids=["16-row-chunks", "default-64"])
def test_compiled_fused_linear_writes_gradient_over_the_logits(chunk_rows, monkeypatch):
    """Issue 9: the compiled gradient written over the fused-linear chunk's logits was 1e5–1e7× off
    past the first sub-chunk. 150-row fused chunks hold several sub-chunks of either size."""
    if chunk_rows:
        monkeypatch.setenv("VCRD_CHUNK_ROWS", chunk_rows)
    fused_three_way(linear_heads(N=230, V=1271), VCRDConfig(ce_weight=0.3, temperature=2.0), chunk_size=150)


SWEEP = r'''
import torch
from torch._dynamo.utils import counters
from vcrd import VCRDConfig, vcrd_loss
torch.manual_seed(0)
s, u = torch.randn(150, 301) * 5, torch.randn(150, 301) * 5
y = torch.randint(0, 301, (150,))
configs = ([VCRDConfig(temperature=t) for t in (0.5, 1.0, 1.7, 3.0)]
           + [VCRDConfig(divergence="jsd", beta=b, temperature=t) for b in (0.1, 0.3, 0.6, 0.9) for t in (1.0, 2.0)]
           + [VCRDConfig(divergence="rkl", temperature=t, ce_weight=c) for t in (1.0, 1.5) for c in (0.0, 0.4)]
           + [VCRDConfig.preset(p) for p in ("kd", "discord", "vcrd")])
for cfg in configs:
    x = s.clone().requires_grad_()
    vcrd_loss(x, u, y, config=cfg, impl="torch").backward()
    r = s.double().requires_grad_()
    vcrd_loss(r, u.double(), y, config=cfg, impl="reference").backward()
    err = float((x.grad.double() - r.grad).abs().max() / r.grad.abs().max())
    assert err < 1e-4, (cfg, err)
print("CONFIGS", len(configs), "GRAPHS", counters["stats"]["unique_graphs"])
'''


def test_a_sweep_of_options_stays_compiled_in_one_process():
    """issue 9's recompile cliff: 19 configurations (temperatures, betas, divergences, CE, presets) in
    one fresh process compile a bounded number of graphs, never hit dynamo's recompile limit (which
    would silently fall back to eager), print no warning, and each result matches the reference."""
    import subprocess
    import sys

    env = {**os.environ, "VCRD_COMPILE": "1"}
    done = subprocess.run([sys.executable, "-c", SWEEP], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    n_configs, n_graphs = (int(w) for w in done.stdout.split()[1::2])
    assert n_configs == 19 and 0 < n_graphs <= 12, done.stdout
    assert "recompile" not in done.stderr.lower() and "cache_size_limit" not in done.stderr, done.stderr[-3000:]
    assert "warn" not in done.stderr.lower(), done.stderr[-3000:]
