"""Tier 2 for the Triton kernels: run under the interpreter on CPU (``TRITON_INTERPRET=1`` set before
Python starts; ``make test`` does a separate run with ``-m triton``) or on a CUDA device."""

from __future__ import annotations

import os

import pytest
import torch

from vcrd import VCRDConfig, vcrd_loss

from ..helpers import FUSED_CONFIGS, batch, fused_three_way, linear_heads, realistic_logits, three_way
from ..helpers import LOGITS_CONFIGS as CONFIGS

RUNNABLE = os.environ.get("TRITON_INTERPRET") == "1" or torch.cuda.is_available()
pytestmark = [
    pytest.mark.triton,
    pytest.mark.skipif(not RUNNABLE, reason="needs TRITON_INTERPRET=1 (set before Python starts) or a CUDA device"),
    pytest.mark.filterwarnings("ignore::RuntimeWarning"),  # numpy under the interpreter: where(-inf - -inf)
]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_matches_reference(name, dtype):
    three_way(*batch(N=31, V=1271, dtype=dtype), CONFIGS[name], impl="triton")


@pytest.mark.parametrize("name", ["vcrd", "rkl-expected", "jsd0.3-T2-ce"])
def test_vocab_spanning_several_blocks(name):
    three_way(*batch(N=9, V=9001, std=20.0), CONFIGS[name], impl="triton")


@pytest.mark.parametrize("std,agreement", [(30.0, 0.8), (10.0, 0.999)], ids=["std30", "near-equal"])
@pytest.mark.parametrize("div", ["fkl", "rkl", "jsd"])
def test_logit_scales(div, std, agreement):
    three_way(*batch(N=24, V=777, std=std, agreement=agreement), VCRDConfig(divergence=div, beta=0.4), impl="triton")


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("normalize", ["tokens", "weights"])
def test_reductions_and_normalisation(reduction, normalize):
    cfg = VCRDConfig(normalize=normalize, window_steps=1, ce_weight=0.2)
    three_way(*batch(N=24, V=301, B=2), cfg, reduction=reduction, upstream="random", impl="triton")


@pytest.mark.parametrize("window", [0, 1, 4, None])
def test_windows(window):
    three_way(*batch(N=40, V=211), VCRDConfig(window_steps=window), impl="triton")


def test_packed_rows_and_vocab_truncation():
    s, u, y, steps = batch(N=30, V=300)
    s = torch.cat([s, torch.randn(30, 7) * 40], 1)  # strided rows after truncation
    u = torch.cat([u, torch.randn(30, 11) * 40], 1)
    three_way(s, u, y, steps, CONFIGS["vcrd"], cu_seqlens=torch.tensor([0, 12, 30]), vocab_size=300, impl="triton")


def test_extreme_and_masked_logits():
    s, u, y, steps = batch(N=16, V=97)
    s[:, 90:] = float("-inf")
    u[:, 90:] = float("-inf")
    s[0, 3], u[1, 5], s[2, 7] = 1e4, -1e4, -1e4
    y = torch.where(y >= 90, 1, y)
    for div in ("fkl", "rkl", "jsd"):
        three_way(s, u, y, steps, VCRDConfig(divergence=div, validity="expected"), impl="triton")


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_all_ignored(reduction):
    s, u, y, steps = batch(N=8, V=50)
    x = s.clone().requires_grad_()
    loss = vcrd_loss(x, u, torch.full_like(y, -100), step_ids=steps, reduction=reduction, impl="triton")
    loss.sum().backward()
    assert torch.all(loss == 0) and torch.all(x.grad == 0)


def test_stats_match_torch_path():
    s, u, y, steps = batch(N=31, V=500)
    _, a = vcrd_loss(s, u, y, step_ids=steps, impl="triton", return_stats=True)
    _, b = vcrd_loss(s.double(), u.double(), y, step_ids=steps, impl="reference", return_stats=True)
    for name in ("D", "w_val", "w_dc", "g", "n", "lp_s", "lp_u"):
        torch.testing.assert_close(getattr(a, name).double(), getattr(b, name), rtol=1e-4, atol=1e-4)
    assert torch.equal(a.agree, b.agree)


def test_kernels_write_every_output_element():
    """Outputs poisoned with NaN beforehand: every element, ignored rows included, gets written."""
    from vcrd.kernels.grad import launch_grad
    from vcrd.kernels.stats import NUM_STATS, launch_stats

    s, u, y, _ = batch(N=12, V=700)
    labels = torch.where(y == -100, -1, y)
    for div in ("fkl", "rkl", "jsd"):
        stats = launch_stats(s, u, labels, 1.5, div, True, out=torch.full((12, NUM_STATS), float("nan")))
        grad = torch.full((12, 700), float("nan"))
        coef = torch.rand(12, 2)
        launch_grad(s, u, labels, stats, coef, grad, 1.5, div, 0.3, True)
        assert torch.isfinite(stats).all() and torch.isfinite(grad).all(), div
        assert torch.all(grad[labels < 0] == 0) and torch.all(stats[labels < 0] == 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_label_logprob_kernel(dtype):
    from vcrd.kernels.label_logprob import label_logprob

    s, _, y = realistic_logits(13, 5003, std=15.0)
    y[3] = -100
    s = s.to(dtype)
    lse, lp = label_logprob(s, torch.where(y < 0, -1, y), temperature=1.3)
    want = torch.log_softmax(s.double() / 1.3, -1)
    torch.testing.assert_close(lse.double(), torch.logsumexp(s.double() / 1.3, -1), rtol=0, atol=1e-4)
    keep = y >= 0
    torch.testing.assert_close(lp[keep].double(), want[keep].gather(1, y[keep, None]).squeeze(1), rtol=0, atol=1e-4)
    assert lp[3] == 0


@pytest.mark.parametrize("name", ["vcrd", "jsd-T2-ce-expected"])
def test_fused_linear_on_the_kernels(name):
    fused_three_way(linear_heads(N=30, V=600), FUSED_CONFIGS[name], impl="triton", chunk_size=7)


def _stats_float64(s, u, y, T):
    """Every column of STAT_NAMES but D, plus fkl/rkl D, in float64 (rows with y < 0 are not used)."""
    s, u = s.double(), u.double()
    lps, lpu = torch.log_softmax(s / T, -1), torch.log_softmax(u / T, -1)
    p, q = lps.exp(), lpu.exp()
    a_s, a_u, yy = s.argmax(-1), u.argmax(-1), y.clamp(min=0)[:, None]

    def pick(t, idx):
        return t.gather(1, idx.view(-1, 1)).squeeze(1)

    def xlogy(w, v):  # Σ w·v with 0·(±inf) = 0
        return torch.where(w > 0, w * v, torch.zeros_like(w)).sum(-1)

    return {"lse_s": torch.logsumexp(s / T, -1), "lse_u": torch.logsumexp(u / T, -1),
            "lp_s": pick(lps, yy), "lp_u": pick(lpu, yy), "lq_as": pick(lpu, a_s), "lq_au": pick(lpu, a_u),
            "H_u": -xlogy(q, lpu), "CE_su": -xlogy(p, lpu), "agree": (a_s == a_u).double(),
            "lse_untempered": torch.logsumexp(s, -1), "fkl": xlogy(q, lpu - lps), "rkl": xlogy(p, lps - lpu),
            "max_s": s.amax(-1), "max_u": u.amax(-1),
            "log_sum_s": torch.logsumexp((s - s.amax(-1, keepdim=True)) / T, -1),
            "log_sum_u": torch.logsumexp((u - u.amax(-1, keepdim=True)) / T, -1),
            "log_sum_untempered": torch.logsumexp(s - s.amax(-1, keepdim=True), -1)}


@pytest.mark.parametrize("div", ["fkl", "rkl", "jsd"])
def test_stats_columns_ties_masked_vocab_nan(div):
    """Each statistics column against float64 on V = 1300 (three 512-wide tiles): argmax ties across
    tiles and within one lane resolve to the lowest index, masked (-inf) vocabulary, an ignored row
    holding NaN gets zeros, a NaN in a valid row makes every column that reads that model NaN."""
    from vcrd.kernels.grad import launch_grad
    from vcrd.kernels.stats import NUM_STATS, STAT_NAMES, launch_stats

    N, V, T = 7, 1300, 1.7
    s, u, y = realistic_logits(N, V, std=12.0, seed=3)
    labels = y.clone()
    top_s, top_u = s[1].max() + 3, u[1].max() + 3
    s[1, [1200, 517, 5, 700]] = top_s  # lowest index 5; 517 shares its lane (512 + 5)
    u[1, [1029, 700, 1100]] = top_u  # lowest index 700; 1212 would share the lane of 700
    s[2, 1000:], u[2, 1000:] = float("-inf"), float("-inf")  # masked vocabulary, the whole last tile
    labels[2] = 10
    labels[3], s[3, 9], u[3, 11] = -1, float("nan"), float("nan")  # ignored: reads nothing
    s[4, 600] = float("nan")
    u[5, 1299] = float("nan")
    stats = launch_stats(s, u, labels, T, div, True, out=torch.full((N, NUM_STATS), float("nan")))
    if div == "jsd":
        launch_grad(s, u, labels, stats, torch.ones(N, 2), None, T, div, 0.4, False)
    col = {name: stats[:, i].double() for i, name in enumerate(STAT_NAMES)}
    want = _stats_float64(s, u, labels, T)
    if div == "jsd":
        want["D"], want["kl_pm"] = _jsd_float64(s, u, T, 0.4), _jsd_float64(s, u, T, 0.4, kl_pm=True)
    else:
        want["D"], want["kl_pm"] = want[div], torch.zeros(N, dtype=torch.float64)
    want["zf"] = want["qf"] = torch.zeros(N, dtype=torch.float64)  # a sparse teacher's columns
    finite = [0, 1, 2, 6]
    for name in STAT_NAMES:
        torch.testing.assert_close(col[name][finite], want[name][finite], rtol=1e-5, atol=1e-4, msg=name)
    assert col["agree"][1] == 0 and want["agree"][1] == 0
    assert torch.all(stats[3] == 0)
    reads_s = {"lse_s", "lp_s", "CE_su", "D", "lse_untempered", "log_sum_s", "log_sum_untempered"}
    reads_u = {"lse_u", "lp_u", "lq_as", "lq_au", "H_u", "CE_su", "D", "log_sum_u"}
    for row, nan_cols in ((4, reads_s), (5, reads_u)):
        for name in STAT_NAMES:
            if name in nan_cols:
                assert torch.isnan(col[name][row]), (row, name)


def _jsd_float64(s, u, T, beta, kl_pm=False):
    """JSD's D, or (``kl_pm``) its ``KL(p‖m)``, in float64."""
    lps, lpu = torch.log_softmax(s.double() / T, -1), torch.log_softmax(u.double() / T, -1)
    p, q = lps.exp(), lpu.exp()
    lm = torch.log(beta * q + (1 - beta) * p)
    kl = lambda w, lw: torch.where(w > 0, w * (lw - lm), torch.zeros_like(w)).sum(-1)  # noqa: E731
    return kl(p, lps) if kl_pm else beta * kl(q, lpu) + (1 - beta) * kl(p, lps)


@pytest.mark.parametrize("div", ["fkl", "rkl", "jsd"])
def test_nan_in_a_valid_row_matches_reference(div):
    """SPEC §6 NaN policy on the kernels: the same rows get NaN gradients as on the CPU path, and
    ignored rows (8 holds a NaN) keep zero gradients. (The float64 reference is not compared
    here: it gives NaN gradients to ignored rows inside a NaN window.)"""
    s, u, y, steps = batch(N=12, V=700)
    y[2] = 3
    s[2, 600] = float("nan")
    y[8], u[8, 5] = -100, float("nan")  # ignored row: never matters
    cfg = VCRDConfig(divergence=div, normalize="tokens", window_steps=1)
    nan_rows = {}
    for impl in ("triton", "torch"):
        x = s.clone().requires_grad_()
        loss = vcrd_loss(x, u, y, step_ids=steps, config=cfg, impl=impl)
        loss.backward()
        assert torch.isnan(loss), impl
        nan_rows[impl] = torch.isnan(x.grad).any(1)
        assert torch.all(x.grad[y == -100] == 0), impl
    assert torch.equal(nan_rows["triton"], nan_rows["torch"]), nan_rows
    assert nan_rows["triton"][2]


def test_kernels_at_realistic_size():
    """N >= 1024 rows in 4 sequences with step ids, V over several tiles, 20 % ignored rows, the default
    launch settings: the vcrd preset through vcrd_loss, three-way against the reference (~30 s here)."""
    three_way(*batch(N=1040, V=1031, B=4), CONFIGS["vcrd"], impl="triton")
