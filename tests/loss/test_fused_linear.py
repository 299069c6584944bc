"""The fused-linear loss (hidden states + LM heads in) against the reference on materialised logits."""

from __future__ import annotations

import pytest
import torch

from vcrd import FusedLinearVCRDLoss, VCRDConfig, fused_linear_vcrd_loss, vcrd_loss

from ..helpers import (
    FUSED_CONFIGS,
    TOL,
    fused_three_way,
    linear_heads,
    run_fused_linear,
    step_ids_for,
)


@pytest.mark.parametrize("name", list(FUSED_CONFIGS))
@pytest.mark.parametrize("chunk", [7, "auto"])
def test_matches_reference_fp32(name, chunk):
    fused_three_way(linear_heads(), FUSED_CONFIGS[name], chunk_size=chunk)


def test_matches_reference_float64():
    d = linear_heads(N=29, V=301)
    got = run_fused_linear(d, VCRDConfig(ce_weight=0.2), torch.float64, "torch", chunk_size=5)
    want = run_fused_linear(d, VCRDConfig(ce_weight=0.2), torch.float64, "reference")
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_bf16_heads_and_hidden_exact_gemms():
    """``gemm_precision="exact"``: bf16 heads run fp32 GEMMs, held to the fp32 reference (the bf16 GEMMs of
    the default: tests/loss/test_gemm_precision.py)."""
    d = linear_heads(N=40, V=777)
    fused_three_way({k: (v.to(torch.bfloat16).to(torch.float64) if k in ("hs", "Ws", "bs", "ht", "Wt") and v is not None
                         else v) for k, v in d.items()}, FUSED_CONFIGS["vcrd"].replace(gemm_precision="exact"),
                    dtype=torch.bfloat16, chunk_size=9)


def test_batched_input_vocab_mismatch_and_no_bias():
    d = linear_heads(N=48, V=500, Vt=512, bias=False)
    d["hs"], d["ht"], d["y"] = d["hs"].reshape(4, 12, -1), d["ht"].reshape(4, 12, -1), d["y"].reshape(4, 12)
    d["steps"] = torch.stack([step_ids_for(12, seed=b) for b in range(4)])
    fused_three_way(d, FUSED_CONFIGS["vcrd"], vocab_size=500, chunk_size=11)


def _two_micro_batches(d, cfg, n_items):
    """Σ of the losses of two micro-batches (one sequence each) with ``num_items_in_batch``, and the
    gradients of hidden and weight accumulated over them."""
    hs, Ws = d["hs"].clone().requires_grad_(), d["Ws"].clone().requires_grad_()
    total = 0.0
    for rows in (slice(0, 24), slice(24, 48)):
        loss = fused_linear_vcrd_loss(hs[rows], Ws, d["ht"][rows], d["Wt"], d["y"][rows], step_ids=d["steps"][rows],
                                      config=cfg, num_items_in_batch=n_items, impl="torch")
        loss.backward()
        total = total + loss.detach()
    return total, hs.grad, Ws.grad


def _sequences(N=48, V=300):
    d = linear_heads(N=N, V=V)
    d["steps"] = torch.cat([d["steps"][:24] - d["steps"][0], d["steps"][24:] - d["steps"][24]])
    return d


def test_gradient_accumulation_with_num_items_in_batch_tokens():
    """normalize="tokens": two micro-batches with the global token count sum to the full batch."""
    d, cfg = _sequences(), FUSED_CONFIGS["kd"]
    total, g_h, g_w = _two_micro_batches(d, cfg, int((d["y"] != -100).sum()))
    hs2, Ws2 = d["hs"].clone().requires_grad_(), d["Ws"].clone().requires_grad_()
    whole = fused_linear_vcrd_loss(hs2, Ws2, d["ht"], d["Wt"], d["y"], step_ids=d["steps"], config=cfg,
                                   cu_seqlens=torch.tensor([0, 24, 48]), impl="torch")
    whole.backward()
    torch.testing.assert_close(total, whole.detach(), rtol=1e-5, atol=0)
    torch.testing.assert_close(g_h, hs2.grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(g_w, Ws2.grad, rtol=1e-5, atol=1e-7)


def test_gradient_accumulation_with_num_items_in_batch_weights():
    """normalize="weights" (the vcrd preset) with ``num_items_in_batch = M``: each micro-batch's
    weighted mean times its share of the tokens (SPEC §6), loss and gradients."""
    d, cfg = _sequences(), FUSED_CONFIGS["vcrd"]
    n_valid = int((d["y"] != -100).sum())
    total, g_h, g_w = _two_micro_batches(d, cfg, n_valid)
    want, want_h, want_w = 0.0, torch.zeros_like(g_h, dtype=torch.float64), 0.0
    for rows in (slice(0, 24), slice(24, 48)):
        hs, Ws = d["hs"][rows].double().requires_grad_(), d["Ws"].double().requires_grad_()
        share = int((d["y"][rows] != -100).sum()) / n_valid
        mean = share * fused_linear_vcrd_loss(hs, Ws, d["ht"][rows].double(), d["Wt"].double(), d["y"][rows],
                                              step_ids=d["steps"][rows], config=cfg, impl="reference")
        mean.backward()
        want, want_w = want + mean.detach(), want_w + Ws.grad
        want_h[rows] = hs.grad
    torch.testing.assert_close(total.double(), want, rtol=1e-5, atol=0)
    for got, ref in ((g_h, want_h), (g_w, want_w)):
        torch.testing.assert_close(got.double(), ref, rtol=1e-4, atol=1e-5 * ref.abs().max().item())


def test_stats_and_module():
    d = linear_heads(N=30, V=211)
    loss, stats = FusedLinearVCRDLoss("vcrd", chunk_size=4, impl="torch")(
        d["hs"], d["Ws"], d["ht"], d["Wt"], d["y"], student_bias=d["bs"], step_ids=d["steps"], return_stats=True)
    s = d["hs"].double() @ d["Ws"].double().T + d["bs"].double()
    u = d["ht"].double() @ d["Wt"].double().T

    want, ws = vcrd_loss(s, u, d["y"], step_ids=d["steps"], impl="reference", return_stats=True)
    torch.testing.assert_close(loss.double(), want, rtol=1e-5, atol=TOL[torch.float32])
    for name in ("D", "w_val", "w_dc", "n", "lp_s", "lp_u"):
        torch.testing.assert_close(getattr(stats, name).double(), getattr(ws, name), rtol=1e-4, atol=1e-4)
    assert torch.equal(stats.valid, ws.valid)


def test_frozen_head_gets_no_gradient_and_hidden_still_does():
    d = linear_heads(N=20, V=100)
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
    d = make(linear_heads(N=12, V=50))
    with pytest.raises(error, match=name):
        fused_linear_vcrd_loss(d["hs"], d["Ws"], d["ht"], d["Wt"], d["y"], student_bias=d["bs"], impl="torch", **kw)


def test_gemm_plan():
    """Which GEMMs the fused-linear loss runs (``gemm_precision``): in the head's dtype for bf16 heads (and fp16
    heads on CUDA) by default or when asked (``"head"``): on CUDA mixed GEMMs (fp32 output) with chunks sized for
    the device, on CPU bf16/fp16 GEMMs with output in that dtype; otherwise (``"exact"``, fp32/fp64 heads, fp16
    heads on CPU by default) exact GEMMs from heads converted once per call. Only the plan is tested here: the
    CUDA branch needs a GPU."""
    from vcrd.core import settings
    from vcrd.loss.fused_linear import auto_chunk_size, gemm_plan, plan_for

    cpu_budget = 256 * 2**20
    cases = {("auto", torch.bfloat16): torch.bfloat16, ("auto", torch.float16): torch.float32,
             ("auto", torch.float32): torch.float32, ("head", torch.float16): torch.float16,
             ("head", torch.float32): torch.float32, ("exact", torch.bfloat16): torch.float32}
    for (precision, dtype), operand in cases.items():
        plan = gemm_plan("cpu", dtype, cpu_budget, precision=precision)
        assert not plan.mixed and plan.operand_dtype == operand and plan.budget_bytes == cpu_budget
        assert plan.logits_dtype == operand
        assert auto_chunk_size(16384, 151936, plan.budget_bytes, plan.min_rows, plan.max_rows) == 256
        # half-size logits: twice the rows in the same budget (441 rows, then 38 equal chunks)
        assert auto_chunk_size(16384, 151936, plan.budget_bytes, plan.min_rows, plan.max_rows, 4) == 432
    assert gemm_plan("cpu", torch.float64, cpu_budget).operand_dtype == torch.float64
    for dtype in (torch.bfloat16, torch.float16):
        plan = gemm_plan("cuda", dtype, cpu_budget, device_memory_bytes=80 * 2**30)
        assert plan.mixed and plan.operand_dtype == dtype and plan.budget_bytes == 5 * 2**30
        assert plan.logits_dtype == torch.float32
        assert auto_chunk_size(16384, 151936, plan.budget_bytes, plan.min_rows, plan.max_rows) == 4096
        assert auto_chunk_size(300, 151936, plan.budget_bytes, plan.min_rows, plan.max_rows) == 300
        assert gemm_plan("cuda", dtype, cpu_budget, 80 * 2**30, "exact").operand_dtype == torch.float32
    assert not gemm_plan("cuda", torch.float32, cpu_budget, 80 * 2**30).mixed  # fp32 heads: fp32 GEMMs
    head = torch.zeros(7, 3, dtype=torch.bfloat16)
    assert plan_for(head) == gemm_plan("cpu", torch.bfloat16, settings.fused_budget_bytes())
