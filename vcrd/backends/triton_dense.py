"""The Triton path for a dense teacher: statistics kernel → (the chunk loop's ``[N]`` work) → gradient kernel.

Two sweeps over the logits (three for JSD, whose D needs both LSEs first: the gradient kernel's first
loop writes it): the statistics kernel reads each logits element once; the gradient kernel reads
both again and writes the gradient once. ``[B, T, V]`` views that cannot be flattened without a copy
are launched one sequence at a time (a chunk never crosses a sequence).
"""

from __future__ import annotations

from typing import Optional

import torch

from ..core.checks import RowBatch
from ..core.config import VCRDConfig
from ..core.stat_columns import STAT_COLUMNS
from ..core.weights import Rows, label_log_ratio
from .chunk_loop import Chunk


def unit_stride(x: torch.Tensor) -> torch.Tensor:
    """``x`` itself when its rows are contiguous along the vocabulary, else a contiguous copy."""
    return x if x.stride(-1) == 1 else x.contiguous()


def launch_rows(batch: RowBatch) -> int:
    """Rows per launch: the whole batch, or one sequence of a ``[B, T, V]`` view."""
    return batch.s.shape[-2] if batch.s.dim() == 3 else max(1, batch.s.shape[0])


def kernel_labels(chunk: Chunk) -> torch.Tensor:
    """The labels the kernels take: ``-1`` marks an ignored row."""
    return torch.where(chunk.valid, chunk.labels, -1)


def stat_rows(stats: torch.Tensor) -> Rows:
    """``[C]`` views of a statistics kernel's columns (:data:`vcrd.core.stat_columns.STAT_COLUMNS`; a column
    written later shows through)."""
    rows = {name: stats[:, i] for i, name in enumerate(STAT_COLUMNS)}
    rows["agree"] = rows["agree"] > 0.5
    return rows


def coefficients(rows: Rows) -> torch.Tensor:
    """``[C, 2]`` fp32 ``(coef_kd, coef_ce)`` per row, as the gradient kernels read them."""
    return torch.stack([rows["coef_kd"], rows["coef_ce"]], 1).float().contiguous()


class TritonDensePair:
    """The chunk pair on :mod:`vcrd.kernels.stats` and :mod:`vcrd.kernels.grad` (``impl="triton"``, teacher
    ``"dense"``)."""

    def __init__(self, cfg: VCRDConfig, batch: RowBatch) -> None:
        self.cfg, self.chunk_rows = cfg, launch_rows(batch)
        self.need_ce = cfg.ce_weight > 0

    def stats(self, chunk: Chunk) -> Rows:
        from vcrd.kernels.stats import launch_stats

        T = self.cfg.temperature
        chunk.s, chunk.u = s, u = unit_stride(chunk.s), unit_stride(chunk.u)  # what the kernels read (Chunk)
        stats = launch_stats(s, u, kernel_labels(chunk), T, self.cfg.effective_divergence,
                             need_lse_untempered=self.need_ce and T != 1.0)
        rows = stat_rows(stats)  # views: JSD's D appears once the gradient kernel runs
        rows["stats"] = stats
        # s[y], u[y] are read before the gradient kernel, which may write over s (the fused-linear loss does)
        y = chunk.labels[:, None]
        rows["s_y"], u_y = s.gather(1, y).squeeze(1).float(), u.gather(1, y).squeeze(1).float()
        rows["log_ratio"] = label_log_ratio(rows["lp_s"], rows["lp_u"], rows["s_y"], u_y, rows["lse_s"],
                                            rows["lse_u"], T)
        return rows

    def grad(self, chunk: Chunk, rows: Rows, out: Optional[torch.Tensor]) -> None:
        """Without a gradient this only fills JSD's D column (it needs both LSEs first)."""
        from vcrd.kernels.grad import launch_grad

        launch_grad(chunk.s, chunk.u, kernel_labels(chunk), rows["stats"], coefficients(rows), out,
                    self.cfg.temperature, self.cfg.effective_divergence, self.cfg.beta, self.need_ce)


__all__ = ["TritonDensePair", "coefficients", "kernel_labels", "launch_rows", "stat_rows", "unit_stride"]
