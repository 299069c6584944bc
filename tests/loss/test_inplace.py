"""``inplace_grad=True``: the student-logit gradient written over the logits (Liger's cross-entropy
convention), on strided ``logits[:, :-1]`` inputs: three-way parity on the CPU path and the Triton
kernels (interpreter), clear refusals, and allocations counted by torch's profiler."""

from __future__ import annotations

import os

import pytest
import torch

from benches.memory import allocations
from vcrd import VCRDConfig, VCRDLoss, vcrd_loss

from ..helpers import assert_parities, base_dtype, ignore_some, realistic_logits, run_with_grads, upstream_gradient

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
TRITON = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
                            reason="needs TRITON_INTERPRET=1 (set before Python starts) or a CUDA device")


def shifted_batch(B=3, T=22, V=301, dtype=torch.float32, seed=0):
    """``full [B, T, V]`` logits whose ``[:, :-1]`` rows are the student's (a strided view), the
    teacher's ``[B, T-1, V]``, labels with ignored rows."""
    s, u, y = realistic_logits(B * T, V, seed=seed)
    full = s.reshape(B, T, V).to(dtype)
    u = u.reshape(B, T, V)[:, 1:].contiguous().to(dtype)
    y = ignore_some(y.reshape(B, T)[:, 1:].contiguous(), seed=seed)
    return full, u, y


def inplace_run(full, u, y, cfg, impl, reduction, module=False):
    """``[loss, grad]`` with ``inplace_grad=True`` on ``full[:, :-1]``; checks that the logits now hold
    exactly the gradient and that the last time step (not an input) is untouched."""
    leaf = full.clone().requires_grad_()
    xs = leaf[:, :-1]
    assert not xs.is_contiguous()
    if module:
        loss = VCRDLoss(cfg, reduction=reduction, impl=impl, inplace_grad=True)(xs, u, y)
    else:
        loss = vcrd_loss(xs, u, y, config=cfg, reduction=reduction, impl=impl, inplace_grad=True)
    (grad,) = torch.autograd.grad(loss, xs, upstream_gradient(loss.shape).to(loss.dtype))
    assert torch.equal(leaf.detach()[:, :-1], grad), "the gradient is not the logits' memory"
    assert torch.equal(leaf.detach()[:, -1], full[:, -1])
    return [loss.detach(), grad]


def three_way_inplace(dtype, impl, cfg, reduction="mean", module=False):
    full, u, y = shifted_batch(dtype=dtype)
    got = inplace_run(full, u, y, cfg, impl, reduction, module)
    ref = {}
    for name, run_dtype in (("base", base_dtype(dtype)), ("truth", torch.float64)):
        fn = lambda x, d=run_dtype: vcrd_loss(x, u.to(d), y, config=cfg, reduction=reduction,  # noqa: E731
                                              impl="reference")
        ref[name] = run_with_grads(fn, [full[:, :-1].to(run_dtype)], "random")
    assert_parities(("loss", "grad"), got, ref["base"], ref["truth"], dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16", "fp16"])
def test_cpu_path(dtype):
    three_way_inplace(dtype, "torch", VCRDConfig(ce_weight=0.2, temperature=2.0))


@pytest.mark.parametrize("div", ["rkl", "jsd"])
def test_cpu_path_divergences_module_and_per_row(div):
    three_way_inplace(torch.float32, "torch", VCRDConfig(divergence=div), reduction="none", module=True)


@pytest.mark.triton
@TRITON
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("div", ["fkl", "jsd"])
def test_triton(dtype, div):
    three_way_inplace(dtype, "triton", VCRDConfig(divergence=div, ce_weight=0.2, temperature=2.0))


def test_refusals():
    full, u, y = shifted_batch()
    leaf = full.clone().requires_grad_()
    cases = [
        (leaf[:1, :-1].expand(3, -1, -1), u, {}, "expanded view"),
        (leaf.transpose(1, 2).contiguous().transpose(1, 2)[:, :-1], u, {}, "unit stride"),
        (leaf[:, :-1], u, {"impl": "reference"}, "impl='reference'"),
        (leaf[:, 1:], leaf.detach()[:, 1:], {}, "share memory"),
    ]
    for s, t, kw, message in cases:
        with pytest.raises(ValueError, match=message):
            vcrd_loss(s, t, y, inplace_grad=True, **kw)
    xs = leaf[:, :-1]
    with pytest.raises(TypeError, match="inplace_grad"):
        vcrd_loss(xs, u, y, inplace_grad=1)
    # logits an earlier operation saved for its backward: autograd refuses instead of a wrong gradient
    z = (xs / 10).requires_grad_()
    logits = torch.exp(z)  # exp saves its output
    loss = vcrd_loss(logits, u, y, inplace_grad=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_no_vocab_sized_buffer_but_the_gradient(dtype):
    """Counted by torch's profiler on the compiled CPU path, strided ``logits[:, :-1]`` input
    (4 × 128 rows, 8 chunks of 64): without ``inplace_grad`` the one allocation of at least half the
    gradient's size is the gradient; with it there is none (a chunk's fp32 buffers, 64·V·4 bytes, stay
    below that for every dtype). The control (a copy of the input) shows the count sees one."""
    B, T, V = 4, 129, 1000
    full, u, y = shifted_batch(B, T, V, dtype)
    nv_bytes = B * (T - 1) * V * full.element_size()

    def large_allocations(inplace, copy=False):
        xs = full.clone().requires_grad_()[:, :-1]

        def call():
            x = xs.reshape(-1, V) if copy else xs
            loss = vcrd_loss(x, u.reshape(x.shape), y.reshape(x.shape[:-1]), inplace_grad=inplace)
            torch.autograd.grad(loss, x)

        call()  # warm up (compilation)
        xs = full.clone().requires_grad_()[:, :-1]
        return [n for n in allocations(call) if n >= nv_bytes // 2]

    assert large_allocations(False) == [nv_bytes]
    assert large_allocations(True) == []
    assert large_allocations(True, copy=True) == [nv_bytes]  # the control: a copy is seen
