"""The Triton path: statistics kernel → weights (``[N]`` torch ops) → gradient kernel.

Two sweeps over the logits (three for JSD, whose D needs both LSEs first): the statistics kernel
reads each logits element once; the gradient kernel reads both again and writes the gradient once.
Between them only ``[N]``-sized work runs: the causal-window weights of SPEC §4–5
(:func:`vcrd.core.weights.weigh_rows`, shared with the CPU path). ``[B, T, V]`` views that cannot be
flattened without a copy are launched one sequence at a time.
"""

from __future__ import annotations

from typing import Dict, Optional

import torch

from ..core.checks import RowBatch
from ..core.config import VCRDConfig
from ..core.weights import concat_rows, label_log_ratio, poison_gradient, row_loss, weigh_rows
from ..core.windows import CausalWindowMean


def _unit_stride(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def loss_and_grad(batch: RowBatch, cfg: VCRDConfig, grad_out: Optional[torch.Tensor], grad_scale: float,
                  window: Optional[CausalWindowMean] = None) -> Dict[str, torch.Tensor]:
    """Same contract as :func:`vcrd.backends.torch_chunks.loss_and_grad`, on the Triton kernels."""
    from vcrd.kernels.grad import launch_grad
    from vcrd.kernels.stats import STAT_NAMES, launch_stats

    divergence, T = cfg.effective_divergence, cfg.temperature
    need_ce = cfg.ce_weight > 0
    in_place = grad_out is batch.s
    window = window if window is not None else CausalWindowMean(batch.starts, 2)
    parts = []
    block_rows = batch.s.shape[-2] if batch.s.dim() == 3 else max(1, batch.s.shape[0])
    for r0, r1, s, u in batch.chunks(block_rows):
        s, u, valid = _unit_stride(s), _unit_stride(u), batch.valid[r0:r1]
        labels = torch.where(valid, batch.labels[r0:r1], -1)
        stats = launch_stats(s, u, labels, T, divergence, need_lse_untempered=need_ce and T != 1.0)
        rows = {name: stats[:, i] for i, name in enumerate(STAT_NAMES)}  # views: JSD's D appears once grad runs
        rows["agree"] = rows["agree"] > 0.5
        # s[y], u[y] are read before the gradient kernel, which may write over s (the fused-linear loss does)
        y = batch.labels[r0:r1, None]
        s_y, u_y = s.gather(1, y).squeeze(1).float(), u.gather(1, y).squeeze(1).float()
        rows["log_ratio"] = label_log_ratio(rows["lp_s"], rows["lp_u"], s_y, u_y, rows["lse_s"], rows["lse_u"], T)
        # CE = (max s - s[y]) + log Σ exp(s - max s): inf only where the true value is beyond fp32's range
        ce = (rows["max_s"] - s_y) + rows["log_sum_untempered"] if need_ce else 0.0
        weigh_rows(rows, valid, window, cfg, grad_scale)
        # JSD's D is 0 until the gradient kernel writes it (finite whenever the row's logits are)
        rows["per_row"] = row_loss(rows, ce, valid, cfg)
        poison_gradient(rows, valid)
        coef = torch.stack([rows["coef_kd"], rows["coef_ce"]], 1).float().contiguous()
        # without a gradient this only fills JSD's D column (it needs both LSEs first)
        launch_grad(s, u, labels, stats, coef, None if grad_out is None else s if in_place else grad_out[r0:r1],
                    T, divergence, cfg.beta, need_ce)
        if divergence == "jsd":
            rows["per_row"] = row_loss(rows, ce, valid, cfg)
        parts.append(rows)
    return concat_rows(parts, torch.float32, batch.s.device)
