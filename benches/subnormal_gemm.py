"""Why vcrd flushes subnormal gradient entries: time a CPU GEMM on a realistic logit gradient.

    python benches/subnormal_gemm.py

The gradient of forward KL scaled by 1/Z (Z = tokens in the batch), as any distillation loss
hands it to the LM head's backward, with and without its subnormal entries set to 0.
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
    rows, H, V, Z = 460, 512, 151936, 1000
    hs, ws, ht, wt, _, _ = make_inputs(rows, H, V)
    with torch.no_grad():
        grad = (torch.softmax(hs @ ws.T, -1) - torch.softmax(ht @ wt.T, -1)) / Z
        tiny = torch.finfo(torch.float32).tiny
        subnormal = (grad != 0) & (grad.abs() < tiny)
        flushed = torch.where(subnormal, 0.0, grad)
        w = ws.detach()
        print(f"gradient [{rows}, {V}] / Z={Z}: {subnormal.float().mean().item():.2%} subnormal entries")
        print(f"GEMM grad @ W [{V}, {H}]: {median_time(lambda: grad @ w):.3f} s as is, "
              f"{median_time(lambda: flushed @ w):.3f} s with subnormals flushed (median of 3, "
              f"{torch.get_num_threads()} threads)")


if __name__ == "__main__":
    main()
