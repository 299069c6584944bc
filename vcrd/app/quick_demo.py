"""``vcrd demo --quick``: the three presets on one realistic batch: loss, mean weights, fwd+bwd time and the
distance to the float64 reference."""

from __future__ import annotations

import statistics
import time
from typing import List, Tuple

import torch

from .. import __version__
from ..backends import resolve_impl
from ..core.config import PRESETS, VCRDConfig
from ..loss.functional import vcrd_loss


def synthetic_batch(batch: int, seq_len: int, vocab: int, seed: int
                    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A realistic distillation batch: correlated student/teacher logits ``[B, T, V]`` (std 10), teacher-trace
    labels ``[B, T]``, prompt rows ignored, reasoning steps of 8–40 tokens (``step_ids [B, T]``)."""
    g = torch.Generator().manual_seed(seed)
    N = batch * seq_len
    u = torch.randn(N, vocab, generator=g) * 10
    s = 0.8 * u + 0.6 * torch.randn(N, vocab, generator=g) * 10
    y = torch.multinomial(torch.softmax(u / 3, -1), 1, generator=g).squeeze(1).reshape(batch, seq_len)
    y[:, : seq_len // 8] = -100  # the prompt
    lengths = torch.randint(8, 41, (batch, seq_len), generator=g)
    step_ids = torch.stack([torch.repeat_interleave(torch.arange(seq_len), row)[:seq_len] for row in lengths])
    return s.reshape(batch, seq_len, vocab), u.reshape(batch, seq_len, vocab), y, step_ids


def run_quick_demo(batch: int, seq_len: int, vocab: int, seed: int, repeats: int, impl: str) -> None:
    """Print one row per preset: loss, mean ``w_val``/``w_dc``, agreement, naturalness, the median fwd+bwd time of
    ``repeats`` runs after a warm-up, and ``|Δ|`` to the float64 reference on two sequences."""
    s, u, y, step_ids = synthetic_batch(batch, seq_len, vocab, seed)
    impl = resolve_impl(impl, s)
    print(f"vcrd {__version__} demo: {batch}×{seq_len} tokens, vocab {vocab}, fp32, impl={impl}, "
          f"{torch.get_num_threads()} threads")
    print("The first call of each preset includes torch.compile (set VCRD_COMPILE=0 to skip it).\n")
    header = f"{'preset':<8} {'loss':>9} {'mean w_val':>10} {'mean w_dc':>9} {'agree':>6} {'naturalness':>11} " \
             f"{'fwd+bwd ms':>10} {'|Δ| vs reference':>16}"
    print(header)
    print("-" * len(header))
    for name in PRESETS:
        cfg = VCRDConfig.preset(name)
        times: List[float] = []
        for _ in range(repeats + 1):  # the first run warms up (and compiles)
            x = s.clone().requires_grad_()
            t0 = time.perf_counter()
            loss, stats = vcrd_loss(x, u, y, step_ids=step_ids, config=cfg, impl=impl, return_stats=True)
            loss.backward()
            times.append(time.perf_counter() - t0)
        rows = slice(0, 2)  # parity on two sequences in float64 (the reference is O(N²) in the window)
        want = vcrd_loss(s[rows].double(), u[rows].double(), y[rows], step_ids=step_ids[rows], config=cfg,
                         impl="reference")
        got = vcrd_loss(s[rows], u[rows], y[rows], step_ids=step_ids[rows], config=cfg, impl=impl)
        m = stats.means()
        print(f"{name:<8} {loss.item():>9.4f} {m['w_val'].item():>10.3f} {m['w_dc'].item():>9.3f} "
              f"{m['agree'].item():>6.2f} {m['n'].item():>11.3f} {1e3 * statistics.median(times[1:]):>10.1f} "
              f"{abs(got.item() - want.item()):>16.2e}")
    print("\nkd: forward KL; discord: + per-token distribution correction; vcrd: + validity weight and a "
          "4-step local window (SPEC §4–5).")


__all__ = ["run_quick_demo", "synthetic_batch"]
