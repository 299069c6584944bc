"""Shared test helpers: realistic logits, layouts, and the three-way parity rule of DESIGN.md.

The suite runs vcrd's default settings (``torch.compile`` of the CPU path's per-chunk math, 64-row
chunks): nothing here sets a ``VCRD_*`` variable. A test that means the eager path sets
``VCRD_COMPILE=0`` itself (``monkeypatch.setenv``), and says so.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence

import pytest
import torch

# tol[dtype] of the three-way rule, relative to max|truth| (Cut Cross-Entropy's values)
TOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2, torch.float64: 1e-10}


def realistic_logits(n: int, V: int, *, std: float = 10.0, agreement: float = 0.8, seed: int = 0,
                     dtype=torch.float32):
    """Student/teacher logits like trained LMs': ``randn·std`` with correlated teacher and student.

    ``agreement`` in [0, 1] mixes the student into the teacher (1 → near-equal models). Labels are
    the teacher's trace: mostly its argmax, some sampled from its distribution, some random.
    """
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(n, V, generator=g, dtype=torch.float64) * std
    noise = torch.randn(n, V, generator=g, dtype=torch.float64) * std
    s = agreement * u + (1 - agreement ** 2) ** 0.5 * noise
    pick = torch.rand(n, generator=g)
    sampled = torch.multinomial(torch.softmax(u / std * 3, -1).float(), 1, generator=g).squeeze(1)
    y = torch.where(pick < 0.5, u.argmax(-1), torch.where(pick < 0.8, sampled, torch.randint(0, V, (n,), generator=g)))
    return s.to(dtype), u.to(dtype), y


def step_ids_for(n: int, seed: int = 0, p_new: float = 0.2) -> torch.Tensor:
    """Non-decreasing step ids starting at 0 (a new step with probability ``p_new`` per token)."""
    g = torch.Generator().manual_seed(seed + 1)
    new = (torch.rand(n, generator=g) < p_new).long()
    new[:1] = 0
    return torch.cumsum(new, 0)


def ignore_some(y: torch.Tensor, frac: float = 0.2, seed: int = 0, ignore_index: int = -100) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed + 2)
    return torch.where(torch.rand(y.shape, generator=g) < frac, torch.full_like(y, ignore_index), y)


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


# ---------------------------------------------------------------------------------------------
# The three-way parity rule
# ---------------------------------------------------------------------------------------------

def base_dtype(dtype: torch.dtype) -> torch.dtype:
    """The precision of "base" for a test in ``dtype``: float64 for float64, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def parity_check(impl: torch.Tensor, base: torch.Tensor, truth: torch.Tensor, dtype: torch.dtype):
    """``(ok, message)`` for ``max|impl - truth| <= 2·max|base - truth| + tol[dtype]·max|truth|``.

    The three tensors (a loss or a gradient) come from the same, already rounded inputs:

    - ``truth``: the reference formula (``impl="reference"``) in float64.
    - ``base``: the same reference formula at the precision the implementation computes in. SPEC §1
      says every implementation computes in fp32 whatever the input dtype (bf16/fp16 logits are
      upcast before the softmax; the reference itself upcasts them), so for fp32/bf16/fp16 tests
      ``base`` is the reference run on the fp32 upcast of the (rounded) inputs, with its gradient
      kept in fp32 (:func:`base_dtype`); for fp64 tests it is fp64. ``2·|base - truth|`` therefore
      only admits the fp32 arithmetic noise of the formula itself (large where the formula is ill
      conditioned, e.g. a steep weight sigmoid), never the rounding of the inputs (shared by all
      three) and never a "the dtype is coarse" allowance: that is ``tol[dtype]``.
    - ``impl``: the implementation under test, in the test dtype (a bf16 input gives a bf16
      gradient; its output rounding, <= 2^-8 relative per rounding, is what ``tol[bf16] = 1e-2`` covers).

    ``tol[dtype]`` scales with ``max|truth|``: an absolute tolerance lets an all-zero gradient pass
    whenever the gradient is smaller than the tolerance (it did, for bf16, in the first version).
    Non-finite entries must match exactly (same NaN positions, same infinities); the bound is
    checked on the finite ones. ``tests/test_parity_helper.py`` proves this rejects a zeroed and a
    halved gradient for every dtype.
    """
    if impl.shape != truth.shape or base.shape != truth.shape:
        return False, f"shapes differ: impl {tuple(impl.shape)}, base {tuple(base.shape)}, truth {tuple(truth.shape)}"
    a, b, t = impl.detach().double(), base.detach().double(), truth.detach().double()
    finite = t.abs() < torch.inf  # False at NaN and ±inf
    if not torch.equal(torch.isnan(a), torch.isnan(t)) or not torch.equal(torch.where(finite, 0.0, t).nan_to_num(),
                                                                          torch.where(finite, 0.0, a).nan_to_num()):
        return False, (f"non-finite entries differ: impl has {int((~(a.abs() < torch.inf)).sum())}, truth has "
                       f"{int((~finite).sum())}")
    if not bool(finite.any()):
        return True, "no finite entries"
    err = lambda x: torch.where(finite, (x - t).abs(), 0.0).max().item()  # noqa: E731  (NaN propagates)
    e_impl, e_base = err(a), err(b)
    scale = torch.where(finite, t.abs(), 0.0).max().item()
    bound = 2 * e_base + TOL[dtype] * scale
    ok = e_impl <= bound  # False for NaN
    return ok, (f"max|impl - truth| = {e_impl:.3e} {'<=' if ok else '>'} 2·{e_base:.3e} + {TOL[dtype]:g}·{scale:.3e}"
                f" = {bound:.3e}")


def assert_parity(name: str, impl: torch.Tensor, base: torch.Tensor, truth: torch.Tensor, dtype) -> None:
    """Assert the three-way rule of :func:`parity_check` (the loss, or one gradient)."""
    ok, message = parity_check(impl, base, truth, dtype)
    assert ok, f"{name} ({dtype}): {message}"


def assert_parities(names: Sequence[str], impl: Sequence[torch.Tensor], base: Sequence[torch.Tensor],
                    truth: Sequence[torch.Tensor], dtype) -> None:
    """:func:`assert_parity` for a loss and every gradient (all of them: a missing one fails)."""
    assert len(names) == len(impl) == len(base) == len(truth), "a loss or gradient is missing"
    for name, a, b, c in zip(names, impl, base, truth):
        assert_parity(name, a, b, c, dtype)


def upstream_gradient(shape: torch.Size, seed: int = 9) -> torch.Tensor:
    """A random upstream gradient (float64): magnitudes in [0.5, 1.5] with random signs, so it is
    never 1 and never near 0 (a near-zero upstream value would hide an error in its row)."""
    g = torch.Generator().manual_seed(seed)
    magnitude = torch.rand(shape, generator=g, dtype=torch.float64) + 0.5
    sign = torch.where(torch.rand(shape, generator=g) < 0.5, -1.0, 1.0).to(torch.float64)
    return magnitude * sign


def run_with_grads(fn: Callable[..., torch.Tensor], leaves: List[Optional[torch.Tensor]], upstream: Optional[str],
                   seed: int = 9) -> List[torch.Tensor]:
    """``[loss, grad of each leaf]``: ``fn(*leaves)`` backpropagated with a random upstream gradient
    (``upstream="random"``) or ones. ``leaves`` are made leaves that require grad (None stays None)."""
    leaves = [None if t is None else t.detach().clone().requires_grad_() for t in leaves]
    loss = fn(*leaves)
    g = upstream_gradient(loss.shape, seed) if upstream == "random" else torch.ones(loss.shape, dtype=torch.float64)
    loss.backward(g.to(loss.dtype))
    return [loss.detach()] + [t.grad for t in leaves if t is not None]


def logits_three_way(s: torch.Tensor, u: torch.Tensor, y: torch.Tensor, cfg, *, step_ids=None, reduction="mean",
                     upstream: Optional[str] = "random", impl: str = "torch", check: bool = True, seed: int = 9,
                     **kw) -> Dict[str, List[torch.Tensor]]:
    """Loss and student-logit gradient of ``vcrd_loss``: ``impl`` in the dtype of ``s`` and ``u``
    (already rounded), against the reference in float64 (truth) and at :func:`base_dtype` (base),
    all on the same rounded inputs and with the same random upstream gradient; then the three-way
    rule on the loss and the gradient. Returns ``{"impl", "base", "truth": [loss, grad]}``."""
    from vcrd import vcrd_loss

    dtype = s.dtype
    out = {}
    for name, run_dtype, which in [("impl", dtype, impl), ("base", base_dtype(dtype), "reference"),
                                   ("truth", torch.float64, "reference")]:
        fn = lambda x, which=which, run_dtype=run_dtype: vcrd_loss(  # noqa: E731
            x, u.to(run_dtype), y, step_ids=step_ids, config=cfg, reduction=reduction, impl=which, **kw)
        out[name] = run_with_grads(fn, [s.to(run_dtype)], upstream, seed)
    if check:
        assert_parities(("loss", "grad"), out["impl"], out["base"], out["truth"], dtype)
    return out


@pytest.fixture
def seeded():
    torch.manual_seed(0)
