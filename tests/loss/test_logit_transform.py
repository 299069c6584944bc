"""Per-model logit post-processing (SPEC §1): ``student_logit_scale``, ``teacher_logit_scale``,
``student_softcap``, ``teacher_softcap``.

The oracle is written here, not taken from vcrd: both logits are processed by hand in float64
(``c·tanh(a·z/c)``, ``a·z`` without a cap), then :func:`vcrd.core.reference.vcrd_loss` runs with its
default options on the processed logits; the gradient to the raw student logits (or to the student's
hidden states and head) comes from autograd through the hand-written transform. Every fast path —
``impl="torch"`` (fresh gradient buffer and ``inplace_grad``), the fused-linear loss, the sparse teacher
(student side), the vocab-parallel loss, and the Triton kernels under the interpreter — must match it
at N >= 1024 with an odd vocabulary, ignored rows and step ids, for logits large enough that a
soft-cap of 30 bends them.
"""

from __future__ import annotations

import math
from typing import Optional

import pytest
import torch

from vcrd import (
    SparseTeacher,
    VCRDConfig,
    fused_linear_sparse_vcrd_loss,
    fused_linear_vcrd_loss,
    sparse_vcrd_loss,
    vcrd_loss,
)
from vcrd.core import reference
from vcrd.distributed.vocab_parallel import vocab_parallel_vcrd_loss

N, V, H, K = 1024, 1031, 32, 24
TOL = 2e-5  # fp32 fast paths against the float64 oracle, relative to the largest true value

# Gemma-2 (soft-cap 30), Cohere-like (0.0625), Granite-like (1 / logits_scaling=8), and mixtures
CASES = {
    "softcap30": dict(student_softcap=30.0, teacher_softcap=30.0),
    "cohere": dict(student_logit_scale=0.0625, teacher_logit_scale=0.0625),
    "granite_student_gemma_teacher": dict(student_logit_scale=0.125, teacher_softcap=30.0),
    "scale_and_cap": dict(student_logit_scale=2.0, student_softcap=30.0, teacher_logit_scale=0.5),
}
STUDENT_CASES = {  # a sparse teacher is stored after its own transform: only the student's options apply
    "softcap30": dict(student_softcap=30.0),
    "granite": dict(student_logit_scale=0.125),
    "scale_and_cap": dict(student_logit_scale=2.0, student_softcap=30.0),
}


def process(z: torch.Tensor, scale: float = 1.0, cap: Optional[float] = None) -> torch.Tensor:
    """The hand-written transform of the oracle (float64 in, float64 out)."""
    z = scale * z
    return z if cap is None else cap * torch.tanh(z / cap)


def student_side(z, opts):
    return process(z, opts.get("student_logit_scale", 1.0), opts.get("student_softcap"))


def teacher_side(z, opts):
    return process(z, opts.get("teacher_logit_scale", 1.0), opts.get("teacher_softcap"))


def data(seed: int = 0, std: float = 20.0):
    """Realistic logits (``randn·std``, correlated models), 15% ignored rows, step ids."""
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(N, V, generator=g, dtype=torch.float64) * std
    s = 0.8 * u + 0.6 * torch.randn(N, V, generator=g, dtype=torch.float64) * std
    y = torch.where(torch.rand(N, generator=g) < 0.5, u.argmax(-1), torch.randint(0, V, (N,), generator=g))
    y[torch.rand(N, generator=g) < 0.15] = -100
    steps = torch.cumsum((torch.rand(N, generator=g) < 0.2).long(), 0)
    return g, s, u, y, steps


def close(got: torch.Tensor, want: torch.Tensor, tol: float = TOL) -> bool:
    scale = max(float(want.abs().max()), 1e-30)
    return float((got.double() - want).abs().max()) <= tol * scale


def assert_matches(name: str, got_loss, want_loss, got_grads, want_grads, tol: float = TOL) -> None:
    """Loss and gradients within ``tol·max|truth|``; the check is shown to be sharp: a zeroed and a halved
    gradient (what a missing or wrong chain rule gives) fail it."""
    assert close(got_loss.detach().reshape(1), want_loss.detach().reshape(1), tol), \
        f"{name}: loss {got_loss.item()} != {want_loss.item()}"
    for got, want in zip(got_grads, want_grads):
        assert float(want.abs().max()) > 0
        assert not close(torch.zeros_like(want), want, tol) and not close(0.5 * want, want, tol)
        assert close(got, want, tol), f"{name}: gradient off by {float((got.double() - want).abs().max())} " \
                                      f"(max |truth| {float(want.abs().max())})"


def oracle(s, u, y, steps, preset, opts):
    s64 = s.clone().requires_grad_()
    loss = reference.vcrd_loss(student_side(s64, opts), teacher_side(u, opts), y, step_ids=steps, config=preset)
    loss.backward()
    return loss, s64.grad


def test_the_transform_bends_these_logits():
    """The cases test something: the processed loss differs from the raw one, and the cap changes the logits."""
    _, s, u, y, steps = data()
    assert float((s.abs() > 30).float().mean()) > 0.1
    raw = reference.vcrd_loss(s, u, y, step_ids=steps, config="vcrd")
    for opts in CASES.values():
        want, _ = oracle(s, u, y, steps, "vcrd", opts)
        assert abs(want.item() - raw.item()) > 1e-2 * abs(raw.item())


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("preset", ["kd", "vcrd"])
def test_torch_path(preset, case):
    _, s, u, y, steps = data()
    opts = CASES[case]
    want, want_grad = oracle(s, u, y, steps, preset, opts)
    cfg = VCRDConfig.preset(preset, **opts)
    x = s.float().requires_grad_()
    got = vcrd_loss(x, u.float(), y, step_ids=steps, config=cfg, impl="torch")
    got.backward()
    assert_matches(f"{preset}/{case}", got, want, [x.grad], [want_grad])
    # the gradient written over the logits (the raw rows are read before they are overwritten)
    x = s.float().requires_grad_()
    got = vcrd_loss(x * 1, u.float(), y, step_ids=steps, config=cfg, impl="torch", inplace_grad=True)
    got.backward()
    assert_matches(f"{preset}/{case}/inplace", got, want, [x.grad], [want_grad])
    # the module reference path applies the same options
    ref = vcrd_loss(s, u, y, step_ids=steps, config=cfg, impl="reference")
    assert_matches(f"{preset}/{case}/reference", ref, want, [], [])


@pytest.mark.parametrize("case", ["softcap30", "scale_and_cap"])
def test_ce_term_and_temperature_see_the_processed_logits(case):
    _, s, u, y, steps = data(3)
    opts = CASES[case]
    cfg = VCRDConfig.preset("vcrd", temperature=2.0, ce_weight=0.5, divergence="jsd", **opts)
    s64 = s.clone().requires_grad_()
    want = reference.vcrd_loss(student_side(s64, opts), teacher_side(u, opts), y, step_ids=steps,
                               config=VCRDConfig.preset("vcrd", temperature=2.0, ce_weight=0.5, divergence="jsd"))
    want.backward()
    x = s.float().requires_grad_()
    got = vcrd_loss(x, u.float(), y, step_ids=steps, config=cfg, impl="torch")
    got.backward()
    assert_matches(case, got, want, [x.grad], [s64.grad])


@pytest.mark.parametrize("case", ["softcap30", "granite_student_gemma_teacher"])
@pytest.mark.parametrize("preset", ["kd", "vcrd"])
def test_fused_linear(preset, case):
    g, _, _, y, steps = data(1)
    opts = CASES[case]
    hs, ht = torch.randn(N, H, generator=g, dtype=torch.float64), torch.randn(N, H, generator=g, dtype=torch.float64)
    ws = torch.randn(V, H, generator=g, dtype=torch.float64) * (20 / math.sqrt(H))
    wt = torch.randn(V, H, generator=g, dtype=torch.float64) * (20 / math.sqrt(H))
    h64, w64 = hs.clone().requires_grad_(), ws.clone().requires_grad_()
    want = reference.vcrd_loss(student_side(h64 @ w64.T, opts), teacher_side(ht @ wt.T, opts), y, step_ids=steps,
                               config=preset)
    want.backward()
    h, w = hs.float().requires_grad_(), ws.float().requires_grad_()
    got = fused_linear_vcrd_loss(h, w, ht.float(), wt.float(), y, step_ids=steps,
                                 config=VCRDConfig.preset(preset, **opts), impl="torch", chunk_size=300)
    got.backward()
    assert_matches(f"{preset}/{case}", got, want, [h.grad, w.grad], [h64.grad, w64.grad])


def sparse_case(seed: int = 2):
    """A sparse teacher (its log-probs already those of its processed logits) and the same teacher completed."""
    g, s, u, y, steps = data(seed)
    logq = torch.log_softmax(u / 4, -1)
    top, ids = logq.topk(K, -1)
    rest = torch.logsumexp(logq.scatter(-1, ids, -math.inf), -1)
    teacher = SparseTeacher(ids, top.float(), rest.float())
    completed = (rest - math.log(V - K)).unsqueeze(-1).expand(N, V).clone()
    completed.scatter_(-1, ids, top.float().double())
    return g, s, teacher, completed, y, steps


@pytest.mark.parametrize("case", sorted(STUDENT_CASES))
@pytest.mark.parametrize("preset", ["kd", "vcrd"])
def test_sparse_teacher_student_side(preset, case):
    _, s, teacher, completed, y, steps = sparse_case()
    opts = STUDENT_CASES[case]
    want, want_grad = oracle(s, completed, y, steps, preset, opts)  # teacher options: none
    x = s.float().requires_grad_()
    got = sparse_vcrd_loss(x, teacher, y, step_ids=steps, config=VCRDConfig.preset(preset, **opts), impl="torch")
    got.backward()
    assert_matches(f"{preset}/{case}", got, want, [x.grad], [want_grad])


def test_fused_linear_sparse_student_side():
    g, _, teacher, completed, y, steps = sparse_case(4)
    opts = STUDENT_CASES["scale_and_cap"]
    hs = torch.randn(N, H, generator=g, dtype=torch.float64)
    ws = torch.randn(V, H, generator=g, dtype=torch.float64) * (20 / math.sqrt(H))
    h64, w64 = hs.clone().requires_grad_(), ws.clone().requires_grad_()
    want = reference.vcrd_loss(student_side(h64 @ w64.T, opts), completed, y, step_ids=steps, config="vcrd")
    want.backward()
    h, w = hs.float().requires_grad_(), ws.float().requires_grad_()
    got = fused_linear_sparse_vcrd_loss(h, w, teacher, y, step_ids=steps, config=VCRDConfig(**opts), impl="torch",
                                        chunk_size=300)
    got.backward()
    assert_matches("fused sparse", got, want, [h.grad, w.grad], [h64.grad, w64.grad])


@pytest.mark.parametrize("option", [dict(teacher_softcap=30.0), dict(teacher_logit_scale=0.5)])
def test_sparse_teacher_refuses_teacher_options(option):
    _, s, teacher, _, y, _ = sparse_case()
    name = next(iter(option))
    cfg = VCRDConfig(**option)
    for impl in ("torch", "reference"):
        with pytest.raises(ValueError, match=name):
            sparse_vcrd_loss(s.float(), teacher, y, config=cfg, impl=impl)
    with pytest.raises(ValueError, match=name):
        fused_linear_sparse_vcrd_loss(torch.randn(N, H), torch.randn(V, H), teacher, y, config=cfg)


@pytest.mark.parametrize("case", ["softcap30", "scale_and_cap"])
def test_vocab_parallel_one_process(case):
    """The shard pair runs in the same chunk loop: one process holding every column."""
    _, s, u, y, steps = data(5)
    opts = CASES[case]
    want, want_grad = oracle(s, u, y, steps, "vcrd", opts)
    x = s.float().requires_grad_()
    got = vocab_parallel_vcrd_loss(x, u.float(), y, vocab_start=0, vocab_size=V, step_ids=steps,
                                   config=VCRDConfig(**opts), chunk_rows=200)
    got.backward()
    assert_matches(case, got, want, [x.grad], [want_grad])


@pytest.mark.triton
@pytest.mark.parametrize("case", ["softcap30", "granite_student_gemma_teacher", "scale_and_cap"])
@pytest.mark.parametrize("preset", ["kd", "vcrd"])
def test_triton(preset, case):
    _, s, u, y, steps = data()
    opts = CASES[case]
    want, want_grad = oracle(s, u, y, steps, preset, opts)
    cfg = VCRDConfig.preset(preset, **opts)
    x = s.float().requires_grad_()
    got = vcrd_loss(x, u.float(), y, step_ids=steps, config=cfg, impl="triton")
    got.backward()
    assert_matches(f"triton {preset}/{case}", got, want, [x.grad], [want_grad])


@pytest.mark.triton
def test_triton_sparse_and_fused_linear():
    _, s, teacher, completed, y, steps = sparse_case()
    opts = STUDENT_CASES["scale_and_cap"]
    want, want_grad = oracle(s, completed, y, steps, "vcrd", opts)
    x = s.float().requires_grad_()
    got = sparse_vcrd_loss(x, teacher, y, step_ids=steps, config=VCRDConfig(**opts), impl="triton")
    got.backward()
    assert_matches("triton sparse", got, want, [x.grad], [want_grad])

    g, _, _, y, steps = data(1)
    opts = CASES["softcap30"]
    hs, ht = torch.randn(N, H, generator=g, dtype=torch.float64), torch.randn(N, H, generator=g, dtype=torch.float64)
    ws = torch.randn(V, H, generator=g, dtype=torch.float64) * (20 / math.sqrt(H))
    wt = torch.randn(V, H, generator=g, dtype=torch.float64) * (20 / math.sqrt(H))
    h64, w64 = hs.clone().requires_grad_(), ws.clone().requires_grad_()
    want = reference.vcrd_loss(student_side(h64 @ w64.T, opts), teacher_side(ht @ wt.T, opts), y, step_ids=steps)
    want.backward()
    h, w = hs.float().requires_grad_(), ws.float().requires_grad_()
    got = fused_linear_vcrd_loss(h, w, ht.float(), wt.float(), y, step_ids=steps, config=VCRDConfig(**opts),
                                 impl="triton", chunk_size=300)
    got.backward()
    assert_matches("triton fused", got, want, [h.grad, w.grad], [h64.grad, w64.grad])


def half_precision_case(impl: str, n: int):
    """bf16 logits with only one model's options set (the other model's logits reach the pair as given)."""
    _, s, u, y, steps = data(6)
    s, u, y, steps = s[:n].bfloat16(), u[:n].bfloat16(), y[:n], steps[:n]
    for opts in (dict(student_logit_scale=0.125), dict(teacher_softcap=30.0)):
        want, want_grad = oracle(s.double(), u.double(), y, steps, "vcrd", opts)
        x = s.clone().requires_grad_()
        got = vcrd_loss(x, u, y, step_ids=steps, config=VCRDConfig(**opts), impl=impl)
        got.backward()
        assert x.grad.dtype == torch.bfloat16
        assert_matches(f"{impl} bf16 {opts}", got, want, [x.grad], [want_grad], tol=1e-2)
        assert abs(got.item() - want.item()) <= 1e-5 * abs(want.item())


def test_bf16_logits_with_one_models_options():
    half_precision_case("torch", N)


@pytest.mark.triton
def test_triton_bf16_logits_with_one_models_options():
    half_precision_case("triton", 256)
