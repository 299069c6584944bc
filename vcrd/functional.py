"""The documented entry point: ``vcrd_loss`` checks its inputs, then dispatches by ``impl``.

``impl="auto"`` picks the Triton kernels for CUDA tensors (and for CPU tensors when Triton's
interpreter is on, ``TRITON_INTERPRET=1``), else the CPU fast path ``"torch"``; ``"reference"``
runs :mod:`vcrd.reference`, the plain formula of SPEC.md.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple, Union

import torch

from . import _torch, _triton, reference, settings
from ._autograd import attach_grads
from ._memory import advise_huge_pages
from .config import VCRDConfig, resolve_config
from .inputs import RowBatch, check_options, prepare
from .reduction import reduce_rows, row_normalizer
from .stats import VCRDStats
from .windows import CausalWindowMean

IMPLS = ("auto", "triton", "torch", "reference")


def triton_unavailable(student_logits: torch.Tensor) -> List[str]:
    """Every reason the Triton kernels cannot run on this input (empty when they can)."""
    reasons = []
    try:
        import triton  # noqa: F401
    except ImportError:
        reasons.append("triton is not installed (pip install triton)")
    if student_logits.device.type != "cuda" and not settings.triton_interpreter():
        reasons.append(f"tensors are on {student_logits.device.type}, not CUDA, and TRITON_INTERPRET=1 is not set")
    if student_logits.dtype == torch.float64:
        reasons.append("float64 logits (the kernels take float32, bfloat16 or float16)")
    return reasons


def resolve_impl(impl: str, student_logits: torch.Tensor) -> str:
    """``auto`` → ``triton`` when it can run, else ``torch``; a forced ``triton`` that cannot run raises."""
    if impl in ("torch", "reference"):
        return impl
    reasons = triton_unavailable(student_logits)
    if impl == "triton" and reasons:
        raise NotImplementedError("impl='triton' cannot run: " + "; ".join(reasons))
    return "torch" if reasons else "triton"


def vcrd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: Optional[torch.Tensor] = None,
    *,
    step_ids: Optional[torch.Tensor] = None,
    cu_seqlens: Optional[torch.Tensor] = None,
    config: Union[VCRDConfig, str, None] = None,
    num_items_in_batch: Optional[Union[int, torch.Tensor]] = None,
    vocab_size: Optional[int] = None,
    reduction: str = "mean",
    impl: str = "auto",
    return_stats: bool = False,
) -> Union[torch.Tensor, Tuple[torch.Tensor, VCRDStats]]:
    """Validity-weighted, distribution-corrected distillation loss on logits (SPEC.md).

    ``L = Σ_r m_r·[kd_weight·w_val,r·w_dc,r·D_r + ce_weight·CE_r] / Z``.

    Args:
        student_logits: ``[N, V_s]`` or ``[B, T, V_s]``, fp32/bf16/fp16; row r predicts ``labels[r]``.
        teacher_logits: same leading shape, ``[..., V_t]``; must not require grad.
        labels: ``[N]`` or ``[B, T]`` integer; ``config.ignore_index`` marks rows with no loss. None: every
            row counts (TRL's ``labels=None``); only for configs that need no trace token
            (``correction=False``, ``ce_weight=0``, e.g. ``"kd"``).
        step_ids: reasoning-step index per token, non-decreasing within a sequence (optional;
            without it every token is its own step).
        cu_seqlens: ``[S+1]`` packed sequence boundaries for ``[N, V]`` inputs.
        config: a :class:`VCRDConfig` or a preset name (``"kd"``, ``"discord"``, ``"vcrd"``, default).
        num_items_in_batch: the number of valid rows in the whole accumulated (and data-parallel) batch,
            for gradient accumulation (``reduction="mean"``; SPEC §6 for ``normalize="weights"``).
        vocab_size: compare columns ``0..V-1`` when the two vocabularies differ.
        reduction: ``"mean"``, ``"sum"``, ``"none"`` (per-row, shaped like ``labels``) or ``"batchmean"``
            (TRL's: the sum divided by the valid tokens with labels, by the leading dimension without).
        impl: ``"auto"``, ``"triton"``, ``"torch"`` or ``"reference"``.
        return_stats: also return a :class:`VCRDStats` of detached per-row statistics.

    Returns:
        The loss (0-dim, or shaped like ``labels`` for ``"none"``), in fp32 (fp64 for fp64 input),
        and the stats if asked. NaN in a non-ignored row's logits gives a NaN loss; ignored rows
        never affect the result.
    """
    cfg = resolve_config(config)
    check_options(reduction, impl, num_items_in_batch, cfg, IMPLS)
    batch = prepare(student_logits, teacher_logits, labels, step_ids, cu_seqlens, cfg, vocab_size)
    impl = resolve_impl(impl, student_logits)
    if impl == "reference":
        return reference.vcrd_loss(student_logits, teacher_logits, labels, step_ids=step_ids, cu_seqlens=cu_seqlens,
                                   config=cfg, num_items_in_batch=num_items_in_batch, vocab_size=vocab_size,
                                   reduction=reduction, return_stats=return_stats)

    want_grad = torch.is_grad_enabled() and student_logits.requires_grad
    Z = row_normalizer(reduction, cfg, num_items_in_batch, batch.rows)
    grad = grad_rows = None
    if want_grad:
        grad = torch.empty_like(student_logits, memory_format=torch.contiguous_format)
        advise_huge_pages(grad)  # fewer page faults on its first write
        grad_rows = grad.view(-1, grad.shape[-1])
        if grad_rows.shape[1] > batch.vocab:
            grad_rows[:, batch.vocab:] = 0
        grad_rows = grad_rows[:, :batch.vocab]
    with torch.no_grad():
        rows = run_backend(impl, batch, cfg, grad_rows, 1.0 / Z)
        value, post_scale = reduce_rows(rows["per_row"], rows["w"], reduction, cfg, Z, batch.shape, batch.n_valid,
                                        num_items_in_batch)
    loss = attach_grads(value, [(student_logits, grad)], post_scale) if want_grad else value
    if return_stats:
        return loss, VCRDStats.from_rows(rows, batch.rows)
    return loss


def run_backend(impl: str, batch: RowBatch, cfg: VCRDConfig, grad_out: Optional[torch.Tensor], grad_scale: float,
                  window: Optional[CausalWindowMean] = None) -> Dict[str, torch.Tensor]:
    """Run the backend ``impl`` (``"torch"`` or ``"triton"``) on a checked batch: ``[N]`` rows, and
    ``grad_scale · ∂(Σ_r loss_r)/∂s`` written into ``grad_out`` (see :func:`vcrd._torch.loss_and_grad`)."""
    if impl == "triton":
        return _triton.loss_and_grad(batch, cfg, grad_out, grad_scale, window=window)
    return _torch.loss_and_grad(batch, cfg, grad_out, grad_scale, settings.chunk_rows(), settings.compile_enabled(),
                                window=window)
