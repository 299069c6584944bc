"""Offline distillation from a sparse (top-K) teacher (SPEC §10).

The teacher is stored as its top-K: ``topk_ids [N, K]`` (decreasing probability at T=1),
``topk_logprobs [N, K]`` (``log q``, normalised over the full vocabulary) and ``tail_logprob [N]``
(``log Σ_{v∉top-K} q_v = log(1 - Σ_k q_k)``). The tail is completed uniformly: ``log q_v = tail_logprob - log(V - K)``
for every ``v`` outside the top-K (exact at K = V, the maximum-entropy completion otherwise).
Every quantity of SPEC §2–6 is then the dense formula applied to the completed teacher, whose
log-probabilities play the teacher logits (temperature applies as to logits: ``q_T ∝ q^{1/T}``).

The teacher and its row batch live in :mod:`vcrd.core.sparse_teacher` (re-exported here). On CPU
(``impl="torch"``) the teacher costs O(K) per row (:mod:`vcrd.backends.torch_sparse`: one sweep of the
student row, the completed teacher's terms from the K stored entries and the tail in closed form;
every divergence); on Triton the same math runs in :mod:`vcrd.kernels.sparse`
(:mod:`vcrd.backends.triton_sparse`). ``impl="reference"`` densifies the completed teacher.
Both losses run the dense losses' orchestration (:func:`vcrd.loss.functional.loss_from_batch`,
:func:`vcrd.loss.fused_linear.loss_from_hidden`) with a :class:`SparseRowBatch`: the backend registry
picks the sparse pair from the batch's teacher kind.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
from typing_extensions import Unpack

from ..backends import IMPLS, resolve_impl
from ..core import reference
from ..core.checks import (
    RowLayout,
    check_fused_options,
    check_tensor,
    check_vocab,
    rows_view,
)
from ..core.logit_transform import check_sparse_teacher
from ..core.loss_options import LossOptions, ReferenceOptions, resolve_options
from ..core.sparse_teacher import TAIL_TOLERANCE, SparseRowBatch, SparseTeacher, complete
from .functional import loss_from_batch
from .fused_linear import loss_from_hidden


def sparse_vcrd_loss(
    student_logits: torch.Tensor,
    teacher: SparseTeacher,
    labels: Optional[torch.Tensor] = None,
    **options: Unpack[LossOptions],
):
    """:func:`vcrd.vcrd_loss` with the teacher given as a :class:`SparseTeacher` (SPEC §10).

    ``student_logits [N, V_s]`` or ``[B, T, V_s]``; the teacher's rows match the student's. The
    vocabulary is ``V = vocab_size`` (default ``V_s``): a student whose logits are padded beyond the
    teacher's vocabulary passes ``vocab_size``; its columns ``>= V`` are left out (gradient 0) and the
    tail is completed over ``V``. ``labels`` as in :func:`vcrd.vcrd_loss`; ``**options``:
    :class:`vcrd.core.loss_options.LossOptions`.
    ``impl="reference"`` densifies the whole completed teacher and runs the reference (tests, small inputs).
    """
    opts = resolve_options("sparse_vcrd_loss", options, IMPLS)
    check_sparse_teacher(opts.config)
    check_tensor("student_logits", student_logits, "float")
    if student_logits.dim() not in (2, 3):
        raise ValueError(f"student_logits: expected shape [N, V] or [B, T, V], got {tuple(student_logits.shape)}")
    if not isinstance(teacher, SparseTeacher):
        raise TypeError(f"teacher: expected a vcrd.SparseTeacher, got {type(teacher).__name__}")
    V_s, lead, device = student_logits.shape[-1], student_logits.shape[:-1], student_logits.device
    V = check_vocab(V_s, V_s, opts.vocab_size)
    teacher.check_against(V, lead, device)
    layout = opts.layout(labels, lead, device, V)
    if opts.impl == "reference":
        dtype = torch.promote_types(student_logits.dtype, torch.float32)
        dense = teacher.completed_logprobs(slice(None), V, dtype).reshape(*lead, V)
        return reference.vcrd_loss(student_logits, dense, labels,
                                   **opts.keywords(ReferenceOptions, vocab_size=V if V != V_s else None))
    impl = resolve_impl(opts.impl, student_logits, "sparse")
    s = rows_view(student_logits, V)
    s = s if s is not None else student_logits[..., :V]
    batch = SparseRowBatch(s, s, layout, *teacher.flat())
    return loss_from_batch(student_logits, batch, opts, impl)


def fused_linear_sparse_vcrd_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher: SparseTeacher,
    labels: Optional[torch.Tensor] = None,
    *,
    student_bias: Optional[torch.Tensor] = None,
    chunk_size: Union[int, str] = "auto",
    **options: Unpack[LossOptions],
):
    """:func:`vcrd.fused_linear_vcrd_loss` with a :class:`SparseTeacher`: three GEMMs (student logits,
    grad of hidden, grad of weight), no teacher forward or GEMM. ``student_hidden [N, H]`` or
    ``[B, T, H]``, ``student_weight [V_s, H]``; the teacher's rows match the hidden states' rows.
    ``vocab_size=V`` (default ``V_s``): only the head's first ``V`` rows take part, as in
    :func:`sparse_vcrd_loss`. ``labels``, ``chunk_size`` and ``**options`` (:class:`vcrd.core.loss_options.LossOptions`)
    as in :func:`vcrd.fused_linear_vcrd_loss`."""
    opts = resolve_options("fused_linear_sparse_vcrd_loss", options, IMPLS)
    check_sparse_teacher(opts.config)
    check_fused_options(opts.reduction, chunk_size)
    for name, x, dims in (("student_hidden", student_hidden, (2, 3)), ("student_weight", student_weight, (2,))):
        check_tensor(name, x, "float")
        if x.dim() not in dims:
            raise ValueError(f"{name}: expected {' or '.join(map(str, dims))} dimensions, got {tuple(x.shape)}")
    if student_weight.shape[1] != student_hidden.shape[-1]:
        raise ValueError(f"student_weight: expected shape [V, {student_hidden.shape[-1]}], "
                         f"got {tuple(student_weight.shape)}")
    if not isinstance(teacher, SparseTeacher):
        raise TypeError(f"teacher: expected a vcrd.SparseTeacher, got {type(teacher).__name__}")
    lead, device = student_hidden.shape[:-1], student_hidden.device
    V = check_vocab(student_weight.shape[0], student_weight.shape[0], opts.vocab_size)
    teacher.check_against(V, lead, device)
    layout = opts.layout(labels, lead, device, V)
    if opts.impl == "reference":
        s = student_hidden.double() @ student_weight.double().T
        if student_bias is not None:
            s = s + student_bias.double()
        return sparse_vcrd_loss(s, teacher, labels, **opts.keywords())
    ids, top, tail = teacher.flat()

    def chunk_batch(idx: torch.Tensor, s: torch.Tensor, rows: RowLayout) -> SparseRowBatch:
        return SparseRowBatch(s, s, rows, ids[idx], top[idx], tail[idx])

    return loss_from_hidden(student_hidden, student_weight, student_bias, chunk_batch, V, layout, opts, chunk_size,
                            teacher="sparse")


__all__ = ["TAIL_TOLERANCE", "SparseRowBatch", "SparseTeacher", "complete", "fused_linear_sparse_vcrd_loss",
           "sparse_vcrd_loss"]
