"""``nn.Module`` wrappers: they store options and call :mod:`vcrd.loss.functional`."""

from __future__ import annotations

from typing import Optional, Union

import torch
from torch import nn

from ..core.config import VCRDConfig, resolve_config
from .functional import vcrd_loss


class VCRDLoss(nn.Module):
    """Module form of :func:`vcrd.vcrd_loss`; ``config`` is a :class:`VCRDConfig` or a preset name, and
    any config field may be given as a keyword (``VCRDLoss(divergence="jsd", beta=0.5, temperature=2.0)``,
    as Liger's loss modules take their options). ``inplace_grad=True`` writes the student-logit gradient
    over the student logits (they are destroyed); ``check_inputs=False`` skips the checks that read
    tensor values, so a call issues no host sync (see :func:`vcrd.vcrd_loss`).

    ``forward(student_logits [N, V] | [B, T, V], teacher_logits, labels [N] | [B, T], step_ids=None,
    cu_seqlens=None, num_items_in_batch=None, vocab_size=None, return_stats=False)``.
    """

    def __init__(self, config: Union[VCRDConfig, str, None] = None, *, reduction: str = "mean",
                 impl: str = "auto", inplace_grad: bool = False, check_inputs: bool = True, **options) -> None:
        super().__init__()
        self.config = resolve_config(config, **options)
        self.reduction = reduction
        self.impl = impl
        self.inplace_grad = inplace_grad
        self.check_inputs = check_inputs

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: Optional[torch.Tensor] = None,
                step_ids: Optional[torch.Tensor] = None, cu_seqlens: Optional[torch.Tensor] = None,
                num_items_in_batch: Optional[Union[int, torch.Tensor]] = None, vocab_size: Optional[int] = None,
                return_stats: bool = False):
        return vcrd_loss(student_logits, teacher_logits, labels, step_ids=step_ids, cu_seqlens=cu_seqlens,
                         config=self.config, num_items_in_batch=num_items_in_batch, vocab_size=vocab_size,
                         reduction=self.reduction, impl=self.impl, return_stats=return_stats,
                         inplace_grad=self.inplace_grad, check_inputs=self.check_inputs)

    def extra_repr(self) -> str:
        return (f"config={self.config}, reduction={self.reduction!r}, impl={self.impl!r}, "
                f"inplace_grad={self.inplace_grad}")
