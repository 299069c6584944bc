"""A thin trainer: the VCRD loss between a student and a frozen teacher, from hidden states.

:func:`distill_loss` is the whole method and works in any training loop (plain PyTorch,
accelerate, DDP): both models run through their own ``forward`` (so DDP's gradient hooks,
accelerate's autocast and any other wrapper around the student take effect) with
``output_hidden_states`` and ``logits_to_keep=1`` (no ``[B, T, V]`` logits); the final hidden
states (after the last norm) and the LM heads (taken from the unwrapped models) go to
:class:`vcrd.FusedLinearVCRDLoss`. The teacher runs under ``torch.no_grad``; labels and step ids are
shifted so row t predicts token t+1, and prompt/padding positions (label ``-100``) carry no loss.
:class:`VCRDTrainer` is a ``transformers.Trainer`` whose ``compute_loss`` calls it, whose
``evaluate()`` reports ``eval_loss`` (and the mean weights), and which logs the loss parts and
weight statistics.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
from torch import nn

from ..core.config import VCRDConfig, resolve_config
from ..core.stats import ROW_FIELDS, VCRDStats
from ..loss.fused_linear import FusedLinearVCRDLoss
from ..loss.sparse import SparseTeacher, fused_linear_sparse_vcrd_loss
from .models import check_causal_lm, config_for_models, final_hidden, reshard_head, unwrap_model

BATCH_KEYS = ("input_ids", "attention_mask", "labels", "step_ids")
# logged means: stats field -> log name
LOGGED = (("w_val", "w_val"), ("w_dc", "w_dc"), ("agree", "agree"), ("n", "naturalness"), ("D", "divergence"))
Count = Union[int, float, torch.Tensor, None]


def _int_tensor(name: str, value, shape: Optional[torch.Size] = None) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"batch[{name!r}]: expected a torch.Tensor, got {type(value).__name__}")
    if value.dtype.is_floating_point or value.dtype.is_complex:
        raise TypeError(f"batch[{name!r}]: expected an integer tensor, got {value.dtype}")
    if shape is not None and value.shape != shape:
        raise ValueError(f"batch[{name!r}]: expected shape {tuple(shape)} like batch['input_ids'], "
                         f"got {tuple(value.shape)}")
    return value


def _check_batch(batch) -> Tuple[torch.Tensor, Optional[torch.Tensor], torch.Tensor, Optional[torch.Tensor]]:
    if not isinstance(batch, Mapping):
        raise TypeError(f"batch: expected a mapping of tensors (input_ids, labels, ...), got {type(batch).__name__}")
    for key in ("input_ids", "labels"):
        if key not in batch:
            raise ValueError(f"batch: missing {key!r} (got keys {sorted(batch)})")
    ids = _int_tensor("input_ids", batch["input_ids"])
    if ids.dim() != 2 or ids.shape[1] < 2:
        raise ValueError(f"batch['input_ids']: expected shape [B, T] with T >= 2, got {tuple(ids.shape)}")
    labels = _int_tensor("labels", batch["labels"], ids.shape)
    mask = batch.get("attention_mask")
    if mask is not None:
        if not isinstance(mask, torch.Tensor):
            raise TypeError(f"batch['attention_mask']: expected a torch.Tensor, got {type(mask).__name__}")
        if mask.shape != ids.shape:
            raise ValueError(f"batch['attention_mask']: expected shape {tuple(ids.shape)} like batch['input_ids'], "
                             f"got {tuple(mask.shape)}")
    steps = batch.get("step_ids")
    if steps is not None:
        steps = _int_tensor("step_ids", steps, ids.shape)
    return ids, mask, labels, steps


def _loss_module(loss_fn, name: str = "loss_fn") -> FusedLinearVCRDLoss:
    if isinstance(loss_fn, FusedLinearVCRDLoss):
        return loss_fn
    if loss_fn is not None and not isinstance(loss_fn, (VCRDConfig, str)):
        raise TypeError(f"{name}: expected a FusedLinearVCRDLoss, a VCRDConfig, a preset name or None, "
                        f"got {type(loss_fn).__name__}")
    return FusedLinearVCRDLoss(resolve_config(loss_fn))


def _with_models(loss_fn: FusedLinearVCRDLoss, student: nn.Module, teacher: Optional[nn.Module]) -> FusedLinearVCRDLoss:
    """``loss_fn`` with each model's logit scale and soft-cap read from its config (TRL's rules:
    :func:`vcrd.train.models.config_for_models`); ``loss_fn`` itself when they are the identity."""
    cfg = config_for_models(loss_fn.config, student, teacher)
    if cfg is loss_fn.config:
        return loss_fn
    return FusedLinearVCRDLoss(cfg, reduction=loss_fn.reduction, chunk_size=loss_fn.chunk_size, impl=loss_fn.impl)


def _check_count(num_items_in_batch: Count) -> Count:
    if num_items_in_batch is None:
        return None
    if isinstance(num_items_in_batch, torch.Tensor):
        if num_items_in_batch.numel() != 1:
            raise ValueError(f"num_items_in_batch: expected a number or a one-element tensor, got a tensor of "
                             f"shape {tuple(num_items_in_batch.shape)}")
        return num_items_in_batch.reshape(())
    if isinstance(num_items_in_batch, bool) or not isinstance(num_items_in_batch, (int, float)):
        raise TypeError(f"num_items_in_batch: expected an int, a float, a one-element tensor or None, "
                        f"got {type(num_items_in_batch).__name__}")
    return num_items_in_batch


def distill_loss(student: nn.Module, teacher: nn.Module, batch: Mapping,
                 loss_fn: Union[FusedLinearVCRDLoss, VCRDConfig, str, None] = None,
                 num_items_in_batch: Count = None) -> Tuple[torch.Tensor, VCRDStats]:
    """The distillation loss of one (micro-)batch, and its per-row statistics.

    Args:
        student: a causal LM (``transformers`` ``*ForCausalLM``), possibly wrapped (DDP, accelerate,
            ``torch.compile``, PEFT); its own ``forward`` runs, so wrappers (autocast, gradient
            hooks) take effect. Gradients reach every parameter the final hidden states and the LM
            head depend on.
        teacher: a causal LM on the same device, run under ``torch.no_grad``; its vocabulary may
            be larger (padded embeddings): the first ``min(V_s, V_t)`` columns are compared.
        batch: ``input_ids [B, T]``, ``labels [B, T]`` (the trace token at each position,
            ``ignore_index`` (-100) on prompt and padding), optional ``attention_mask [B, T]`` and
            ``step_ids [B, T]`` (see :class:`vcrd.train.data.DistillCollator`); ``T >= 2``. Other keys are
            ignored.
        loss_fn: a :class:`FusedLinearVCRDLoss`, or a ``VCRDConfig`` / preset name to build one
            (default preset ``vcrd``).
        num_items_in_batch: the number of predicted tokens (``labels[:, 1:] != ignore_index``) in the
            whole accumulated batch, over all micro-batches (and ranks); then the micro-batch losses
            add up to the full-batch loss (``normalize="tokens"``; ``"weights"`` as SPEC §6). By
            default the loss is this batch's own mean.

    Returns:
        ``(loss, stats)``: the scalar fp32 loss and :class:`VCRDStats` with per-row tensors of
        shape ``[B, T - 1]`` (row t scores ``labels[:, t + 1]``).

    Raises:
        TypeError / ValueError naming the argument for a malformed batch, an unsupported model
        (no LM head, logits that are not ``h @ W^T + b`` after the scale and soft-cap its config
        declares), a config whose ``student_*``/``teacher_*`` post-processing options disagree with a
        model's own, or a bad count. Each model's logit scale and soft-cap (Cohere, Granite, Gemma 2/3,
        ...) are read from its config with TRL's rules and applied by the loss (SPEC §1), so the
        student is trained on the models' own distributions.
    """
    loss_fn = _loss_module(loss_fn)
    input_ids, mask, labels, steps = _check_batch(batch)
    num_items_in_batch = _check_count(num_items_in_batch)
    if CACHE_KEYS[0] in batch:  # offline: the teacher's top-K rows come with the batch (vcrd cache-teacher)
        return _distill_from_cache(student, batch, loss_fn, input_ids, mask, labels, steps, num_items_in_batch)
    teacher_lm = check_causal_lm(teacher, "teacher")  # refused before the student's forward runs
    student_lm = check_causal_lm(student, "student")
    loss_fn = _with_models(loss_fn, student, teacher)  # each model's own scale and soft-cap (SPEC §1)
    h_s, w_s, b_s = final_hidden(student, input_ids, mask, "student", student_lm)
    with torch.no_grad():
        h_t, w_t, b_t = final_hidden(teacher, input_ids, mask, "teacher", teacher_lm)
    v_s, v_t = w_s.shape[0], w_t.shape[0]
    loss, stats = loss_fn(h_s[:, :-1], w_s, h_t[:, :-1].detach(), w_t.detach(), labels[:, 1:],
                          student_bias=b_s, teacher_bias=None if b_t is None else b_t.detach(),
                          step_ids=None if steps is None else steps[:, 1:], num_items_in_batch=num_items_in_batch,
                          vocab_size=min(v_s, v_t) if v_s != v_t else None, return_stats=True)
    # FSDP2: a head gathered for the loss is resharded by the backward; without one, give it back now
    reshard_head(teacher, teacher_lm[0])
    if not loss.requires_grad:
        reshard_head(student, student_lm[0])
    return loss, stats


CACHE_KEYS = ("teacher_topk_ids", "teacher_topk_logprobs", "teacher_tail_logprob")


def _distill_from_cache(student, batch, loss_fn, input_ids, mask, labels, steps, num_items_in_batch):
    """:func:`distill_loss` with a cached sparse teacher (SPEC §10): ``batch`` carries
    ``teacher_topk_ids [B, T, K]``, ``teacher_topk_logprobs [B, T, K]``, ``teacher_tail_logprob [B, T]``
    aligned with the input positions (:class:`vcrd.train.teacher_cache_collator.TeacherCacheCollator`); no
    teacher model runs."""
    missing = [k for k in CACHE_KEYS if k not in batch]
    if missing:
        raise ValueError(f"batch: a cached teacher needs {list(CACHE_KEYS)}, missing {missing}")
    teacher = SparseTeacher(*(batch[k][:, :-1] for k in CACHE_KEYS))
    student_lm = check_causal_lm(student, "student")
    loss_fn = _with_models(loss_fn, student, None)  # the cache holds the teacher after its own post-processing
    h_s, w_s, b_s = final_hidden(student, input_ids, mask, "student", student_lm)
    return fused_linear_sparse_vcrd_loss(
        h_s[:, :-1], w_s, teacher, labels[:, 1:], student_bias=b_s, step_ids=None if steps is None else steps[:, 1:],
        config=loss_fn.config, num_items_in_batch=num_items_in_batch, reduction=loss_fn.reduction,
        chunk_size=loss_fn.chunk_size, impl=loss_fn.impl, return_stats=True)


class _StatSums:
    """Token-weighted sums of the logged statistics, kept on the device (no host sync per step)."""

    def __init__(self) -> None:
        self.sums: Dict[str, torch.Tensor] = {}
        self.count: Optional[torch.Tensor] = None

    def add(self, stats: VCRDStats) -> None:
        valid = stats.valid
        for key, name in LOGGED:
            value = torch.where(valid, getattr(stats, key).double(), 0.0).sum()
            self.sums[name] = self.sums[name] + value if name in self.sums else value
        n = valid.sum()
        self.count = n if self.count is None else self.count + n

    def means(self, prefix: str = "") -> Dict[str, float]:
        if self.count is None:
            return {}
        count = max(float(self.count), 1.0)
        return {f"{prefix}{name}": round(float(v) / count, 4) for name, v in self.sums.items()}


try:
    from transformers import Trainer
except ImportError:  # pragma: no cover - transformers is a dependency; keep the helper usable without it
    Trainer = object


class VCRDTrainer(Trainer):
    """``transformers.Trainer`` for VCRD distillation: ``VCRDTrainer(model=student, teacher_model=teacher,
    vcrd_config="vcrd", args=TrainingArguments(..., remove_unused_columns=False), train_dataset=...,
    data_collator=DistillCollator(tokenizer))``.

    - The teacher is frozen (``requires_grad_(False)``, eval mode) and moved to the student's device.
    - The loss is normalised by the Trainer's ``num_items_in_batch``: this trainer makes the Trainer
      count ``labels[..., 1:] != ignore_index`` over the accumulated batch (the rows
      :func:`distill_loss` scores; over all ranks when ``average_tokens_across_devices``), so
      gradient accumulation gives the full-batch gradient (``normalize="tokens"``; SPEC §6 for
      ``"weights"``) and the Trainer does not divide the loss again. Under data parallelism the
      loss is multiplied by the number of processes, as the Trainer does for its own losses, so
      DDP's averaging yields the gradient of the whole batch (SPEC §11).
    - ``evaluate()`` returns ``eval_loss`` (mean over eval batches, as the Trainer averages) and
      ``eval_w_val``, ``eval_w_dc``, ``eval_agree``, ``eval_naturalness``, ``eval_divergence``
      (token means over the eval set). With ``compute_metrics``, the predictions are the per-row
      statistics ``(D, w_val, w_dc, g, n, lp_s, lp_u, agree)``, each ``[B, T - 1]``.
    - Each training log adds the token means of ``w_val``, ``w_dc``, ``agree``, ``naturalness``
      and ``divergence`` since the last log (this process's batches).
    - Offline: ``teacher_cache=DIR`` (a folder written by ``vcrd cache-teacher``) instead of
      ``teacher_model``: the train dataset's examples are paired with their index, the collator adds
      the cached top-K rows, and the loss is the sparse-teacher loss (SPEC §10); no teacher runs.
    - On-policy data as TRL's ``GKDTrainer``: ``lmbda`` (the fraction of micro-batches whose
      responses the student writes), ``seq_kd`` (the teacher writes them), ``max_new_tokens``,
      ``generation_temperature`` (0: greedy). See :meth:`generated_batch`.
    """

    def __init__(self, *args, teacher_model: Optional[nn.Module] = None,
                 vcrd_config: Union[VCRDConfig, str, None] = None, stop_on_nonfinite_loss: bool = True,
                 lmbda: float = 0.0, seq_kd: bool = False, max_new_tokens: int = 128,
                 generation_temperature: float = 0.9, teacher_cache: Optional[Union[str, Path]] = None,
                 **kwargs) -> None:
        loss = _loss_module(vcrd_config, "vcrd_config")
        if (teacher_model is None) == (teacher_cache is None):
            raise ValueError("VCRDTrainer: expected exactly one of teacher_model (online) and teacher_cache (a folder "
                             f"written by `vcrd cache-teacher`), got teacher_model={type(teacher_model).__name__}, "
                             f"teacher_cache={teacher_cache!r}")
        if teacher_cache is not None:
            # offline: the cached top-K rows ride with each batch (SPEC §10); no teacher model runs
            from .teacher_cache import TeacherCache
            from .teacher_cache_collator import IndexedExamples, TeacherCacheCollator

            if lmbda > 0 or seq_kd:
                raise ValueError("VCRDTrainer: lmbda / seq_kd generate new responses, which a teacher cache cannot "
                                 "score; use teacher_model for on-policy data")
            cache = TeacherCache(teacher_cache)
            if kwargs.get("train_dataset") is not None:
                kwargs["train_dataset"] = IndexedExamples(kwargs["train_dataset"])
            kwargs["data_collator"] = TeacherCacheCollator(kwargs["data_collator"], cache)
        if isinstance(lmbda, bool) or not isinstance(lmbda, (int, float)) or not 0.0 <= lmbda <= 1.0:
            raise ValueError(f"lmbda: expected a fraction in [0, 1], got {lmbda!r}")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens: expected an int >= 1, got {max_new_tokens!r}")
        if not isinstance(generation_temperature, (int, float)) or not generation_temperature >= 0:
            raise ValueError(f"generation_temperature: expected a number >= 0 (0: greedy), "
                             f"got {generation_temperature!r}")
        self.lmbda, self.seq_kd = float(lmbda), bool(seq_kd)
        self.max_new_tokens, self.generation_temperature = max_new_tokens, float(generation_temperature)
        if teacher_model is not None:
            check_causal_lm(teacher_model, "teacher_model")
        super().__init__(*args, **kwargs)
        check_causal_lm(self.model, "model")
        # a config that disagrees with a model's own scale or soft-cap is refused now, not at the first step
        config_for_models(loss.config, self.model, teacher_model)
        if self.args.n_gpu > 1:
            raise ValueError(f"VCRDTrainer: torch.nn.DataParallel over n_gpu={self.args.n_gpu} GPUs is not supported "
                             f"(its token count is split per GPU); launch with torchrun or accelerate (DDP) instead")
        self.vcrd_loss = loss
        self.teacher = None if teacher_model is None else \
            teacher_model.to(self.args.device).eval().requires_grad_(False)
        # the Trainer counts num_items_in_batch only for models that take loss kwargs; our loss does
        self.model_accepts_loss_kwargs = True
        if not self.label_names:
            self.label_names = ["labels"]  # prediction_step computes a loss only for batches with labels
        self._train_stats, self._eval_stats = _StatSums(), _StatSums()
        if stop_on_nonfinite_loss:  # the first NaN/inf loss raises NonFiniteLossError naming the step and data lines
            from .callbacks import NonFiniteLossStop

            self.add_callback(NonFiniteLossStop(self))

    def training_step(self, model: nn.Module, inputs: Dict[str, Any], num_items_in_batch: Count = None):
        """TRL's GKD mixing: with ``seq_kd`` the teacher writes the responses; then, with probability
        ``lmbda`` (a seeded draw per micro-batch), the student writes them (on-policy). A rewritten
        batch is scored as its own mean (its token count is no longer the Trainer's), averaged over the
        accumulated micro-batches. ``lmbda=0`` and ``seq_kd=False`` leave the Trainer's step unchanged."""
        rewritten = False
        if self.seq_kd:
            inputs, rewritten = self.generated_batch(self.teacher, inputs), True
        if self.lmbda > 0 and self._on_policy_draw() < self.lmbda:
            inputs, rewritten = self.generated_batch(self.accelerator.unwrap_model(model), inputs), True
        return super().training_step(model, inputs, None if rewritten else num_items_in_batch)

    def _on_policy_draw(self) -> float:
        """A uniform draw from a generator seeded by ``args.seed`` and the step (reproducible on resume)."""
        g = torch.Generator().manual_seed(self.args.seed * 1_000_003 + self.state.global_step * 131 +
                                          getattr(self, "_micro_step", 0))
        self._micro_step = getattr(self, "_micro_step", 0) + 1
        return float(torch.rand((), generator=g))

    @torch.no_grad()
    def generated_batch(self, model: nn.Module, inputs: Dict[str, Any]) -> Dict[str, torch.Tensor]:
        """``inputs`` with each response replaced by one ``model`` writes for its prompt (the positions
        before the first label), as TRL labels on-policy batches: prompt ``-100``, the generated ids
        (through the first EOS) as labels, padding ``-100``. Step ids are dropped (one step per token)."""
        ids, labels = inputs["input_ids"], inputs["labels"]
        ignore = self.vcrd_loss.config.ignore_index
        cfg = unwrap_model(model).generation_config
        pad = cfg.pad_token_id if cfg.pad_token_id is not None else cfg.eos_token_id
        eos = cfg.eos_token_id if not isinstance(cfg.eos_token_id, list) else cfg.eos_token_id[0]
        has_label = labels != ignore
        mask_in = inputs.get("attention_mask")
        lengths = mask_in.sum(1) if mask_in is not None else torch.full_like(ids[:, 0], ids.shape[1])
        starts = torch.where(has_label.any(1), has_label.float().argmax(1), lengths)  # no label: the whole row
        prompts = [ids[b, :int(starts[b])] for b in range(ids.shape[0])]
        L = max(len(p) for p in prompts)
        left = torch.full((len(prompts), L), pad, dtype=ids.dtype, device=ids.device)
        mask = torch.zeros_like(left)
        for b, p in enumerate(prompts):  # left padding: every prompt ends where generation starts
            left[b, L - len(p):], mask[b, L - len(p):] = p, 1
        was_training = model.training
        model.eval()
        sample = self.generation_temperature > 0
        out = model.generate(input_ids=left, attention_mask=mask, max_new_tokens=self.max_new_tokens,
                             do_sample=sample, temperature=self.generation_temperature if sample else None,
                             top_k=None, top_p=None, pad_token_id=pad, eos_token_id=eos)[:, L:]
        model.train(was_training)
        rows = []
        for b, p in enumerate(prompts):
            new = out[b]
            ends = (new == eos).nonzero()
            new = new[:int(ends[0, 0]) + 1] if len(ends) else new
            rows.append((p, new))
        T = max(len(p) + len(n) for p, n in rows)
        batch = {"input_ids": torch.full((len(rows), T), pad, dtype=ids.dtype, device=ids.device),
                 "attention_mask": torch.zeros((len(rows), T), dtype=torch.long, device=ids.device),
                 "labels": torch.full((len(rows), T), ignore, dtype=labels.dtype, device=ids.device)}
        for b, (p, n) in enumerate(rows):
            seq = torch.cat([p, n])
            batch["input_ids"][b, :len(seq)] = seq
            batch["attention_mask"][b, :len(seq)] = 1
            batch["labels"][b, len(p):len(seq)] = n
        return batch

    def _get_num_items_in_batch(self, batch_samples: List[Any], device: torch.device):
        """The Trainer's count (and its all-rank gather) over ``labels[..., 1:] != ignore_index``,
        whatever the model's loss type and the config's ``ignore_index``."""
        ignore = self.vcrd_loss.config.ignore_index
        counted = []
        for batch in batch_samples:
            labels = batch.get("labels") if isinstance(batch, Mapping) else None
            if isinstance(labels, torch.Tensor) and labels.dim() >= 1 and labels.shape[-1] >= 1:
                kept = torch.where(labels[..., 1:] == ignore, -100, 0)
                first = torch.full_like(labels[..., :1], -100)
                # -100 in column 0 and on ignored rows: counting labels or labels[..., 1:] gives the same
                batch = {**batch, "labels": torch.cat([first, kept], -1)}
                batch.pop("shift_labels", None)
            counted.append(batch)
        return super()._get_num_items_in_batch(counted, device)

    def compute_loss(self, model: nn.Module, inputs: Dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Count = None):
        """:func:`distill_loss` on ``inputs`` (``input_ids``, ``labels``, optional ``attention_mask``
        and ``step_ids``, all ``[B, T]``). Returns the loss, or ``(loss, per-row stats dict)``."""
        batch = {k: inputs[k] for k in BATCH_KEYS + CACHE_KEYS if k in inputs}
        loss, stats = distill_loss(model, self.teacher, batch, self.vcrd_loss, num_items_in_batch)
        if num_items_in_batch is not None and getattr(self.args, "average_tokens_across_devices", False):
            # the count is over all ranks and DDP averages the ranks' gradients (as Trainer.compute_loss)
            tp = self.get_tp_size() if hasattr(self, "get_tp_size") else 1
            scale = self.accelerator.num_processes // tp
            if scale != 1:
                loss = loss * scale
        (self._train_stats if model.training else self._eval_stats).add(stats)
        if not return_outputs:
            return loss
        # a dict, as Trainer.prediction_step expects; float so that padding with -100 stays meaningful
        return loss, {name: getattr(stats, name).float() for name in ROW_FIELDS}

    def evaluation_loop(self, dataloader, description: str, prediction_loss_only: Optional[bool] = None,
                        ignore_keys: Optional[List[str]] = None, metric_key_prefix: str = "eval"):
        self._eval_stats = _StatSums()
        output = super().evaluation_loop(dataloader, description, prediction_loss_only=prediction_loss_only,
                                         ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix)
        output.metrics.update(self._eval_stats.means(f"{metric_key_prefix}_"))
        self._eval_stats = _StatSums()
        return output

    def log(self, logs: Dict[str, float], *args, **kwargs) -> None:
        if "loss" in logs:
            logs.update(self._train_stats.means())
            self._train_stats = _StatSums()
        super().log(logs, *args, **kwargs)
