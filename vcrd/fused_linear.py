"""Fused-linear VCRD loss: hidden states and LM heads in, loss and gradients out, full logits never stored.

Token chunks are walked in order. Per chunk: both models' logits with fp32 accumulation
(``h @ W^T + b``), the per-row statistics, the weights (the causal window's prefix sums carry
across chunks, so a chunk's weights are final once its rows are in: SPEC §5), the gradient
w.r.t. the chunk's student logits (written over them: two ``[C, V]`` buffers per chunk), then
``grad_hidden[chunk] = g @ W_s`` and ``grad_W_s += g^T @ h_s`` (and ``grad_b_s += Σ g``) in fp32.
Rows with ``ignore_index`` are dropped before the GEMMs. The backward only scales the stored
gradients by the upstream gradient.
"""

from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
from torch import nn

from . import settings
from ._autograd import attach_grads
from .config import VCRDConfig, resolve_config
from .functional import IMPLS, loss_and_grad, resolve_impl
from .inputs import RowBatch, check_options, check_vocab, rows_of
from .reduction import reduce_rows, row_normalizer
from .stats import VCRDStats
from .weights import OUTPUT_ROWS, concat_rows
from .windows import CausalWindowMean


def _matrix(name: str, value, dim: Optional[int] = None) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(value).__name__}")
    if not value.dtype.is_floating_point:
        raise TypeError(f"{name}: expected a floating-point tensor, got {value.dtype}")
    if dim is not None and value.dim() != dim:
        raise ValueError(f"{name}: expected {dim} dimensions, got shape {tuple(value.shape)}")
    return value


def _check(student_hidden, student_weight, teacher_hidden, teacher_weight, labels, student_bias, teacher_bias,
           vocab_size) -> int:
    """Every shape/dtype/grad check of the fused-linear inputs; returns the shared vocabulary V."""
    h_s, h_t = _matrix("student_hidden", student_hidden), _matrix("teacher_hidden", teacher_hidden)
    w_s, w_t = _matrix("student_weight", student_weight, 2), _matrix("teacher_weight", teacher_weight, 2)
    if h_s.dim() not in (2, 3):
        raise ValueError(f"student_hidden: expected shape [N, H] or [B, T, H], got {tuple(h_s.shape)}")
    if h_t.shape[:-1] != h_s.shape[:-1]:
        raise ValueError(f"teacher_hidden: expected leading shape {tuple(h_s.shape[:-1])} like student_hidden, "
                         f"got {tuple(h_t.shape)}")
    if not isinstance(labels, torch.Tensor) or labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise TypeError(f"labels: expected an integer tensor, got {getattr(labels, 'dtype', type(labels).__name__)}")
    if labels.shape != h_s.shape[:-1]:
        raise ValueError(f"labels: expected shape {tuple(h_s.shape[:-1])} like the hidden states' leading dims, "
                         f"got {tuple(labels.shape)}")
    for name, h, w in (("student_weight", h_s, w_s), ("teacher_weight", h_t, w_t)):
        if w.shape[1] != h.shape[-1]:
            raise ValueError(f"{name}: expected shape [V, {h.shape[-1]}] to match the hidden size, "
                             f"got {tuple(w.shape)}")
    for name, b, w in (("student_bias", student_bias, w_s), ("teacher_bias", teacher_bias, w_t)):
        if b is not None and (_matrix(name, b, 1).shape[0] != w.shape[0]):
            raise ValueError(f"{name}: expected shape [{w.shape[0]}], got {tuple(b.shape)}")
    for name, t in (("teacher_hidden", h_t), ("teacher_weight", w_t), ("teacher_bias", teacher_bias)):
        if t is not None and t.requires_grad:
            raise ValueError(f"{name}: the teacher must not require grad (run it under torch.no_grad() or detach it)")
    devices = {t.device for t in (h_s, w_s, h_t, w_t, labels)}
    if len(devices) > 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(map(str, devices))}")
    return check_vocab(w_s.shape[0], w_t.shape[0], vocab_size)


def auto_chunk_size(n_rows: int, vocab: int, budget_bytes: int) -> int:
    """Rows per chunk: the two ``[C, V]`` fp32 buffers of a chunk (both logits; the gradient
    overwrites the student's) fit ``budget_bytes``, but at least 256 rows (GEMMs with fewer rows run
    markedly slower on CPU) and at most 1024; the rows are then split into equal chunks (a small
    last chunk would waste its GEMMs). Depends on N, never a fixed number of chunks."""
    largest = min(1024, max(256, budget_bytes // (8 * vocab)))
    n_chunks = max(1, -(-n_rows // largest))
    return max(1, -(-n_rows // n_chunks))


def _logits(h: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor]) -> torch.Tensor:
    out = h @ w.T
    return out if b is None else out + b


def fused_linear_vcrd_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    student_bias: Optional[torch.Tensor] = None,
    teacher_bias: Optional[torch.Tensor] = None,
    step_ids: Optional[torch.Tensor] = None,
    cu_seqlens: Optional[torch.Tensor] = None,
    config: Union[VCRDConfig, str, None] = None,
    num_items_in_batch: Optional[Union[int, torch.Tensor]] = None,
    vocab_size: Optional[int] = None,
    reduction: str = "mean",
    chunk_size: Union[int, str] = "auto",
    impl: str = "auto",
    return_stats: bool = False,
) -> Union[torch.Tensor, Tuple[torch.Tensor, VCRDStats]]:
    """The VCRD loss of ``logits = hidden @ weight^T + bias`` for both models, without storing logits.

    Args:
        student_hidden: ``[N, H_s]`` or ``[B, T, H_s]`` final hidden states (row r predicts ``labels[r]``).
        student_weight: ``[V_s, H_s]`` LM head (``student_bias`` ``[V_s]`` optional).
        teacher_hidden, teacher_weight, teacher_bias: the teacher's, ``H_t`` may differ; never require grad.
        labels, step_ids, cu_seqlens, config, num_items_in_batch, vocab_size, return_stats: as in
            :func:`vcrd.vcrd_loss`.
        reduction: ``"mean"`` or ``"sum"`` (per-row losses would need per-row upstream gradients
            before the weight-gradient GEMM, which the forward pass has already done).
        chunk_size: rows per chunk, or ``"auto"`` (from ``VCRD_FUSED_BUDGET_MB`` and N).
        impl: ``"auto"``, ``"triton"`` or ``"torch"`` for the per-chunk loss; ``"reference"``
            materialises both logits and runs :mod:`vcrd.reference` (tests, small inputs).

    Returns:
        The loss (fp32), and ``VCRDStats`` if asked. Gradients flow to the student's hidden states,
        weight and bias (accumulated in fp32, returned in their own dtypes).
    """
    cfg = resolve_config(config)
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction: expected 'mean' or 'sum' for the fused-linear loss, got {reduction!r}")
    check_options(reduction, impl, num_items_in_batch, cfg, IMPLS)
    V = _check(student_hidden, student_weight, teacher_hidden, teacher_weight, labels, student_bias, teacher_bias,
               vocab_size)
    if chunk_size != "auto" and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size: expected 'auto' or an int >= 1, got {chunk_size!r}")
    y, valid, starts, n_valid = rows_of(labels.shape, labels, step_ids, cu_seqlens, cfg, V)
    if impl == "reference":
        from .reference import vcrd_loss as reference_loss

        s = _logits(student_hidden.double(), student_weight.double(), None if student_bias is None else
                    student_bias.double())
        with torch.no_grad():
            u = _logits(teacher_hidden.double(), teacher_weight.double(), None if teacher_bias is None else
                        teacher_bias.double())
        return reference_loss(s, u, labels, step_ids=step_ids, cu_seqlens=cu_seqlens, config=cfg,
                              num_items_in_batch=num_items_in_batch, vocab_size=vocab_size, reduction=reduction,
                              return_stats=return_stats)

    H_s = student_hidden.shape[-1]
    h_s = student_hidden.reshape(-1, H_s)
    h_t = teacher_hidden.reshape(-1, teacher_hidden.shape[-1])
    impl = resolve_impl(impl, h_s)
    # fp32 LM heads once per call (bf16 heads: the GEMMs accumulate and output fp32, never rounded);
    # fp64 inputs stay fp64
    dtype = torch.promote_types(student_weight.dtype, torch.float32)
    w_s, w_t = student_weight[:V].to(dtype), teacher_weight[:V].to(dtype)
    b_s = None if student_bias is None else student_bias[:V].to(dtype)
    b_t = None if teacher_bias is None else teacher_bias[:V].to(dtype)

    need_h, need_w, need_b = (torch.is_grad_enabled() and t is not None and t.requires_grad
                              for t in (student_hidden, student_weight, student_bias))
    want_grad = need_h or need_w or need_b
    Z = row_normalizer(reduction, cfg, num_items_in_batch, n_valid)

    rows_idx = valid.nonzero().squeeze(1)  # ignored rows never reach a GEMM
    n = rows_idx.numel()
    # the window over kept rows only: a kept row's window holds the kept rows from its start on
    window = CausalWindowMean(torch.searchsorted(rows_idx, starts[rows_idx]), 2)
    C = auto_chunk_size(n, V, settings.fused_budget_bytes()) if chunk_size == "auto" else chunk_size
    dev = h_s.device
    grad_h = torch.zeros((h_s.shape[0], H_s), dtype=dtype, device=dev) if need_h else None
    grad_w = torch.zeros((student_weight.shape[0], H_s), dtype=dtype, device=dev) if need_w else None
    grad_b = torch.zeros(student_weight.shape[0], dtype=dtype, device=dev) if need_b else None
    parts = []
    # the loss's own precision, whatever autocast the caller runs under (its GEMMs accumulate in fp32)
    with torch.no_grad(), torch.autocast(dev.type, enabled=False):
        for c0 in range(0, n, C):
            idx = rows_idx[c0:c0 + C]
            hs, ht = h_s[idx].to(dtype), h_t[idx].to(dtype)
            chunk = RowBatch(_logits(hs, w_s, b_s), _logits(ht, w_t, b_t), y[idx],
                             torch.ones(idx.numel(), dtype=torch.bool, device=dev), starts[idx], idx.shape, idx.numel())
            g = chunk.s if want_grad else None  # the gradient overwrites the student logits, row by row
            parts.append(loss_and_grad(impl, chunk, cfg, g, 1.0 / Z, window=window))
            if need_h:
                grad_h[idx] = g @ w_s
            if need_w:
                grad_w[:V].addmm_(g.T, hs)
            if need_b:
                grad_b[:V] += g.sum(0)

        kept = concat_rows(parts, dtype, dev)
        value, post_scale = reduce_rows(kept["per_row"], kept["w"], reduction, cfg, Z, torch.Size([]), n_valid,
                                        num_items_in_batch)

    loss = value
    if want_grad:
        pairs = [(t, grad.reshape(t.shape).to(t.dtype)) for t, grad in
                 ((student_hidden, grad_h), (student_weight, grad_w), (student_bias, grad_b)) if grad is not None]
        loss = attach_grads(value, pairs, post_scale)
    if not return_stats:
        return loss
    full = {name: torch.zeros(h_s.shape[0], dtype=kept[name].dtype, device=dev).index_copy(0, rows_idx, kept[name])
            for name in OUTPUT_ROWS[2:]}
    return loss, VCRDStats.from_rows(full, valid, labels.shape)


class FusedLinearVCRDLoss(nn.Module):
    """Module form of :func:`fused_linear_vcrd_loss`.

    ``forward(student_hidden, student_weight, teacher_hidden, teacher_weight, labels, student_bias=None,
    teacher_bias=None, step_ids=None, cu_seqlens=None, num_items_in_batch=None, vocab_size=None,
    return_stats=False)``.
    """

    def __init__(self, config: Union[VCRDConfig, str, None] = None, *, reduction: str = "mean",
                 chunk_size: Union[int, str] = "auto", impl: str = "auto") -> None:
        super().__init__()
        self.config = resolve_config(config)
        self.reduction, self.chunk_size, self.impl = reduction, chunk_size, impl

    def forward(self, student_hidden, student_weight, teacher_hidden, teacher_weight, labels, student_bias=None,
                teacher_bias=None, step_ids=None, cu_seqlens=None, num_items_in_batch=None, vocab_size=None,
                return_stats=False):
        return fused_linear_vcrd_loss(
            student_hidden, student_weight, teacher_hidden, teacher_weight, labels, student_bias=student_bias,
            teacher_bias=teacher_bias, step_ids=step_ids, cu_seqlens=cu_seqlens, config=self.config,
            num_items_in_batch=num_items_in_batch, vocab_size=vocab_size, reduction=self.reduction,
            chunk_size=self.chunk_size, impl=self.impl, return_stats=return_stats)

    def extra_repr(self) -> str:
        return f"config={self.config}, reduction={self.reduction!r}, chunk_size={self.chunk_size!r}, impl={self.impl!r}"
