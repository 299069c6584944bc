"""vcrd inside TRL's own ``DistillationTrainer`` (TRL >= 1.16): only the divergence is vcrd's.

TRL's ``DistillationTrainer._compute_loss`` runs both backbones on the generated completions, takes
each model's LM head (``get_output_embeddings()``) and calls ``_chunked_divergence_loss`` with the
completion mask (times the tool mask), ``num_items_in_batch`` (the accumulated batch's token count
over the processes), ``beta`` (0 forward KL, 1 reverse KL, else the generalized JSD), ``temperature``
and each model's logit scale and soft-cap. :class:`VCRDDistillationTrainer` overrides that one method:
the same inputs, masks, count and head handling (an FSDP2 ``DTensor`` head gathered once with
``full_tensor()``, a ZeRO-3 head gathered for the call), and :func:`vcrd.fused_linear_vcrd_loss` in
place of the divergence::

    trainer = VCRDDistillationTrainer(model=student, teacher_model=teacher, args=DistillationConfig(...),
                                      train_dataset=prompts, processing_class=tokenizer, vcrd_config="vcrd")

With ``vcrd_config="kd"`` it trains exactly as TRL does. TRL's ``beta`` and ``temperature`` set the
divergence (``jsd`` with that beta; vcrd computes beta 0 as ``fkl``, 1 as ``rkl``) and the
temperature; the logit scale and soft-cap come from each model's config by TRL's rules
(:func:`vcrd.train.models.config_for_models`). The completion tokens are the labels the vcrd weights
need; there are no step ids, so each completion token is a step (the causal window spans the last
``window_steps`` tokens of its completion). TRL's ``entropy`` metric (the student's entropy) is not
computed by vcrd's loss: it logs None.
"""

from __future__ import annotations

import math
from typing import Any, Dict, Optional, Tuple, Union

import torch
from torch import nn

try:
    from trl import DistillationTrainer
    from trl.trainer.utils import maybe_gather_lm_head_ctx
except ImportError as e:  # TRL missing, or older than its DistillationTrainer
    raise ImportError(f"VCRDDistillationTrainer needs TRL's DistillationTrainer (TRL 1.16 is tested): {e}") from e

from ..core.config import VCRDConfig, resolve_config
from ..loss.fused_linear import fused_linear_vcrd_loss
from .models import config_for_models

# the multimodal fields TRL 1.16's ``_compute_loss`` forwards to both backbones
MULTIMODAL_KEYS = ("pixel_values", "image_grid_thw", "pixel_attention_mask", "spatial_shapes", "image_sizes",
                   "token_type_ids", "mm_token_type_ids", "image_position_ids")


def with_trl_options(cfg: VCRDConfig, beta: float, temperature: float) -> VCRDConfig:
    """``cfg`` with TRL's divergence (``jsd`` with ``beta``: 0 is forward KL, 1 reverse KL) and
    ``temperature``. A field left at its default takes TRL's value; a divergence or temperature set to
    another one than TRL's raises ``ValueError`` naming both (it would train another objective)."""
    wanted = cfg.replace(divergence="jsd", beta=float(beta), temperature=float(temperature))
    default = VCRDConfig()
    same_divergence = cfg.effective_divergence == wanted.effective_divergence and (
        wanted.effective_divergence != "jsd" or cfg.beta == wanted.beta)
    if cfg.divergence != default.divergence and not same_divergence:
        raise ValueError(f"vcrd_config: divergence={cfg.divergence!r} (beta={cfg.beta!r}) disagrees with TRL's "
                         f"beta={beta!r} ({wanted.effective_divergence}); set the divergence with "
                         f"DistillationConfig.beta and leave vcrd's at its default")
    if cfg.temperature not in (default.temperature, wanted.temperature):
        raise ValueError(f"vcrd_config: temperature={cfg.temperature!r} disagrees with TRL's temperature="
                         f"{temperature!r}; set it with DistillationConfig.temperature")
    return wanted


def full_head(head: nn.Module, dtype: torch.dtype) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The head's ``weight [V, H]`` and ``bias [V]`` as plain tensors: an FSDP2 ``DTensor`` is gathered
    once (``full_tensor()``, differentiable) and its weight cast to the hidden states' ``dtype``, as TRL does."""
    weight, bias = head.weight, head.bias
    if isinstance(weight, torch.distributed.tensor.DTensor):
        weight = weight.full_tensor().to(dtype)
        bias = None if bias is None else bias.full_tensor()
    return weight, bias


class VCRDDistillationTrainer(DistillationTrainer):
    """TRL's ``DistillationTrainer`` with :func:`vcrd.fused_linear_vcrd_loss` as its divergence.

    ``vcrd_config``: a :class:`vcrd.VCRDConfig` or preset name (``"kd"``: TRL's loss; ``"vcrd"``: the
    validity and correction weights on); its divergence, beta and temperature come from TRL's
    ``args`` (:func:`with_trl_options`), its logit scales and soft-caps from the models' configs. Every
    other argument is TRL's.
    """

    def __init__(self, *args: Any, vcrd_config: Union[VCRDConfig, str, None] = "vcrd", **kwargs: Any) -> None:
        cfg = resolve_config(vcrd_config)  # a bad config is refused before TRL loads anything
        super().__init__(*args, **kwargs)
        self.vcrd_config = config_for_models(with_trl_options(cfg, self.beta, self.temperature), self.model,
                                             self.teacher_model)

    def _compute_loss(self, unwrapped_student: nn.Module, inputs: Dict[str, Any],
                      num_items_in_batch: Optional[Union[int, torch.Tensor]]):
        """TRL's ``_compute_loss`` with vcrd's loss: ``(loss, entropy_sum (NaN: not computed), n_valid)``.
        Hidden states ``[B, K, H]`` of the ``K`` completion positions; labels the completion ids, ignored
        where the completion (times tool) mask is 0; loss = Σ rows / ``num_items_in_batch`` (``kd``). The
        teacher's head is detached (TRL leaves it requiring grad; its divergence gives it none either)."""
        input_ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
        loss_mask = inputs["completion_mask"]
        if "tool_mask" in inputs:
            loss_mask = loss_mask * inputs["tool_mask"]
        logits_to_keep = inputs["completion_ids"].size(1)
        multimodal = {k: inputs[k] for k in MULTIMODAL_KEYS if k in inputs}

        student_hidden = self._get_last_hidden_state(unwrapped_student, input_ids, attention_mask, logits_to_keep,
                                                      **multimodal)
        self.teacher_model.eval()
        unwrapped_teacher = self.accelerator.unwrap_model(self.teacher_model)
        with torch.no_grad():
            teacher_hidden = self._forward_redirection(self.teacher_model, unwrapped_teacher,
                                                       self._get_last_hidden_state, unwrapped_teacher, input_ids,
                                                       attention_mask, logits_to_keep, **multimodal)

        student_head = unwrapped_student.get_output_embeddings()
        teacher_head = unwrapped_teacher.get_output_embeddings()
        device = student_head.weight.device
        if teacher_head.weight.device != device:
            raise ValueError(f"The student `lm_head` is on {device} but the teacher `lm_head` is on "
                             f"{teacher_head.weight.device}. Place both on the same device in their `device_map`.")
        cfg = self.vcrd_config
        labels = inputs["completion_ids"].to(device).masked_fill(loss_mask.to(device) == 0, cfg.ignore_index)
        with maybe_gather_lm_head_ctx(student_head.weight, student_head.bias, teacher_head.weight, teacher_head.bias):
            student_weight, student_bias = full_head(student_head, student_hidden.dtype)
            teacher_weight, teacher_bias = full_head(teacher_head, teacher_hidden.dtype)
            loss = fused_linear_vcrd_loss(student_hidden.to(device), student_weight, teacher_hidden.to(device),
                                          teacher_weight.detach(), labels, student_bias=student_bias,
                                          teacher_bias=None if teacher_bias is None else teacher_bias.detach(),
                                          config=cfg,
                                          num_items_in_batch=num_items_in_batch)
        n_valid = (labels != cfg.ignore_index).sum()
        return loss, torch.full((), math.nan, device=device), n_valid
