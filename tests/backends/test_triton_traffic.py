"""Counted memory traffic of the Triton kernels under the interpreter (see ``TrafficCounter`` in tests/helpers.py).

    TRITON_INTERPRET=1 python -m pytest -m triton tests/backends/test_triton_traffic.py -s   # prints the table
"""

from __future__ import annotations

import os

import pytest
import torch
import triton
import triton.language as tl

from vcrd import VCRDConfig, vcrd_loss

from ..helpers import TrafficCounter, batch

pytestmark = [
    pytest.mark.triton,
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="counting needs TRITON_INTERPRET=1"),
    pytest.mark.filterwarnings("ignore::RuntimeWarning"),
]


# Per valid row the statistics kernel also loads single elements by pointer: s[y]; u[y] and u[a_s].
SINGLE_READS = {"s": 1, "u": 2}


@triton.jit
def _copy_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(y_ptr + offs, tl.load(x_ptr + offs, mask=offs < n), mask=offs < n)


def test_counter_is_exact_on_a_copy():
    x = torch.randn(1000)
    y = torch.empty_like(x)
    with TrafficCounter(x=x, y=y) as t:
        _copy_kernel[(4,)](x, y, 1000, BLOCK=256)
    assert t.read["x"] == 4000 and t.written["y"] == 4000 and t.read["total"] == 4000
    assert torch.equal(x, y)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("div", ["fkl", "rkl", "jsd"])
def test_one_read_for_statistics_and_at_most_five_thirds_in_all(div, dtype):
    from vcrd.kernels.grad import launch_grad
    from vcrd.kernels.stats import launch_stats

    N, V = 24, 5000  # two vocabulary tiles
    s, u, y, steps = batch(N=N, V=V, dtype=dtype)
    labels = torch.where(y == -100, -1, y)
    n_valid = int((labels >= 0).sum())
    item = s.element_size()
    grad = torch.empty_like(s)
    with TrafficCounter(s=s, u=u, grad=grad) as stats_t:
        stats = launch_stats(s, u, labels, 1.0, div, False)
    # one sweep over each row, plus the single elements loaded by pointer (SINGLE_READS)
    assert stats_t.read["s"] == n_valid * (V + SINGLE_READS["s"]) * item
    assert stats_t.read["u"] == n_valid * (V + SINGLE_READS["u"]) * item
    coef = torch.ones(N, 2)
    with TrafficCounter(s=s, u=u, grad=grad) as grad_t:
        launch_grad(s, u, labels, stats, coef, grad, 1.0, div, 0.5, False)
    assert grad_t.written["grad"] == N * V * item  # ignored rows get their zeros too
    minimum = 2 * n_valid * V * item + N * V * item  # read s once, u once, write the gradient once
    singles = sum(SINGLE_READS.values()) * n_valid * item  # 3 elements per row: not a sweep
    logits_traffic = sum(t.read[k] + t.written[k] for t in (stats_t, grad_t) for k in ("s", "u", "grad"))
    ratio = logits_traffic / minimum
    print(f"\n{div} {dtype}: stats read s {stats_t.read['s']} B, u {stats_t.read['u']} B; grad read "
          f"s {grad_t.read['s']} B, u {grad_t.read['u']} B, wrote {grad_t.written['grad']} B; "
          f"total / minimum = {ratio:.4f} (without the single elements: {(logits_traffic - singles) / minimum:.4f})")
    sweeps = (logits_traffic - singles) / minimum
    if div == "jsd":  # JSD's D needs both LSEs first: one more read of s and u (SPEC §2)
        assert sweeps <= 7 / 3 + 1e-9
    else:
        assert sweeps <= 5 / 3 + 1e-9


def test_loss_call_traffic_matches_kernels():
    """The whole vcrd_loss call on the Triton path moves the logits no more than the kernels do."""
    s, u, y, steps = batch(N=16, V=3000)
    x = s.clone().requires_grad_()
    with TrafficCounter(s=x, u=u) as t:
        vcrd_loss(x, u, y, step_ids=steps, config=VCRDConfig(), impl="triton").backward()
    n_valid = int((y != -100).sum())
    assert t.read["s"] == n_valid * (2 * 3000 + SINGLE_READS["s"]) * 4
    assert t.read["u"] == n_valid * (2 * 3000 + SINGLE_READS["u"]) * 4
