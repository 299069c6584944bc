"""benches/compare.py: the GEMM floor is the four GEMMs alone into buffers made once, in the input
dtype, on the kept rows; TRL's fused provider computes forward KL (checked against float64)."""

from __future__ import annotations

import pytest
import torch

from benches import gradcheck
from benches.compare import GemmFloor, make_inputs, provider_fn


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_floor_is_the_four_gemms_into_buffers_made_once(dtype):
    inputs = make_inputs(96, 32, 301, dtype=dtype)
    hs, ws, ht, wt, y, steps = inputs
    floor = GemmFloor(*inputs)
    floor()
    buffers = [floor.S, floor.U, floor.grad_h, floor.grad_w]
    pointers = [b.data_ptr() for b in buffers]
    floor()  # a second call writes the same buffers
    assert [b.data_ptr() for b in buffers] == pointers
    want_dtype = torch.bfloat16 if dtype == "bf16" else torch.float32
    assert all(b.dtype == want_dtype for b in buffers)  # bf16 GEMMs for bf16 inputs
    kept = y != -100
    h, w = hs.detach()[kept].double(), ws.detach().double()
    S = h @ w.T  # the float64 products of the same rounded inputs: an independent oracle
    tol = dict(rtol=2e-2, atol=2e-1) if dtype == "bf16" else dict(rtol=1e-4, atol=1e-3)
    assert floor.S.shape[0] == int(kept.sum()) < y.numel()
    torch.testing.assert_close(floor.S.double(), S, **tol)
    torch.testing.assert_close(floor.U.double(), ht[kept].double() @ wt.double().T, **tol)
    torch.testing.assert_close(floor.grad_h.double(), floor.S.double() @ w, **tol)
    torch.testing.assert_close(floor.grad_w.double(), floor.S.double().T @ h, **tol)
    assert hs.grad is None and ws.grad is None  # not a loss: no autograd


def test_trl_chunked_divergence_provider_is_forward_kl():
    """TRL 1.16's fused loss at beta=0 gives the float64 gradient of preset kd; a halved one fails."""
    pytest.importorskip("trl.trainer.distillation_trainer")
    inputs = make_inputs(64, 16, 257)
    hs, ws, ht, wt, y, steps = inputs
    provider_fn("trl-chunked-div", inputs)(*inputs)
    ref = gradcheck.fused_reference(hs, ws, ht, wt, y, steps, ["kd"])["kd"]
    assert gradcheck.check_fused(hs.grad, ws.grad, ref)["grad_check"] == "pass"
    assert gradcheck.check_fused(hs.grad * 0.5, ws.grad, ref)["grad_check"] == "FAIL"
    assert gradcheck.check_fused(hs.grad, ws.grad * 0, ref, tol=gradcheck.TOL_BY_DTYPE["bf16"])["grad_check"] == "FAIL"


def test_make_inputs_refuses_an_unknown_dtype():
    with pytest.raises(ValueError, match="dtype: expected one of"):
        make_inputs(8, 4, 16, dtype="fp16")


def test_bf16_base_is_pytorch_itself_in_bf16_and_the_three_way_rule_fails_wrong_gradients():
    """The three-way rule's base (``fused_reference(base=True)``) is what autograd gives through a bf16 model
    (logits GEMMs in bf16, the loss in fp32 on them); vcrd's bf16 mode passes the rule, halved/zeroed fail."""
    from vcrd import fused_linear_vcrd_loss
    from vcrd.core import reference

    hs, ws, ht, wt, y, steps = make_inputs(160, 24, 301, dtype="bf16")
    ref = gradcheck.fused_reference(hs, ws, ht, wt, y, steps, ["vcrd"])["vcrd"]
    base = gradcheck.fused_reference(hs, ws, ht, wt, y, steps, ["vcrd"], base=True)["vcrd"]
    # the oracle: plain autograd on bf16 leaves, one GEMM over every row
    h, w = hs.detach().clone().requires_grad_(), ws.detach().clone().requires_grad_()
    reference.vcrd_loss((h @ w.T).float(), (ht @ wt.T).float(), y, step_ids=steps, config="vcrd").backward()
    assert h.grad.dtype == torch.bfloat16
    torch.testing.assert_close(base["grad_h"], h.grad.double(), rtol=2e-2, atol=2e-2 * h.grad.abs().max().item())
    torch.testing.assert_close(base["grad_W"], w.grad.double(), rtol=2e-2, atol=2e-2 * w.grad.abs().max().item())
    assert gradcheck.rel_err(base["grad_h"], ref["grad_h"]) > 1e-3  # bf16 is visibly off the float64 truth
    fused_linear_vcrd_loss(hs, ws, ht, wt, y, step_ids=steps, config="vcrd", impl="torch").backward()
    tol = gradcheck.TOL_BY_DTYPE["bf16"]
    assert gradcheck.check_fused(hs.grad, ws.grad, ref, tol, base)["grad_check"] == "pass"
    assert gradcheck.check_fused(hs.grad * 0.5, ws.grad, ref, tol, base)["grad_check"] == "FAIL"
    assert gradcheck.check_fused(hs.grad, ws.grad * 0, ref, tol, base)["grad_check"] == "FAIL"
