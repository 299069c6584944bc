"""Loss on logits, forward + backward, fp32, CPU: naive PyTorch, TRL, vcrd presets side by side.

    pytest benches/bench_logits.py --benchmark-only --benchmark-json=benches/results/logits.json
    python benches/report.py benches/results/logits.json docs/benchmarks.md

Each case also records the peak resident memory the call adds beyond its inputs (sampled from
/proc) in ``extra_info``, and checks the gradient it timed (the last timed call's) against the
float64 reference of the preset it computes (``benches/gradcheck.py``: rows 0..95 and N-96..N-1,
exact because the windows are causal, divided by the whole batch's ``Z``); the result goes in
``extra_info`` (``grad_check`` pass/FAIL, ``grad_rel_err``) and the report's "grad check" column.
The checker's self-test runs once first, so a checker that cannot fail stops the session. Nothing
here asserts on time: the numbers go into the report. ``VCRD_BENCH_N`` (comma-separated) and
``VCRD_BENCH_V`` set the sizes.
"""

from __future__ import annotations

import gc
import os
import warnings

import pytest
import torch

from benches import gradcheck
from benches.memory import peak_rss_delta
from benches.providers import PROVIDERS, REFERENCE_PRESET, make_inputs

V = int(os.environ.get("VCRD_BENCH_V", 151936))
TOKENS = [int(n) for n in os.environ.get("VCRD_BENCH_N", "1024,2048").split(",")]
Z_CACHE: dict = {}  # Z of the reference (one scalar per shape and preset): the costly part of a check


@pytest.fixture(scope="module", autouse=True)
def checker_can_fail():
    """The gradient checker passes vcrd's real gradients and flags wrong ones (small inputs)."""
    gradcheck.self_test(verbose=False)


@pytest.mark.parametrize("N", TOKENS)
@pytest.mark.parametrize("provider", list(PROVIDERS))
def test_loss_fwd_bwd(benchmark, provider, N):
    s, u, y, steps = make_inputs(N, V)
    x = s.requires_grad_()
    fn = PROVIDERS[provider]

    def run():
        x.grad = None
        fn(x, u, y, steps).backward()

    run()  # warm-up: torch.compile and first-touch allocations happen here
    x.grad = None
    gc.collect()
    extra, peak = peak_rss_delta(run)
    benchmark.group = f"logits fwd+bwd N={N} V={V}"
    benchmark.extra_info.update(provider=provider, N=N, V=V, peak_extra_bytes=extra, peak_rss_bytes=peak,
                                buffer_bytes=N * V * 4, threads=torch.get_num_threads(), torch=torch.__version__)
    benchmark.pedantic(run, rounds=5, warmup_rounds=0, iterations=1)
    # the gradient of the last timed call, after the timing: the check's fp64 buffers are not measured
    check = gradcheck.check_logits(x.grad, x, u, y, steps, REFERENCE_PRESET[provider], z_cache=Z_CACHE)
    benchmark.extra_info.update(check)
    print(f"\n[grad check] {provider} N={N} V={V}: {check['grad_check']} rel err {check['grad_rel_err']:.2e} "
          f"(tol {check['grad_tol']:.0e}, vs fp64 reference preset {check['grad_reference']}, rows "
          f"{check['grad_rows']}, Z over all {N}, {check['grad_check_s']:.1f} s)")
    if check["grad_check"] != "pass":  # recorded, reported, and shown in pytest's warnings summary
        warnings.warn(f"{provider} N={N} V={V}: timed gradient off the fp64 reference by {check['grad_rel_err']:.2e}",
                      stacklevel=1)
