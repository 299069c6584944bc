"""The Triton path: statistics kernel → weights (``[N]`` torch ops) → gradient kernel.

Two sweeps over the logits (three for JSD, whose D needs both LSEs first): the statistics kernel
reads each logits element once; the gradient kernel reads both again and writes the gradient once.
Between them only ``[N]``-sized work runs: the causal-window weights of SPEC §4–5.
"""

from __future__ import annotations

from typing import Dict, Optional

import torch

from .config import VCRDConfig
from .inputs import RowBatch
from .weights import row_weights
from .windows import CausalWindowMean


def _unit_stride(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def loss_and_grad(batch: RowBatch, cfg: VCRDConfig, grad_out: Optional[torch.Tensor], grad_scale: float,
                  window: Optional[CausalWindowMean] = None) -> Dict[str, torch.Tensor]:
    """Same contract as :func:`vcrd._torch.loss_and_grad`, on the Triton kernels."""
    from vcrd.kernels.grad import launch_grad
    from vcrd.kernels.stats import STAT_NAMES, launch_stats

    s, u, valid = _unit_stride(batch.s), _unit_stride(batch.u), batch.valid
    divergence, T = cfg.effective_divergence, cfg.temperature
    need_ce = cfg.ce_weight > 0
    labels = torch.where(valid, batch.labels, -1)
    stats = launch_stats(s, u, labels, T, divergence, need_lse1=need_ce and T != 1.0)
    rows = {name: stats[:, i] for i, name in enumerate(STAT_NAMES)}  # views: JSD's D appears once grad runs
    rows["agree"] = rows["agree"] > 0.5
    window = window if window is not None else CausalWindowMean(batch.starts, 2)
    rows.update(row_weights(rows, valid, window, cfg))
    w = rows["w_val"] * rows["w_dc"]
    coef = torch.stack([torch.where(valid, grad_scale * cfg.kd_weight * w, 0.0),
                        valid.to(torch.float32) * (grad_scale * cfg.ce_weight)], 1).float().contiguous()
    # CE reads s[y] before the gradient kernel, which may write over s (the fused-linear loss does)
    ce = rows["lse1"] - s.gather(1, batch.labels[:, None]).squeeze(1).float() if need_ce else 0.0
    launch_grad(s, u, labels, stats, coef, grad_out, T, divergence, cfg.beta, need_ce)
    rows["per_row"] = torch.where(valid, cfg.kd_weight * w * rows["D"] + cfg.ce_weight * ce, 0.0)
    rows["w"] = torch.where(valid, w, 0.0)
    return rows
