"""Loss on logits, forward + backward, fp32, CPU: naive PyTorch, TRL, vcrd presets side by side.

    pytest benches/bench_logits.py --benchmark-only --benchmark-json=benches/results/logits.json
    python benches/report.py benches/results/logits.json docs/benchmarks.md

Each case also records the peak resident memory the call adds beyond its inputs (sampled from
/proc) in ``extra_info``. Nothing here asserts on time: the numbers go into the report.
"""

from __future__ import annotations

import gc
import os

import pytest
import torch

from benches.memory import peak_rss_delta
from benches.providers import PROVIDERS, make_inputs

V = int(os.environ.get("VCRD_BENCH_V", 151936))
TOKENS = [int(n) for n in os.environ.get("VCRD_BENCH_N", "1024,2048").split(",")]


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
