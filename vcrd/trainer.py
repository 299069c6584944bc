"""A thin trainer: the VCRD loss between a student and a frozen teacher, from hidden states.

:func:`distill_loss` is the whole method and works in any training loop (plain PyTorch,
accelerate): the teacher runs under ``torch.no_grad``, both models' final hidden states and LM heads
go to :class:`vcrd.FusedLinearVCRDLoss` (no full logits), labels and step ids are shifted so row t
predicts token t+1, and prompt/padding positions (label ``-100``) carry no loss.
:class:`VCRDTrainer` is a ``transformers.Trainer`` whose ``compute_loss`` calls it and logs the
loss parts and weight statistics.
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple, Union

import torch
from torch import nn

from .config import VCRDConfig, resolve_config
from .fused_linear import FusedLinearVCRDLoss
from .stats import VCRDStats


def _hidden_and_head(model: nn.Module, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor]):
    """Final hidden states ``[B, T, H]`` (after the last norm) and the LM head of a causal LM."""
    head = model.get_output_embeddings()
    if head is None or not hasattr(head, "weight"):
        raise ValueError(f"model: expected a causal LM with an output embedding (LM head), got {type(model).__name__}")
    hidden = model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    return hidden, head


def distill_loss(student: nn.Module, teacher: nn.Module, batch: Dict[str, torch.Tensor],
                 loss_fn: Union[FusedLinearVCRDLoss, VCRDConfig, str, None] = None,
                 num_items_in_batch: Optional[Union[int, torch.Tensor]] = None) -> Tuple[torch.Tensor, VCRDStats]:
    """``(loss, stats)`` for one batch: ``input_ids``, ``attention_mask``, ``labels`` (``-100`` on
    prompt and padding) and optional ``step_ids``, all ``[B, T]`` (see :class:`vcrd.data.DistillCollator`).

    ``loss_fn`` is a :class:`FusedLinearVCRDLoss`, or a config / preset name to build one.
    ``num_items_in_batch`` is the number of predicted tokens in the whole accumulated batch (for
    gradient accumulation); by default the loss is the mean over this batch's predicted tokens.
    """
    if not isinstance(loss_fn, FusedLinearVCRDLoss):
        loss_fn = FusedLinearVCRDLoss(resolve_config(loss_fn))
    for key in ("input_ids", "labels"):
        if key not in batch:
            raise ValueError(f"batch: missing {key!r} (got keys {sorted(batch)})")
    input_ids, mask = batch["input_ids"], batch.get("attention_mask")
    h_s, head_s = _hidden_and_head(student, input_ids, mask)
    with torch.no_grad():
        h_t, head_t = _hidden_and_head(teacher, input_ids, mask)
    labels = batch["labels"][:, 1:]
    steps = batch["step_ids"][:, 1:] if "step_ids" in batch else None
    v_s, v_t = head_s.weight.shape[0], head_t.weight.shape[0]
    return loss_fn(h_s[:, :-1], head_s.weight, h_t[:, :-1].detach(), head_t.weight.detach(), labels,
                   student_bias=getattr(head_s, "bias", None),
                   teacher_bias=None if getattr(head_t, "bias", None) is None else head_t.bias.detach(),
                   step_ids=steps, num_items_in_batch=num_items_in_batch,
                   vocab_size=min(v_s, v_t) if v_s != v_t else None, return_stats=True)


try:
    from transformers import Trainer
except ImportError:  # pragma: no cover - transformers is a dependency; keep the helper usable without it
    Trainer = object


class VCRDTrainer(Trainer):
    """``transformers.Trainer`` for VCRD distillation: ``VCRDTrainer(model=student, teacher_model=teacher,
    vcrd_config="vcrd", args=..., train_dataset=..., data_collator=DistillCollator(tokenizer))``.

    The teacher is frozen (``requires_grad_(False)``, eval mode) and moved to the student's device.
    The loss is normalised by the Trainer's ``num_items_in_batch`` (the Trainer counts
    ``labels[..., 1:] != -100`` over the accumulated batch, the rows ``distill_loss`` scores), so it
    is already scaled for gradient accumulation; without that count, micro-batch means are averaged.
    Logged at each logging step: mean ``w_val``, ``w_dc``, ``agree``, ``naturalness`` and
    ``divergence`` over the steps since the last log.
    """

    loss_is_scaled_for_ga = True

    def __init__(self, *args, teacher_model: nn.Module, vcrd_config: Union[VCRDConfig, str, None] = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.teacher = teacher_model.to(self.args.device).eval().requires_grad_(False)
        self.vcrd_loss = FusedLinearVCRDLoss(resolve_config(vcrd_config))
        self._stat_sums: Dict[str, float] = {}
        self._stat_count = 0

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        batch = {k: inputs[k] for k in ("input_ids", "attention_mask", "labels", "step_ids") if k in inputs}
        loss, stats = distill_loss(model, self.teacher, batch, self.vcrd_loss, num_items_in_batch)
        if num_items_in_batch is None and self.args.gradient_accumulation_steps > 1:
            # the Trainer counted no tokens (models without loss kwargs): average the micro-batch means
            loss = loss / self.args.gradient_accumulation_steps
        means = stats.means()
        for key, name in (("w_val", "w_val"), ("w_dc", "w_dc"), ("agree", "agree"), ("n", "naturalness"),
                          ("D", "divergence")):
            self._stat_sums[name] = self._stat_sums.get(name, 0.0) + float(means[key])
        self._stat_count += 1
        return (loss, stats) if return_outputs else loss

    def log(self, logs: Dict[str, float], *args, **kwargs) -> None:
        if self._stat_count and "loss" in logs:
            logs.update({k: round(v / self._stat_count, 4) for k, v in self._stat_sums.items()})
            self._stat_sums, self._stat_count = {}, 0
        super().log(logs, *args, **kwargs)
