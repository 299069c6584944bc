"""The parity helper can fail: for every dtype and several configs, the real implementation passes
the three-way rule while a zeroed, a halved, or a partly wrong gradient (or loss) is rejected.

Issue 9: with the old absolute tolerance (``2·|base - truth| + 1e-2`` in bf16) an all-zero gradient
passed for several bf16 configs and a halved one for most configs, because the gradients of a mean
loss are far smaller than 1e-2; the tolerance now scales with ``max|truth|``.
"""

from __future__ import annotations

import pytest
import torch

from vcrd import VCRDConfig

from ..helpers import LOGITS_CONFIGS as CONFIGS
from ..helpers import assert_parity, batch, fused_three_way, linear_heads, logits_three_way, parity_check

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
NAMES = ["kd", "vcrd", "rkl-expected", "jsd0.3-T2-ce"]
N_ROWS = 150  # > two 64-row chunks of the default compiled path


def _wrong_past_first_chunk(t: torch.Tensor, factor: float) -> torch.Tensor:
    """Rows past the first 64-row chunk scaled by ``factor`` (issue 9's compiled-path bug: 1e5–1e7×)."""
    t = t.clone()
    t[64:] *= factor
    return t


GRAD_MUTATIONS = {
    "zeroed": lambda impl, truth: torch.zeros_like(impl),
    "halved-impl": lambda impl, truth: impl * 0.5,
    "halved-truth": lambda impl, truth: (truth * 0.5).to(impl.dtype),
    "doubled-impl": lambda impl, truth: impl * 2,
    "zeroed-past-first-chunk": lambda impl, truth: _wrong_past_first_chunk(impl, 0.0),
    "1e5x-past-first-chunk": lambda impl, truth: _wrong_past_first_chunk(impl, 1e5),
    "nan-in-one-row": lambda impl, truth: _one_nan(impl),
    "sign-flipped": lambda impl, truth: -impl,
}


def _one_nan(t: torch.Tensor) -> torch.Tensor:
    t = t.clone()
    t[N_ROWS // 2, 0] = float("nan")
    return t


@pytest.fixture(scope="module")
def cases():
    """The real (impl, base, truth) of every config and dtype, computed once (default settings)."""
    out = {}
    for dname, dtype in DTYPES.items():
        s, u, y, steps = batch(N=N_ROWS, V=1031, dtype=dtype, seed=5)
        for name in NAMES:
            out[name, dname] = logits_three_way(s, u, y, CONFIGS[name], step_ids=steps, check=False)
    return out


@pytest.mark.parametrize("dname", list(DTYPES))
@pytest.mark.parametrize("name", NAMES)
def test_real_implementation_passes(cases, name, dname):
    r = cases[name, dname]
    for i, what in enumerate(("loss", "grad")):
        assert_parity(what, r["impl"][i], r["base"][i], r["truth"][i], DTYPES[dname])


@pytest.mark.parametrize("mutation", list(GRAD_MUTATIONS))
@pytest.mark.parametrize("dname", list(DTYPES))
@pytest.mark.parametrize("name", NAMES)
def test_wrong_gradient_is_rejected(cases, name, dname, mutation):
    r = cases[name, dname]
    impl, base, truth = r["impl"][1], r["base"][1], r["truth"][1]
    wrong = GRAD_MUTATIONS[mutation](impl, truth)
    ok, message = parity_check(wrong, base, truth, DTYPES[dname])
    assert not ok, f"a {mutation} gradient passed: {message}"
    with pytest.raises(AssertionError):
        assert_parity("grad", wrong, base, truth, DTYPES[dname])


@pytest.mark.parametrize("factor", [0.0, 0.5, 0.9, 1.1], ids=["zeroed", "halved", "0.9x", "1.1x"])
@pytest.mark.parametrize("dname", list(DTYPES))
def test_wrong_loss_is_rejected(cases, dname, factor):
    for name in NAMES:
        r = cases[name, dname]
        ok, message = parity_check(r["impl"][0] * factor, r["base"][0], r["truth"][0], DTYPES[dname])
        assert not ok, f"{name}: a loss times {factor} passed: {message}"


def test_shape_and_missing_gradients_are_rejected(cases):
    r = cases["vcrd", "fp32"]
    impl, base, truth = r["impl"][1], r["base"][1], r["truth"][1]
    assert not parity_check(impl[:-1], base, truth, torch.float32)[0]
    assert not parity_check(impl.flatten(), base, truth, torch.float32)[0]
    from ..helpers import assert_parities

    with pytest.raises(AssertionError, match="missing"):
        assert_parities(("loss", "grad"), r["impl"][:1], r["base"], r["truth"], torch.float32)


def test_the_bound_scales_with_the_values():
    """The same relative error passes or fails whatever the magnitude of the gradient (an absolute
    tolerance would accept anything below 1e-2 in bf16)."""
    truth = torch.randn(200, 300, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    for scale in (1e-6, 1e-3, 1.0, 1e3):
        t = truth * scale
        assert parity_check((t * (1 + 1e-3)).to(torch.bfloat16), t.float(), t, torch.bfloat16)[0]
        assert not parity_check((t * 0.95).to(torch.bfloat16), t.float(), t, torch.bfloat16)[0]
        assert not parity_check(torch.zeros_like(t), t.float(), t, torch.bfloat16)[0]


def test_fused_linear_wrong_gradients_are_rejected():
    """The fused-linear three-way rule (hidden, weight, bias) rejects a zeroed or halved gradient of
    each, while the real one passes."""
    r = fused_three_way(linear_heads(N=40, V=301), VCRDConfig(), chunk_size=13)
    for i in (1, 2, 3):
        impl, base, truth = r["impl"][i], r["base"][i], r["truth"][i]
        for wrong in (torch.zeros_like(impl), impl * 0.5):
            assert not parity_check(wrong, base, truth, torch.float32)[0]
