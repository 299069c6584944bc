"""Shared test helpers: realistic logits, layouts, and the three-way parity rule of DESIGN.md."""

from __future__ import annotations

import os

import pytest
import torch

# The CPU fast path runs eagerly in the test suite (same code; tests/test_compiled.py covers
# torch.compile). Set here, before any vcrd call reads it.
os.environ.setdefault("VCRD_COMPILE", "0")

# tolerance added to the three-way bound, per dtype (Cut Cross-Entropy's rule)
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


def assert_three_way(name: str, impl: torch.Tensor, base: torch.Tensor, truth: torch.Tensor, dtype) -> None:
    """``|impl - truth| <= 2·|base - truth| + tol[dtype]`` (max over elements)."""
    e_impl, e_base = max_err(impl, truth), max_err(base, truth)
    bound = 2 * e_base + TOL[dtype]
    assert e_impl <= bound, f"{name}: |impl - truth| = {e_impl:.3e} > 2·{e_base:.3e} + {TOL[dtype]:g} = {bound:.3e}"


@pytest.fixture
def seeded():
    torch.manual_seed(0)
