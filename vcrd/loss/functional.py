"""The documented entry point: ``vcrd_loss`` checks its inputs, then dispatches by ``impl``.

``impl="auto"`` picks the Triton kernels for CUDA tensors (and for CPU tensors when Triton's
interpreter is on, ``TRITON_INTERPRET=1``), else the CPU fast path ``"torch"``; ``"reference"``
runs :mod:`vcrd.core.reference`, the plain formula of SPEC.md.
"""

from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
from torch.autograd.graph import increment_version
from typing_extensions import Unpack

from ..backends import IMPLS, resolve_impl, run_backend
from ..backends.autograd import attach_grads
from ..backends.memory import advise_huge_pages
from ..core import reference
from ..core.checks import RowBatch, prepare
from ..core.loss_options import LossOptions, ReferenceOptions, ResolvedOptions, resolve_options
from ..core.reduction import reduce_rows, row_normalizer
from ..core.stats import VCRDStats


def vcrd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: Optional[torch.Tensor] = None,
    *,
    inplace_grad: bool = False,
    check_inputs: bool = True,
    **options: Unpack[LossOptions],
) -> Union[torch.Tensor, Tuple[torch.Tensor, VCRDStats]]:
    """Validity-weighted, distribution-corrected distillation loss on logits (SPEC.md).

    ``L = Σ_r m_r·[kd_weight·w_val,r·w_dc,r·D_r + ce_weight·CE_r] / Z``.

    Args:
        student_logits: ``[N, V_s]`` or ``[B, T, V_s]``, fp32/bf16/fp16; row r predicts ``labels[r]``.
        teacher_logits: same leading shape, ``[..., V_t]``; must not require grad.
        labels: ``[N]`` or ``[B, T]`` integer; ``config.ignore_index`` marks rows with no loss. None: every
            row counts (TRL's ``labels=None``); only for configs that need no trace token
            (``correction=False``, ``ce_weight=0``, e.g. ``"kd"``).
        inplace_grad: write the student-logit gradient over ``student_logits`` (Liger's cross-entropy
            convention): no gradient buffer is allocated, and **the logits are destroyed** (after the
            call they hold the gradient, scaled by the upstream gradient once backward runs). Only
            when a gradient is computed; needs ``impl="torch"``/``"triton"``, logits with unit stride
            along the vocabulary and no expanded (stride-0) dimension, and logits no earlier
            autograd operation saved for its backward (else backward raises PyTorch's "modified by
            an inplace operation" error).
        check_inputs: ``True`` (default) checks label values, step ids and ``cu_seqlens`` (reading them
            waits for the device). ``False`` skips every check that reads tensor values, and the call
            issues no host-device synchronisation (for CUDA graphs and larger compiled graphs): the
            caller vouches for the values (wrong ones are not reported clearly: wrong results or an
            indexing error). Shapes, dtypes and devices are checked either way.
        **options: ``step_ids``, ``cu_seqlens``, ``config``, ``num_items_in_batch``, ``vocab_size``,
            ``reduction``, ``impl``, ``return_stats``: :class:`vcrd.core.loss_options.LossOptions`.

    Returns:
        The loss (0-dim, or shaped like ``labels`` for ``"none"``), in fp32 (fp64 for fp64 input),
        and the stats if asked. NaN in a non-ignored row's logits gives a NaN loss; ignored rows
        never affect the result.
    """
    if not isinstance(check_inputs, bool):
        raise TypeError(f"check_inputs: expected True or False, got {type(check_inputs).__name__}")
    opts = resolve_options("vcrd_loss", options, IMPLS, check_values=check_inputs)
    batch = prepare(student_logits, teacher_logits, labels, opts.step_ids, opts.cu_seqlens, opts.config,
                    opts.vocab_size, check_values=check_inputs)
    impl = resolve_impl(opts.impl, student_logits)
    check_inplace_grad(inplace_grad, student_logits, teacher_logits, impl)
    if impl == "reference":
        return reference.vcrd_loss(student_logits, teacher_logits, labels, **opts.keywords(ReferenceOptions))

    return loss_from_batch(student_logits, batch, opts, impl, inplace_grad)


def check_inplace_grad(inplace_grad: bool, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                       impl: str) -> None:
    """``inplace_grad=True`` needs a fast path and logits the gradient can be written over: unit stride
    along the vocabulary, no expanded (stride-0) dimension, no memory shared with the teacher."""
    if not isinstance(inplace_grad, bool):
        raise TypeError(f"inplace_grad: expected True or False, got {type(inplace_grad).__name__}")
    if not inplace_grad:
        return
    if impl == "reference":
        raise ValueError("inplace_grad: expected impl='auto', 'torch' or 'triton' (the reference computes its "
                         "gradient by autograd), got impl='reference'")
    x = student_logits
    if x.stride(-1) != 1:
        raise ValueError(f"inplace_grad: expected student_logits with unit stride along the vocabulary, got "
                         f"strides {x.stride()}")
    if any(stride == 0 and size > 1 for stride, size in zip(x.stride(), x.shape)):
        raise ValueError(f"inplace_grad: student_logits is an expanded view (strides {x.stride()}): its rows share "
                         "memory, so the gradient cannot be written over it; pass a materialised tensor")
    if x.untyped_storage().data_ptr() == teacher_logits.untyped_storage().data_ptr():
        raise ValueError("inplace_grad: student_logits and teacher_logits share memory; the gradient written over "
                         "the student would overwrite the teacher")


def loss_from_batch(student_logits: torch.Tensor, batch: RowBatch, opts: ResolvedOptions, impl: str,
                    inplace_grad: bool = False):
    """The loss of a checked batch on a resolved backend (``"torch"`` or ``"triton"``): the gradient
    buffer, the sweeps, the reduction and the autograd glue (shared with the sparse-teacher loss: the
    registry picks the backend from the batch's teacher kind). ``inplace_grad``: the gradient is written over
    ``student_logits`` (checked by :func:`check_inplace_grad`)."""
    cfg, reduction, num_items_in_batch = opts.config, opts.reduction, opts.num_items_in_batch
    want_grad = torch.is_grad_enabled() and student_logits.requires_grad
    Z = row_normalizer(reduction, cfg, num_items_in_batch, batch.rows)
    grad = grad_rows = None
    if want_grad and inplace_grad:
        grad = student_logits.detach()  # shares storage and version counter: autograd sees the write
        if grad.shape[-1] > batch.vocab:
            grad[..., batch.vocab:] = 0
        grad_rows = batch.s  # the row view (never a copy): each chunk is read before it is overwritten
    elif want_grad:
        grad = torch.empty_like(student_logits, memory_format=torch.contiguous_format)
        advise_huge_pages(grad)  # fewer page faults on its first write
        grad_rows = grad.view(-1, grad.shape[-1])
        if grad_rows.shape[1] > batch.vocab:
            grad_rows[:, batch.vocab:] = 0
        grad_rows = grad_rows[:, :batch.vocab]
    with torch.no_grad():
        rows = run_backend(impl, batch, cfg, grad_rows, 1.0 / Z)
        if want_grad and inplace_grad:  # a kernel's write is invisible to autograd: say the logits changed
            increment_version(grad)
        value, post_scale = reduce_rows(rows["per_row"], rows["w"], reduction, cfg, Z, batch.shape, batch.n_valid,
                                        num_items_in_batch)
    loss = attach_grads(value, [(student_logits, grad)], post_scale) if want_grad else value
    if opts.return_stats:
        return loss, VCRDStats.from_rows(rows, batch.rows)
    return loss
