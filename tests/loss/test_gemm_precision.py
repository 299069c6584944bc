"""The fused-linear loss with its LM-head GEMMs in bf16 (``gemm_precision="head"``, the default for bf16
heads): no worse than PyTorch itself in bf16 against float64.

Three results on the same bf16-rounded inputs, each held to the float64 truth:

- truth: both logits from float64 GEMMs, then :func:`vcrd.core.reference.vcrd_loss` in float64;
- PyTorch in bf16: ``F.linear`` in bf16 (bf16 logits, and bf16 backward GEMMs on the bf16 logit
  gradient, as a bf16 model computes its LM head), then the same reference formulas in fp32 autograd;
- vcrd: :func:`vcrd.fused_linear_vcrd_loss` on the bf16 inputs (its defaults: head-dtype GEMMs).

vcrd's error on the loss and on every gradient (student hidden states, head weight, head bias) must be
at most ``1.5 × PyTorch-bf16's error + 2^-8·max|truth|`` (one bf16 rounding of the largest entry:
both return bf16 gradients). The same bound is shown to reject a zeroed and a halved gradient.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vcrd import VCRDConfig, fused_linear_vcrd_loss, vcrd_loss

from ..helpers import linear_heads, max_err, run_with_grads

NAMES = ("loss", "grad_hidden", "grad_weight", "grad_bias")
SLACK = 1.5
BF16_ROUNDING = 2.0 ** -8  # one rounding to bf16 (8-bit significand): at most half an ulp, <= 2^-8 relative


def rounded_heads(N: int, V: int) -> dict:
    """Realistic heads (std ~10 correlated logits, 20 % ignored rows) rounded to bf16, stored in float64."""
    d = linear_heads(N=N, Hs=61, Ht=75, V=V)
    return {k: v.to(torch.bfloat16).double() if k in ("hs", "Ws", "bs", "ht", "Wt") else v for k, v in d.items()}


def truth(d: dict, cfg: VCRDConfig):
    """Loss and gradients from float64 GEMMs and the float64 reference."""
    def fn(hs, Ws, bs):
        s, u = F.linear(hs, Ws, bs), F.linear(d["ht"], d["Wt"])
        return vcrd_loss(s, u, d["y"], step_ids=d["steps"], config=cfg, impl="reference")

    return run_with_grads(fn, [d["hs"], d["Ws"], d["bs"]], "random")


def pytorch_bf16(d: dict, cfg: VCRDConfig):
    """What plain PyTorch computes in bf16: bf16 ``F.linear`` logits, the reference formulas in fp32 autograd."""
    def fn(hs, Ws, bs):
        s = F.linear(hs, Ws, bs).float()
        u = F.linear(d["ht"].bfloat16(), d["Wt"].bfloat16()).float()
        return vcrd_loss(s, u, d["y"], step_ids=d["steps"], config=cfg, impl="reference")

    return run_with_grads(fn, [d[k].bfloat16() for k in ("hs", "Ws", "bs")], "random")


def vcrd_bf16(d: dict, cfg: VCRDConfig):
    def fn(hs, Ws, bs):
        return fused_linear_vcrd_loss(hs, Ws, d["ht"].bfloat16(), d["Wt"].bfloat16(), d["y"], student_bias=bs,
                                      step_ids=d["steps"], config=cfg, impl="torch")

    return run_with_grads(fn, [d[k].bfloat16() for k in ("hs", "Ws", "bs")], "random")


def within(got: torch.Tensor, pytorch: torch.Tensor, want: torch.Tensor) -> tuple:
    """``(ok, message)``: ``max|got - want| <= 1.5·max|pytorch - want| + 2^-8·max|want|``."""
    e_got, e_torch = max_err(got, want), max_err(pytorch, want)
    bound = SLACK * e_torch + BF16_ROUNDING * want.abs().max().item()
    return e_got <= bound, f"vcrd {e_got:.3e}, PyTorch bf16 {e_torch:.3e}, bound {bound:.3e}"


@pytest.mark.parametrize("preset", ["vcrd", "kd"])
def test_bf16_gemms_no_worse_than_pytorch_bf16(preset):
    cfg = VCRDConfig.preset(preset)
    assert cfg.gemm_precision == "auto"  # the default picks bf16 GEMMs for bf16 heads
    d = rounded_heads(N=1031, V=2053)
    want, torch_bf16, got = truth(d, cfg), pytorch_bf16(d, cfg), vcrd_bf16(d, cfg)
    assert len(got) == len(want) == 4 and got[1].dtype == torch.bfloat16
    for name, a, b, c in zip(NAMES, got, torch_bf16, want):
        ok, message = within(a, b, c)
        assert ok, f"{preset} {name}: {message}"
    for name, a, b, c in zip(NAMES[1:], got[1:], torch_bf16[1:], want[1:]):  # the bound has teeth
        assert not within(a * 0.5, b, c)[0], f"{preset} {name}: a halved gradient passed"
        assert not within(torch.zeros_like(a), b, c)[0], f"{preset} {name}: a zeroed gradient passed"


def test_head_gemms_differ_from_exact_and_exact_is_fp32():
    """``"head"`` really runs bf16 GEMMs (its logits differ from the exact mode's), and ``"exact"`` on the
    same bf16 inputs matches the fp32 reference on the fp32 upcast inputs to fp32 rounding."""
    d = rounded_heads(N=67, V=509)
    runs = {p: vcrd_bf16(d, VCRDConfig(gemm_precision=p)) for p in ("auto", "head", "exact")}
    for a, b in zip(runs["auto"], runs["head"]):
        assert torch.equal(a, b)
    assert max_err(runs["head"][0], runs["exact"][0]) > 0
    want = truth(d, VCRDConfig())
    assert max_err(runs["exact"][0], want[0]) <= 1e-5 * want[0].abs().item()
    assert max_err(runs["exact"][2].float(), want[2]) <= BF16_ROUNDING * want[2].abs().max().item()


def test_bad_gemm_precision():
    with pytest.raises(ValueError, match="gemm_precision.*'auto', 'exact', 'head'.*'fp8'"):
        VCRDConfig(gemm_precision="fp8")
