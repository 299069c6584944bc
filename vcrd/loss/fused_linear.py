"""Fused-linear VCRD loss: hidden states and LM heads in, loss and gradients out, full logits never stored.

Token chunks are walked in order. Per chunk: both models' logits ``h @ W^T + b`` (:func:`gemm_plan`,
``VCRDConfig.gemm_precision``: exact fp32 GEMMs from heads converted once per call, or GEMMs in the
heads' own bf16/fp16 — with fp32 output on CUDA, with output in the heads' dtype on CPU, as the
model's own ``F.linear`` gives), the per-row statistics, the weights (the causal window's prefix sums
carry across chunks, so a chunk's weights are final once its rows are in: SPEC §5), the gradient
w.r.t. the chunk's student logits (written over them: two ``[C, V]`` buffers per chunk), then
``grad_hidden[chunk] = g @ W_s`` and ``grad_W_s += g^T @ h_s`` (and ``grad_b_s += Σ g``), accumulated
in fp32. Statistics and the logit gradient are fp32 whatever the GEMMs. Rows with ``ignore_index``
are dropped before the GEMMs. The backward only scales the stored gradients by the upstream gradient.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Tuple, Union

import torch
from torch import nn
from typing_extensions import Unpack

from ..backends import IMPLS, Backend, resolve_impl, run_backend
from ..backends.autograd import attach_grads
from ..core import settings
from ..core.checks import (
    RowBatch,
    RowLayout,
    check_fused_options,
    check_linear,
)
from ..core.config import VCRDConfig, resolve_config
from ..core.loss_options import LossOptions, ReferenceOptions, ResolvedOptions, resolve_options
from ..core.reduction import reduce_rows, row_normalizer
from ..core.stats import VCRDStats
from ..core.weights import OUTPUT_ROWS, concat_rows
from ..core.windows import CausalWindowMean


def auto_chunk_size(n_rows: int, vocab: int, budget_bytes: int, min_rows: int = 256, max_rows: int = 1024,
                    bytes_per_entry: int = 8) -> int:
    """Rows per chunk: the two ``[C, V]`` buffers of a chunk (both logits; the gradient overwrites the
    student's), ``bytes_per_entry`` per ``(row, token)`` together (8: fp32; 4: bf16/fp16 logits), fit
    ``budget_bytes``, but at least ``min_rows`` (GEMMs with fewer rows run markedly slower on CPU) and at
    most ``max_rows``; the rows are then split into equal chunks (a small last chunk would waste its
    GEMMs). Depends on N, never a fixed number of chunks."""
    largest = min(max_rows, max(min_rows, budget_bytes // (bytes_per_entry * vocab)))
    n_chunks = max(1, -(-n_rows // largest))
    return max(1, -(-n_rows // n_chunks))


@dataclass(frozen=True)
class GemmPlan:
    """How the chunk GEMMs run. ``operand_dtype``: the dtype of their operands (each head converted to it
    once per call: a no-op in the heads' own dtype). ``mixed``: bf16/fp16 operands with fp32 accumulation
    and fp32 output (``torch.mm(a, b, out_dtype)``, CUDA only); otherwise the GEMMs output
    ``operand_dtype`` (fp32/fp64 exact, or bf16/fp16 logits and gradient products as a bf16 model's own
    ``F.linear`` computes them). ``budget_bytes``, ``min_rows``, ``max_rows``: chunk sizing
    (:func:`auto_chunk_size`). ``grad_weight`` is accumulated in fp32 (fp64) either way."""

    operand_dtype: torch.dtype
    mixed: bool
    budget_bytes: int
    min_rows: int = 256
    max_rows: int = 1024

    @property
    def logits_dtype(self) -> torch.dtype:
        """The dtype of the logits (and of the logit gradient fed to the backward GEMMs)."""
        return torch.float32 if self.mixed else self.operand_dtype


def gemm_plan(device_type: str, weight_dtype: torch.dtype, cpu_budget_bytes: int,
              device_memory_bytes: Optional[int] = None, precision: str = "auto") -> GemmPlan:
    """The plan for LM heads of ``weight_dtype`` on ``device_type`` (``precision``: ``VCRDConfig.gemm_precision``).

    GEMMs in the head's dtype (``"head"``, and ``"auto"`` for bf16 heads anywhere and fp16 heads on CUDA;
    fp16 GEMMs on this CPU are ~4× slower than bf16 ones): on CUDA mixed GEMMs with chunks sized for the
    device (1/16 of its memory, 256–4096 rows), elsewhere bf16/fp16 GEMMs with bf16/fp16 output. Otherwise
    (``"exact"``, fp32/fp64 heads) exact GEMMs in fp32 (fp64). CPU chunks: ``cpu_budget_bytes``, 256–1024
    rows. NOT RUN ON A GPU HERE: only the CUDA plan is tested."""
    low = weight_dtype in (torch.bfloat16, torch.float16)
    auto = weight_dtype == torch.bfloat16 or device_type == "cuda"
    if low and (precision == "head" or (precision == "auto" and auto)):
        if device_type == "cuda":
            return GemmPlan(weight_dtype, True, (device_memory_bytes or 16 * 2**30) // 16, 256, 4096)
        return GemmPlan(weight_dtype, False, cpu_budget_bytes)
    return GemmPlan(torch.promote_types(weight_dtype, torch.float32), False, cpu_budget_bytes)


def plan_for(weight: torch.Tensor, precision: str = "auto") -> GemmPlan:
    """:func:`gemm_plan` for this head's device and dtype (``VCRD_FUSED_BUDGET_MB`` on CPU)."""
    memory = torch.cuda.get_device_properties(weight.device).total_memory if weight.is_cuda else None
    return gemm_plan(weight.device.type, weight.dtype, settings.fused_budget_bytes(), memory, precision)


def _logits(h: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor], mixed: bool = False) -> torch.Tensor:
    """``h @ w^T + b``; ``mixed``: bf16/fp16 operands, fp32 output (CUDA only); else in ``h``'s dtype."""
    if mixed:
        out = torch.mm(h, w.T, out_dtype=torch.float32)
        return out if b is None else out + b
    return torch.nn.functional.linear(h, w, b)


def _accumulate(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, plan: GemmPlan) -> None:
    """``out += a @ b`` into fp32 (fp64) ``out`` from operands in ``plan.operand_dtype``."""
    if plan.mixed:
        torch.addmm(out, a, b, out_dtype=torch.float32, out=out)
    elif a.dtype == out.dtype:
        out.addmm_(a, b)
    else:  # CPU bf16/fp16: no GEMM outputs fp32, so the product in the operands' dtype, added in fp32
        out += a @ b


def fused_linear_vcrd_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    labels: Optional[torch.Tensor] = None,
    *,
    student_bias: Optional[torch.Tensor] = None,
    teacher_bias: Optional[torch.Tensor] = None,
    chunk_size: Union[int, str] = "auto",
    **options: Unpack[LossOptions],
) -> Union[torch.Tensor, Tuple[torch.Tensor, VCRDStats]]:
    """The VCRD loss of ``logits = hidden @ weight^T + bias`` for both models, without storing logits.

    Args:
        student_hidden: ``[N, H_s]`` or ``[B, T, H_s]`` final hidden states (row r predicts ``labels[r]``).
        student_weight: ``[V_s, H_s]`` LM head (``student_bias`` ``[V_s]`` optional).
        teacher_hidden, teacher_weight, teacher_bias: the teacher's, ``H_t`` may differ; never require grad.
        labels: as in :func:`vcrd.vcrd_loss`.
        chunk_size: rows per chunk, or ``"auto"`` (from ``VCRD_FUSED_BUDGET_MB`` and N).
        **options: :class:`vcrd.core.loss_options.LossOptions`, but ``reduction`` is ``"mean"``, ``"sum"`` or
            ``"batchmean"`` (per-row losses would need per-row upstream gradients before the weight-gradient
            GEMM, which the forward pass has already done), and ``impl="reference"`` materialises both
            logits and runs :mod:`vcrd.core.reference` (tests, small inputs).

    Returns:
        The loss (fp32), and ``VCRDStats`` if asked. Gradients flow to the student's hidden states,
        weight and bias (accumulated in fp32, returned in their own dtypes).
    """
    opts = resolve_options("fused_linear_vcrd_loss", options, IMPLS)
    check_fused_options(opts.reduction, chunk_size)
    V = check_linear(student_hidden, student_weight, teacher_hidden, teacher_weight, student_bias, teacher_bias,
                     opts.vocab_size)
    layout = opts.layout(labels, student_hidden.shape[:-1], student_hidden.device, V)
    if opts.impl == "reference":
        return _reference(student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias,
                          labels, **opts.keywords(ReferenceOptions))

    plan = plan_for(teacher_weight, opts.config.gemm_precision)
    # once per call (exact plan: the GEMMs accumulate and output fp32); in the head's dtype: the head as it is
    w_t = teacher_weight[:V].to(plan.operand_dtype)
    b_t = None if teacher_bias is None else teacher_bias[:V].to(plan.logits_dtype)
    h_t = teacher_hidden.reshape(-1, teacher_hidden.shape[-1])
    def chunk_batch(idx: torch.Tensor, s: torch.Tensor, rows: RowLayout) -> RowBatch:
        return RowBatch(s, _logits(h_t[idx].to(plan.operand_dtype), w_t, b_t, plan.mixed), rows)

    return loss_from_hidden(student_hidden, student_weight, student_bias, chunk_batch, V, layout, opts, chunk_size)


ChunkBatch = Callable[[torch.Tensor, torch.Tensor, RowLayout], RowBatch]


def loss_from_hidden(student_hidden: torch.Tensor, student_weight: torch.Tensor, student_bias: Optional[torch.Tensor],
                     chunk_batch: ChunkBatch, V: int, layout: RowLayout, opts: ResolvedOptions, chunk_size,
                     backend: Backend = run_backend, teacher: str = "dense"):
    """The fused-linear loss of checked inputs: ``chunk_batch(idx, s, rows)`` pairs the student's logits
    ``s [C, V]`` of flat rows ``idx`` (layout ``rows``) with the teacher's rows — logits from a GEMM, or
    a sparse teacher's top-K (``teacher="sparse"``, shared with :mod:`vcrd.loss.sparse`). ``backend``
    runs each chunk (:func:`vcrd.backends.run_backend`, or the vocab-parallel loss's shard pair)."""
    cfg, reduction, num_items_in_batch = opts.config, opts.reduction, opts.num_items_in_batch
    h_s = student_hidden.reshape(-1, student_hidden.shape[-1])
    impl = resolve_impl(opts.impl, h_s, teacher)
    student = (student_hidden, student_weight, student_bias)
    needs_grad = tuple(x is not None and x.requires_grad and torch.is_grad_enabled() for x in student)
    Z = row_normalizer(reduction, cfg, num_items_in_batch, layout)
    kept_idx = layout.valid.nonzero().squeeze(1)  # ignored rows never reach a GEMM
    plan = plan_for(student_weight, cfg.gemm_precision)
    C = auto_chunk_size(kept_idx.numel(), V, plan.budget_bytes, plan.min_rows, plan.max_rows,
                        2 * plan.logits_dtype.itemsize) if chunk_size == "auto" else chunk_size
    # the loss's own precision, whatever autocast the caller runs under (its GEMMs accumulate in fp32)
    with torch.no_grad(), torch.autocast(h_s.device.type, enabled=False):
        kept, grads = _chunked(h_s, student_weight, student_bias, chunk_batch, V, layout, kept_idx, cfg, impl, C,
                               1.0 / Z, needs_grad, plan, backend)
        value, post_scale = reduce_rows(kept["per_row"], kept["w"], reduction, cfg, Z, torch.Size([]), layout.n_valid,
                                        num_items_in_batch)
    pairs = [(x, g.reshape(x.shape).to(x.dtype)) for x, g in zip(student, grads) if g is not None]
    loss = attach_grads(value, pairs, post_scale) if pairs else value
    if not opts.return_stats:
        return loss
    full = {name: torch.zeros(h_s.shape[0], dtype=kept[name].dtype, device=h_s.device).index_copy(0, kept_idx,
                                                                                                   kept[name])
            for name in OUTPUT_ROWS[2:]}
    return loss, VCRDStats.from_rows(full, layout)


def _chunked(h_s, weight, bias, chunk_batch, V, layout, kept_idx, cfg, impl, C, grad_scale, needs_grad, plan, backend):
    """Walk the kept rows in chunks of ``C``: both logits, the backend's rows and the logit gradient
    (written over the student logits, in ``plan.logits_dtype``), then ``grad_hidden[chunk] = g @ W_s``,
    ``grad_W_s += g^T h_s``, ``grad_b_s += Σ g`` (fp32 accumulation; operands as :class:`GemmPlan` says). Returns the
    kept rows (``[n_kept]``) and ``[grad_hidden, grad_weight, grad_bias]`` (None where ``needs_grad`` says no)."""
    dtype, dev = torch.promote_types(weight.dtype, torch.float32), h_s.device
    op = plan.operand_dtype
    w_s = weight[:V].to(op)  # exact plan: once per call (a bf16 head: fp32 GEMMs, never rounded); else no copy
    b_s = None if bias is None else bias[:V].to(plan.logits_dtype)
    shapes = (h_s.shape, weight.shape, weight.shape[:1])
    grad_h, grad_w, grad_b = (torch.zeros(shape, dtype=dtype, device=dev) if need else None
                              for shape, need in zip(shapes, needs_grad))
    # the window over kept rows only: a kept row's window holds the kept rows from its start on
    window = CausalWindowMean(torch.searchsorted(kept_idx, layout.starts[kept_idx]), 2)
    parts = []
    for c0 in range(0, kept_idx.numel(), C):
        idx = kept_idx[c0:c0 + C]
        hs = h_s[idx].to(op)
        rows = RowLayout(layout.labels[idx], torch.ones(idx.numel(), dtype=torch.bool, device=dev),
                         layout.starts[idx], idx.shape, idx.numel())
        chunk = chunk_batch(idx, _logits(hs, w_s, b_s, plan.mixed), rows)
        g = chunk.s if any(needs_grad) else None  # the gradient overwrites the student logits, row by row
        parts.append(backend(impl, chunk, cfg, g, grad_scale, window=window))
        g_op = None if g is None else g.to(op)  # mixed (CUDA): the fp32 gradient rounded once; else no copy
        if grad_h is not None:
            grad_h[idx] = torch.mm(g_op, w_s, out_dtype=dtype) if plan.mixed else (g_op @ w_s).to(dtype)
        if grad_w is not None:
            _accumulate(grad_w[:V], g_op.T, hs, plan)
        if grad_b is not None:
            grad_b[:V] += g.sum(0, dtype=dtype)
    return concat_rows(parts, dtype, dev), [grad_h, grad_w, grad_b]


def _reference(h_s, w_s, b_s, h_t, w_t, b_t, labels, **kw):
    """``impl="reference"``: both logits in float64, then :func:`vcrd.core.reference.vcrd_loss` (tests, small
    inputs)."""
    from ..core.reference import vcrd_loss as reference_loss

    s = _logits(h_s.double(), w_s.double(), None if b_s is None else b_s.double())
    with torch.no_grad():
        u = _logits(h_t.double(), w_t.double(), None if b_t is None else b_t.double())
    loss = reference_loss(s, u, labels, **kw)
    # the same output dtype as the fast path: fp32, or fp64 for fp64 inputs
    dtype = torch.promote_types(h_s.dtype, torch.float32)
    return (loss[0].to(dtype), loss[1]) if isinstance(loss, tuple) else loss.to(dtype)


class FusedLinearVCRDLoss(nn.Module):
    """Module form of :func:`fused_linear_vcrd_loss`; config fields may be given as keywords
    (``FusedLinearVCRDLoss("kd", temperature=2.0)``).

    ``forward(student_hidden, student_weight, teacher_hidden, teacher_weight, labels, student_bias=None,
    teacher_bias=None, step_ids=None, cu_seqlens=None, num_items_in_batch=None, vocab_size=None,
    return_stats=False)``.
    """

    def __init__(self, config: Union[VCRDConfig, str, None] = None, *, reduction: str = "mean",
                 chunk_size: Union[int, str] = "auto", impl: str = "auto", **options) -> None:
        super().__init__()
        self.config = resolve_config(config, **options)
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
