"""The CPU fast path under torch.compile (the default outside the test suite) against the reference."""

from __future__ import annotations

import pytest
import torch

from vcrd import VCRDConfig

from .test_torch_path import batch, three_way


@pytest.mark.parametrize("cfg", [VCRDConfig(), VCRDConfig(divergence="jsd", beta=0.3, temperature=2.0, ce_weight=0.5)],
                         ids=["vcrd", "jsd-T2-ce"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_compiled_matches_reference(cfg, dtype, monkeypatch):
    monkeypatch.setenv("VCRD_COMPILE", "1")
    monkeypatch.setenv("VCRD_CHUNK_ROWS", "16")
    three_way(*batch(dtype=dtype, V=1271), cfg)
    three_way(*batch(dtype=dtype, N=37, V=3001, seed=1), cfg)  # another shape: no stale specialisation


def test_compiled_fused_linear_writes_gradient_over_the_logits(monkeypatch):
    from . import test_fused_linear as fl

    monkeypatch.setenv("VCRD_COMPILE", "1")
    fl.three_way(fl.heads(N=40, V=1271), VCRDConfig(ce_weight=0.3, temperature=2.0), chunk_size=17)
