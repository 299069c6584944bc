"""Vocab-parallel fused-linear VCRD loss (SPEC §11): hidden states replicated, both LM heads sharded by rows.

Rank ``r`` holds rows ``[v0, v0 + W)`` of both LM heads (``vocab_start=v0``; rows at or beyond the full
vocabulary ``V`` are padding and ignored) and the full hidden states of both models. Per chunk of
``C`` kept rows (rows with ``ignore_index`` never reach a GEMM), in row order:

1. this shard's logits ``x = h_s W_s,r^T (+ b_s,r)``, ``z = h_t W_t,r^T (+ b_t,r)``: ``[C, W]``, fp32;
2. :class:`vcrd.distributed.vocab_parallel.ShardPair` in the chunk loop: the partial statistics, ONE all-reduce (two for
   JSD), the global weights, and ``g = ∂loss/∂x`` written over ``x``;
3. ``grad_W_s,r += g^T h_s``, ``grad_b_s,r += Σ g`` (this rank's rows only, no communication) and
   ``grad_h_s[chunk] = g W_s,r`` (this shard's share of the hidden gradient).

This is the single-process orchestration (:func:`vcrd.loss.fused_linear.loss_from_hidden`) on this
shard's rows, with the shard pair as its backend. The hidden states enter through
:class:`SumGradOverRanks` (identity forward; backward: ONE all-reduce of the ranks' shares of
``grad_h_s``, Megatron's "copy to tensor-parallel region"). Collectives per call: one
``all_gather_object`` of metadata (bad layouts and configs are refused on every rank with the same
``ValueError``), one ``all_reduce`` per chunk (two for JSD), one for the hidden gradient.
"""

from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
from typing_extensions import Unpack

from ..backends.chunk_loop import run_chunks
from ..core import settings
from ..core.checks import (
    FLOAT_DTYPES,
    RowBatch,
    RowLayout,
    check_fused_options,
)
from ..core.config import VCRDConfig
from ..core.loss_options import CommonOptions, check_keywords, resolve_options
from ..core.stats import VCRDStats
from ..core.windows import CausalWindowMean
from ..loss.fused_linear import auto_chunk_size, loss_from_hidden
from .agreement import agree_on_layout, config_fields, describe, local_meta
from .vocab_parallel import ShardPair, _all_reduce, group_info, rows_checksum

CALLER = "fused_linear_vocab_parallel_vcrd_loss"


def _local_error(h_s, w_s, h_t, w_t, b_s, b_t, vocab_start, vocab_size) -> Optional[str]:
    """What is wrong with this rank's own tensors (reported on every rank after the metadata exchange)."""
    named = (("student_hidden", h_s, (2, 3)), ("student_weight_shard", w_s, (2,)), ("teacher_hidden", h_t, (2, 3)),
             ("teacher_weight_shard", w_t, (2,)), ("student_bias_shard", b_s, (1,)),
             ("teacher_bias_shard", b_t, (1,)))
    for name, t, dims in named:
        if t is None and "bias" in name:
            continue
        if not isinstance(t, torch.Tensor):
            return f"{name}: expected a torch.Tensor, got {type(t).__name__}"
        if t.dtype not in FLOAT_DTYPES:
            return f"{name}: expected a float32, bfloat16, float16 or float64 tensor, got {t.dtype}"
        if t.dim() not in dims:
            return f"{name}: expected {dims[0] if len(dims) == 1 else ' or '.join(map(str, dims))} dimensions, " \
                   f"got shape {tuple(t.shape)}"
    if h_t.shape[:-1] != h_s.shape[:-1]:
        return f"teacher_hidden: expected leading shape {tuple(h_s.shape[:-1])} like student_hidden, got " \
               f"{tuple(h_t.shape)}"
    for who, h, w, b in (("student", h_s, w_s, b_s), ("teacher", h_t, w_t, b_t)):
        if w.shape[1] != h.shape[-1]:
            return f"{who}_weight_shard: expected shape [W, {h.shape[-1]}] to match {who}_hidden, got {tuple(w.shape)}"
        if b is not None and b.shape[0] != w.shape[0]:
            return f"{who}_bias_shard: expected shape [{w.shape[0]}] like {who}_weight_shard's rows, got " \
                   f"{tuple(b.shape)}"
    if w_t.shape[0] != w_s.shape[0]:
        return f"teacher_weight_shard: expected {w_s.shape[0]} rows like student_weight_shard (both heads' rows " \
               f"[vocab_start, vocab_start + W)), got {w_t.shape[0]}"
    if w_s.shape[0] < 1:
        return "student_weight_shard: the shard holds no row"
    for name, t in (("teacher_hidden", h_t), ("teacher_weight_shard", w_t), ("teacher_bias_shard", b_t)):
        if t is not None and t.requires_grad:
            return f"{name}: the teacher must not require grad (detach it or compute it under torch.no_grad())"
    devices = {str(t.device) for t in (h_s, w_s, h_t, w_t, b_s, b_t) if t is not None}
    if len(devices) > 1:
        return f"all tensors must be on one device, got {sorted(devices)}"
    for name, v in (("vocab_start", vocab_start), ("vocab_size", vocab_size)):
        if isinstance(v, bool) or not isinstance(v, int):
            return f"{name}: expected an int, got {type(v).__name__}"
    if vocab_size < 1 or vocab_start < 0 or vocab_start >= vocab_size:
        return f"vocab_start: expected 0 <= vocab_start < vocab_size={vocab_size}, got {vocab_start}"
    return None


def fused_linear_vocab_parallel_vcrd_loss(
    student_hidden: torch.Tensor,
    student_weight_shard: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight_shard: torch.Tensor,
    labels: Optional[torch.Tensor] = None,
    *,
    vocab_start: int,
    vocab_size: int,
    group=None,
    student_bias_shard: Optional[torch.Tensor] = None,
    teacher_bias_shard: Optional[torch.Tensor] = None,
    chunk_size: Union[int, str] = "auto",
    impl: str = "auto",
    **options: Unpack[CommonOptions],
) -> Union[torch.Tensor, Tuple[torch.Tensor, VCRDStats]]:
    """:func:`vcrd.fused_linear_vcrd_loss` with both LM heads sharded by vocabulary rows over ``group``.

    Args:
        student_hidden, teacher_hidden: ``[N, H_s]`` / ``[B, T, H_s]`` and ``[.., H_t]`` final hidden states,
            the same on every rank (replicated).
        student_weight_shard, teacher_weight_shard: ``[W, H_s]`` and ``[W, H_t]``: rows
            ``[vocab_start, vocab_start + W)`` of both LM heads (``*_bias_shard`` ``[W]`` optional). The ranks'
            ``[vocab_start, min(vocab_start + W, vocab_size))`` must tile ``[0, vocab_size)``.
        vocab_size: the full vocabulary V (rows ``>= V`` of a shard are padding: ignored, gradient 0).
        group: the vocab-parallel process group (default: the world; without ``torch.distributed``, one
            process holding every row).
        labels, chunk_size: as :func:`vcrd.fused_linear_vcrd_loss` (``chunk_size="auto"`` sizes the chunks from
            the widest shard).
        impl: ``"auto"`` or ``"torch"`` (the per-shard statistics run in torch).
        **options: :class:`vcrd.core.loss_options.CommonOptions` (``reduction`` as in
            :func:`vcrd.fused_linear_vcrd_loss`).

    Returns:
        The loss (fp32), identical on every rank; its ``backward()`` gives each rank ``grad_hidden`` (the
        full gradient, summed over ranks), and the gradient of its own weight/bias rows. Every rank must
        run the backward with the same upstream gradient (``loss.backward()`` on every rank).

    Raises:
        ValueError on every rank (never a hang) for a layout that does not tile ``[0, V)``, ranks that
        disagree on V, the config, the rows, the labels or the chunking, or bad input on any rank.
    """
    check_keywords(CALLER, options, CommonOptions)  # as Python would: before any work
    rank, world = group_info(group)
    opts = layout = None
    try:  # collected, then raised on every rank alike after the metadata exchange
        if impl not in ("auto", "torch"):
            raise ValueError(f"impl: expected 'auto' or 'torch' for the vocab-parallel loss, got {impl!r}")
        opts = resolve_options(CALLER, options, ("torch",), CommonOptions, impl="torch", vocab_size=vocab_size)
        check_fused_options(opts.reduction, chunk_size)
        error = _local_error(student_hidden, student_weight_shard, teacher_hidden, teacher_weight_shard,
                             student_bias_shard, teacher_bias_shard, vocab_start, vocab_size)
        if error is None:
            layout = opts.layout(labels, student_hidden.shape[:-1], student_hidden.device, vocab_size)
    except Exception as e:  # any failure is shared (agreement.py): a lone raise would hang the other ranks
        error = describe(e)
    meta = local_meta(lambda: dict(  # never raises
        error=None, v0=vocab_start, v1=min(vocab_start + student_weight_shard.shape[0], vocab_size), V=vocab_size,
        config=config_fields(opts.config), rows=(tuple(student_hidden.shape), tuple(teacher_hidden.shape)),
        chunks=chunk_size, labels=rows_checksum(labels, opts.step_ids, opts.cu_seqlens),
        options=(opts.reduction, None if opts.num_items_in_batch is None else float(opts.num_items_in_batch)),
        dtype=str((student_weight_shard.dtype, student_hidden.dtype)),
        grad=torch.is_grad_enabled() and student_hidden.requires_grad), error)  # the backward all_reduce: all or none
    metas = agree_on_layout(meta, world, group, vocab_size, CALLER)
    v0, v1 = meta["v0"], meta["v1"]

    kept = int(layout.valid.sum())
    widest = max(m["v1"] - m["v0"] for m in metas)  # the same chunks on every rank
    C = auto_chunk_size(kept, widest, settings.fused_budget_bytes()) if chunk_size == "auto" else chunk_size
    width, dtype = v1 - v0, torch.promote_types(student_weight_shard.dtype, torch.float32)
    h_t = teacher_hidden.reshape(-1, teacher_hidden.shape[-1])
    w_t = teacher_weight_shard[:width].to(dtype)  # once per call; padding rows never enter a GEMM
    b_t = None if teacher_bias_shard is None else teacher_bias_shard[:width].to(dtype)

    def chunk_batch(idx: torch.Tensor, x: torch.Tensor, rows: RowLayout) -> RowBatch:
        ht = h_t[idx].to(dtype)
        return RowBatch(x, ht @ w_t.T if b_t is None else torch.addmm(b_t, ht, w_t.T), rows)

    def backend(impl: str, chunk: RowBatch, cfg: VCRDConfig, grad_out: Optional[torch.Tensor], grad_scale: float,
                window: CausalWindowMean):
        pair = ShardPair(cfg, v0, rank, world, group, max(1, chunk.s.shape[0]), dtype)
        return run_chunks(pair, chunk, cfg, grad_out, grad_scale, window, dtype=dtype)

    return loss_from_hidden(SumGradOverRanks.apply(student_hidden, group), student_weight_shard, student_bias_shard,
                            chunk_batch, width, layout, opts, C, backend=backend)


class SumGradOverRanks(torch.autograd.Function):
    """``h`` unchanged forward; backward: the sum over ``group`` of the ranks' gradients (each rank's
    loss sees only its vocabulary shard's share of ``∂loss/∂h``)."""

    @staticmethod
    def forward(ctx, h: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        return h.view_as(h)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _all_reduce(grad.contiguous().clone(), ctx.group), None


__all__ = ["fused_linear_vocab_parallel_vcrd_loss"]
