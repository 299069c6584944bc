"""The Triton path for a sparse (top-K) teacher (SPEC §10): O(K) teacher work per row, no densified teacher.

Statistics kernel → (the chunk loop's ``[N]`` work) → gradient kernel, as :mod:`vcrd.backends.triton_dense`
for the dense teacher, on :mod:`vcrd.kernels.sparse` (every divergence: fkl, rkl, jsd).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from ..core.config import VCRDConfig
from ..core.sparse_teacher import SparseRowBatch, lowest_absent
from ..core.weights import Rows
from .chunk_loop import Chunk
from .triton_dense import coefficients, kernel_labels, launch_rows, stat_rows, unit_stride


def teacher_rows(chunk: Chunk) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The chunk's ``ids, top [C, K]`` and ``tail [C]``, unit stride as the kernels take them."""
    batch, rows = chunk.batch, slice(chunk.r0, chunk.r1)
    return batch.ids[rows].contiguous(), batch.top[rows].contiguous(), batch.tail[rows].contiguous()


class TritonSparsePair:
    """The chunk pair on :mod:`vcrd.kernels.sparse` (``impl="triton"``, teacher ``"sparse"``)."""

    def __init__(self, cfg: VCRDConfig, batch: SparseRowBatch) -> None:
        self.cfg, self.chunk_rows = cfg, launch_rows(batch)
        self.need_ce = cfg.ce_weight > 0

    def stats(self, chunk: Chunk) -> Rows:
        from vcrd.kernels.sparse import launch_sparse_stats

        T = self.cfg.temperature
        chunk.s = s = unit_stride(chunk.s)
        ids, top, tail = teacher_rows(chunk)
        stats = launch_sparse_stats(s, ids, top, tail, lowest_absent(ids), kernel_labels(chunk), T,
                                    self.cfg.effective_divergence, self.cfg.beta,
                                    need_lse_untempered=self.need_ce and T != 1.0)
        rows = stat_rows(stats)
        rows["stats"] = stats
        rows["s_y"] = s.gather(1, chunk.labels[:, None]).squeeze(1).float()  # read before the gradient may write s
        return rows

    def grad(self, chunk: Chunk, rows: Rows, out: Optional[torch.Tensor]) -> None:
        if out is None:
            return
        from vcrd.kernels.sparse import launch_sparse_grad

        ids, top, _ = teacher_rows(chunk)
        launch_sparse_grad(chunk.s, ids, top, kernel_labels(chunk), rows["stats"], coefficients(rows), out,
                           self.cfg.temperature, self.cfg.effective_divergence, self.cfg.beta, self.need_ce)


__all__ = ["TritonSparsePair"]
