"""The Triton path of the sparse-teacher loss (SPEC §10): O(K) teacher work per row, no densified teacher.

Statistics kernel → weights (``[N]`` torch ops, :func:`vcrd.core.weights.weigh_rows`) → gradient kernel,
as :mod:`vcrd.backends.triton_kernels` for the dense teacher, on :mod:`vcrd.kernels.sparse` (every
divergence: fkl, rkl, jsd).
"""

from __future__ import annotations

from typing import Optional

import torch

from ..core.checks import RowBatch
from ..core.config import VCRDConfig
from ..core.sparse_rows import lowest_absent
from ..core.weights import Rows, concat_rows, poison_gradient, row_loss, weigh_rows
from ..core.windows import CausalWindowMean
from .triton_kernels import _unit_stride


def loss_and_grad(batch: RowBatch, cfg: VCRDConfig, grad_out: Optional[torch.Tensor], grad_scale: float,
                  window: Optional[CausalWindowMean] = None) -> Rows:
    """Same contract as :func:`vcrd.loss.sparse_chunks.chunk_loss_and_grad` over a whole
    :class:`vcrd.loss.sparse._SparseRowBatch` (``ids, top [n, K]``, ``tail [n]``), on the sparse kernels."""
    from vcrd.kernels.sparse import SPARSE_STAT_NAMES, launch_sparse_grad, launch_sparse_stats

    divergence, T = cfg.effective_divergence, cfg.temperature
    need_ce = cfg.ce_weight > 0
    in_place = grad_out is batch.s
    window = window if window is not None else CausalWindowMean(batch.starts, 2)
    parts = []
    block_rows = batch.s.shape[-2] if batch.s.dim() == 3 else max(1, batch.s.shape[0])
    for r0, r1, s, _ in RowBatch.chunks(batch, block_rows):
        s, valid = _unit_stride(s), batch.valid[r0:r1]
        ids, top = batch.ids[r0:r1].contiguous(), batch.top[r0:r1].contiguous()
        labels = torch.where(valid, batch.labels[r0:r1], -1)
        stats = launch_sparse_stats(s, ids, top, batch.tail[r0:r1].contiguous(), lowest_absent(ids), labels, T,
                                    divergence, cfg.beta, need_lse_untempered=need_ce and T != 1.0)
        rows = {name: stats[:, i] for i, name in enumerate(SPARSE_STAT_NAMES)}
        rows["agree"] = rows["agree"] > 0.5
        # s[y] is read before the gradient kernel, which may write over s
        s_y = s.gather(1, batch.labels[r0:r1, None]).squeeze(1).float()
        ce = (rows["max_s"] - s_y) + rows["log_sum_untempered"] if need_ce else 0.0
        weigh_rows(rows, valid, window, cfg, grad_scale)
        rows["per_row"] = row_loss(rows, ce, valid, cfg)
        poison_gradient(rows, valid)
        if grad_out is not None:
            coef = torch.stack([rows["coef_kd"], rows["coef_ce"]], 1).float().contiguous()
            launch_sparse_grad(s, ids, top, labels, stats, coef, s if in_place else grad_out[r0:r1], T, divergence,
                               cfg.beta, need_ce)
        parts.append(rows)
    return concat_rows(parts, torch.float32, batch.s.device)
