"""Why vcrd flushes subnormal gradient entries: time a CPU GEMM on a realistic logit gradient.

    python benches/subnormal_gemm.py

The gradient of the ``vcrd`` preset's loss w.r.t. the student logits, as the plain-PyTorch
reference computes it (autograd, nothing flushed) and hands it to the LM head's backward, with and
without its subnormal entries set to 0. The detached weights (w_dc can be ~1e-2 when the student
is far from the teacher) and 1/Z push many small entries below the smallest normal float.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benches.compare import make_inputs  # noqa: E402


def median_time(fn, repeats: int = 3) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    from vcrd import vcrd_loss

    rows, H, V = 460, 512, 151936
    hs, ws, ht, wt, y, steps = make_inputs(rows, H, V)
    with torch.no_grad():
        s, u = (hs @ ws.T).requires_grad_(), ht @ wt.T
    with torch.enable_grad():
        vcrd_loss(s, u, y, step_ids=steps, config="vcrd", impl="reference").backward()
    with torch.no_grad():
        grad = s.grad
        tiny = torch.finfo(torch.float32).tiny
        subnormal = (grad != 0) & (grad.abs() < tiny)
        flushed = torch.where(subnormal, 0.0, grad)
        w = ws.detach()
        print(f"gradient [{rows}, {V}] of the vcrd preset: {subnormal.float().mean().item():.2%} subnormal entries")
        print(f"GEMM grad @ W [{V}, {H}]: {median_time(lambda: grad @ w):.3f} s as is, "
              f"{median_time(lambda: flushed @ w):.3f} s with subnormals flushed (median of 3, "
              f"{torch.get_num_threads()} threads)")


if __name__ == "__main__":
    main()
