"""vcrd inside TRL's own ``GKDTrainer``: a drop-in for its ``generalized_jsd_loss``.

``GKDTrainer.compute_loss`` calls ``self.generalized_jsd_loss(student_logits=..., teacher_logits=...,
labels=..., beta=self.beta, num_items_in_batch=...)`` on shifted full-vocabulary logits; a subclass
that replaces that one attribute trains with vcrd's loss and keeps everything else of TRL (on-policy
``lmbda``, ``seq_kd``, generation, data handling)::

    class VCRDGKDTrainer(GKDTrainer):
        generalized_jsd_loss = staticmethod(as_generalized_jsd_loss("vcrd"))
"""

from __future__ import annotations

from typing import Callable, Optional, Union

import torch

from ..core.config import VCRDConfig, resolve_config
from ..loss.functional import vcrd_loss


def as_generalized_jsd_loss(config: Union[VCRDConfig, str, None] = "vcrd") -> Callable[..., torch.Tensor]:
    """A function with the signature of TRL's ``generalized_jsd_loss`` that computes the vcrd loss.

    TRL's ``beta`` sets the divergence as TRL defines it (``jsd`` with that beta; 0 is forward KL, 1
    reverse KL); ``temperature`` and the other options come from ``config``; ``reduction`` keeps
    TRL's meanings (``"batchmean"`` by default). With ``config="kd"`` the result equals TRL's own
    loss; the weighted presets need the labels (TRL passes them).
    """
    cfg = resolve_config(config)

    def generalized_jsd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                             labels: Optional[torch.Tensor] = None, beta: float = 0.5,
                             temperature: Optional[float] = None, reduction: str = "batchmean",
                             num_items_in_batch=None) -> torch.Tensor:
        options = dict(divergence="jsd", beta=float(beta))
        if temperature is not None:
            options["temperature"] = float(temperature)
        return vcrd_loss(student_logits, teacher_logits, labels, config=cfg.replace(**options),
                         reduction=reduction, num_items_in_batch=num_items_in_batch)

    return generalized_jsd_loss
