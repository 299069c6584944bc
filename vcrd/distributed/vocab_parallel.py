"""Vocab-parallel VCRD loss (SPEC §11): logits whose vocabulary is sharded over a process group.

Rank ``r`` of ``group`` holds columns ``[v0, v0 + width)`` of both models' logits (``vocab_start=v0``;
columns at or beyond the full vocabulary ``V`` are padding and ignored). Per chunk of rows, in row
order:

1. each shard reduces its own columns to a handful of numbers per row, taken against its *local*
   maxima: ``max``, ``Σ e``, the lowest local argmax (as a global index) and the teacher's logit
   there, the label's logits (owner shard only), and the partial sums behind ``H_u``, ``CE_su`` and
   ``D`` (:data:`FIELDS`);
2. ONE ``all_reduce`` exchanges them: every rank writes its ``[C, K]`` partials into its own slot of
   a zeroed ``[world, C, K]`` buffer and the sum is the stack of all partials. Every rank then
   combines the slots in the same fixed order (global max; sums rescaled by ``exp((m_v - M)/T)``;
   argmax as (value, lowest index); ``lp``/``lq`` from the shard that owns the index), so the
   combined statistics are bitwise identical on every rank (``-inf``/NaN partials never meet
   another rank's numbers in the reduction itself);
3. :func:`vcrd.core.weights.weigh_rows` turns the global statistics into the weights and gradient
   coefficients (replicated: the same on every rank);
4. each shard writes the gradient of its own columns (the divergence's CPU gradient,
   :mod:`vcrd.backends.divergences`, fed the global LSEs).

Steps 1, 2 and 4 are this backend's chunk pair (:class:`ShardPair`); the chunk loop
(:func:`vcrd.backends.chunk_loop.run_chunks`) runs step 3 between them, as for every backend.

JSD (any divergence given by element-wise terms, :class:`vcrd.backends.divergences.PointwiseDivergence`)
needs both global LSEs first: a second all-reduce per chunk sums the shards' sums of its terms.
Before any sweep, one ``all_gather_object`` of each rank's
metadata (its columns, ``V``, the row count, the config, chunking, a checksum of labels/step ids,
any local input error) lets every rank refuse a bad layout with the same ``ValueError``: no rank
is left waiting in a collective.
"""

from __future__ import annotations

import hashlib
import math
from typing import Optional, Tuple

import torch
import torch.distributed as dist
from typing_extensions import Unpack

from ..backends.autograd import attach_grads
from ..backends.chunk_loop import Chunk, run_chunks
from ..backends.divergences import DIVERGENCES, Divergence, weighted, write_gradient
from ..core import settings
from ..core.checks import FLOAT_DTYPES, RowBatch
from ..core.config import VCRDConfig
from ..core.loss_options import CommonOptions, check_keywords, resolve_options
from ..core.reduction import reduce_rows, row_normalizer
from ..core.stats import VCRDStats
from ..core.weights import Rows
from .agreement import agree_on_layout, config_fields, describe, local_meta

# per-row partials each shard contributes (one slot per rank in the exchanged buffer)
FIELDS = ("mx", "mz", "sum_s", "sum_u", "a_s", "a_u", "z_as", "x_y", "z_y", "own", "A_uz", "A_sz", "B", "sum_raw")
_F = {name: i for i, name in enumerate(FIELDS)}


def group_info(group) -> Tuple[int, int]:
    if not (dist.is_available() and dist.is_initialized()):
        if group is not None:
            raise ValueError("group: torch.distributed is not initialized, but a process group was given")
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def _all_reduce(t: torch.Tensor, group) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(t, group=group)  # looked up at call time (tests count the calls)
    return t


def _exchange(local: torch.Tensor, rank: int, world: int, group) -> torch.Tensor:
    """``[world, C, K]``: every rank's ``[C, K]`` partials, with ONE all-reduce (slots of zeros)."""
    if world == 1:
        return local[None]
    buf = torch.zeros((world, *local.shape), dtype=local.dtype, device=local.device)
    buf[rank] = local
    return _all_reduce(buf, group)


def rows_checksum(*tensors: Optional[torch.Tensor]) -> str:
    h = hashlib.sha1()
    for t in tensors:
        if t is None:
            h.update(b"none")
        else:
            h.update(str((tuple(t.shape), str(t.dtype))).encode())
            h.update(t.detach().to("cpu", torch.int64).contiguous().numpy().tobytes())
    return h.hexdigest()


def _local_error(student, teacher, vocab_start, vocab_size) -> Optional[str]:
    """What is wrong with this rank's own inputs (reported on every rank after the metadata exchange)."""
    for name, t in (("student_logits_shard", student), ("teacher_logits_shard", teacher)):
        if not isinstance(t, torch.Tensor):
            return f"{name}: expected a torch.Tensor, got {type(t).__name__}"
        if t.dtype not in FLOAT_DTYPES:
            return f"{name}: expected a float32, bfloat16, float16 or float64 tensor, got {t.dtype}"
        if t.dim() not in (2, 3):
            return f"{name}: expected shape [N, V_shard] or [B, T, V_shard], got {tuple(t.shape)}"
    if teacher.shape != student.shape:
        return (f"teacher_logits_shard: expected shape {tuple(student.shape)} like student_logits_shard (both models' "
                f"columns [vocab_start, vocab_start + width)), got {tuple(teacher.shape)}")
    if teacher.device != student.device:
        return f"teacher_logits_shard: expected device {student.device} like student_logits_shard, got {teacher.device}"
    if teacher.requires_grad:
        return "teacher_logits_shard: the teacher must not require grad (compute it under torch.no_grad())"
    for name, v in (("vocab_start", vocab_start), ("vocab_size", vocab_size)):
        if isinstance(v, bool) or not isinstance(v, int):
            return f"{name}: expected an int, got {type(v).__name__}"
    if vocab_size < 1 or vocab_start < 0 or vocab_start >= vocab_size:
        return f"vocab_start: expected 0 <= vocab_start < vocab_size={vocab_size}, got {vocab_start}"
    if student.shape[-1] < 1:
        return "student_logits_shard: the shard holds no column"
    return None


def _partials(x: torch.Tensor, z: torch.Tensor, y: torch.Tensor, v0: int, T: float, divergence: Divergence,
              untempered: bool) -> torch.Tensor:
    """``[C, K]`` partial statistics of this shard's columns ``x, z [C, Vl]`` (fp32/fp64)."""
    C, Vl = x.shape
    mx, mz = x.amax(-1), z.amax(-1)
    index = torch.arange(Vl, device=x.device, dtype=x.dtype)
    ia_s = torch.where(x == mx[:, None], index, Vl).amin(-1).clamp_max(Vl - 1).long()
    ia_u = torch.where(z == mz[:, None], index, Vl).amin(-1).clamp_max(Vl - 1).long()
    # shift by the local max; a shard whose row is all -inf shifts by 0 (its sums are then 0)
    sh_s, sh_u = torch.where(mx == -torch.inf, 0.0, mx), torch.where(mz == -torch.inf, 0.0, mz)
    xs, zs = (x - sh_s[:, None]) / T, (z - sh_u[:, None]) / T
    es, eu = xs.exp(), zs.exp()
    yl = y - v0
    own = (yl >= 0) & (yl < Vl)
    yl = yl.clamp(0, Vl - 1)[:, None]
    zero = torch.zeros((), dtype=x.dtype, device=x.device)
    B = divergence.shard_partial(xs, zs, es, eu)
    sum_raw = (x - sh_s[:, None]).exp().sum(-1) if untempered else torch.zeros_like(mx)
    cols = dict(mx=mx, mz=mz, sum_s=es.sum(-1), sum_u=eu.sum(-1), a_s=(ia_s + v0).to(x.dtype),
                a_u=(ia_u + v0).to(x.dtype), z_as=z.gather(1, ia_s[:, None]).squeeze(1),
                x_y=torch.where(own, x.gather(1, yl).squeeze(1), zero),
                z_y=torch.where(own, z.gather(1, yl).squeeze(1), zero), own=own.to(x.dtype),
                A_uz=weighted(eu, zs).sum(-1), A_sz=weighted(es, zs).sum(-1),
                B=torch.zeros_like(mx) if B is None else B, sum_raw=sum_raw)
    return torch.stack([cols[k] for k in FIELDS], -1)


def _combine(P: torch.Tensor, T: float, divergence: Divergence, untempered: bool) -> Rows:
    """Global SPEC §2 statistics ``[C]`` from every shard's partials ``P [world, C, K]``."""
    f = lambda name: P[..., _F[name]]  # noqa: E731  [world, C]
    mx, mz = f("mx"), f("mz")
    MX, MZ = mx.amax(0), mz.amax(0)
    cs = torch.where(mx == -torch.inf, 0.0, ((mx - MX) / T).exp())
    cu = torch.where(mz == -torch.inf, 0.0, ((mz - MZ) / T).exp())
    ds = (torch.where(mx == -torch.inf, 0.0, mx) - MX) / T  # shard shift relative to the global max
    du = (torch.where(mz == -torch.inf, 0.0, mz) - MZ) / T
    ds, du = torch.where(cs > 0, ds, 0.0), torch.where(cu > 0, du, 0.0)
    sum_s, sum_u = (cs * f("sum_s")).sum(0), (cu * f("sum_u")).sum(0)
    LS, LU = sum_s.log(), sum_u.log()
    # argmax: (value, lowest index) over the shards holding the global max
    V_big = torch.full_like(MX, torch.inf)
    cand = torch.where(mx == MX, f("a_s"), V_big)
    win = cand.argmin(0, keepdim=True)  # indices are distinct across shards
    a_s = cand.gather(0, win).squeeze(0)
    z_as = f("z_as").gather(0, win).squeeze(0)
    a_u = torch.where(mz == MZ, f("a_u"), V_big).amin(0)
    a_s, a_u = torch.nan_to_num(a_s, posinf=-1.0), torch.nan_to_num(a_u, posinf=-1.0)  # NaN rows: none
    x_y, z_y = f("x_y").sum(0), f("z_y").sum(0)  # zeros except the owner's slot
    rows = dict(
        lse_s=MX / T + LS, lse_u=MZ / T + LU,
        lp_s=(x_y - MX) / T - LS, lp_u=(z_y - MZ) / T - LU,
        lq_as=(z_as - MZ) / T - LU, lq_au=(MZ - MZ) / T - LU, agree=a_s == a_u,
        H_u=LU - (cu * (f("A_uz") + f("sum_u") * du)).sum(0) / sum_u,
        CE_su=LU - (cs * (f("A_sz") + f("sum_s") * du)).sum(0) / sum_s,
        # the CE term: (max s - s[y]) + log Σ exp(s - max s) (untempered: equal to LS at T = 1)
        max_s=MX, s_y=x_y, log_sum_untempered=LS,
    )
    if divergence.one_shard_sweep:
        rows.update(divergence.shard_rows(f("B"), dict(cs=cs, cu=cu, ds=ds, du=du, part_sum_s=f("sum_s"),
                                                       part_sum_u=f("sum_u"), sum_s=sum_s, sum_u=sum_u, LS=LS, LU=LU)))
    if untempered:
        c1 = torch.where(mx == -torch.inf, 0.0, (mx - MX).exp())
        rows["log_sum_untempered"] = (c1 * f("sum_raw")).sum(0).log()
    return rows


class ShardPair:
    """The chunk pair of a vocab-parallel loss: this shard's columns ``[v0, v0 + Vl)`` of both logits → the
    global statistics (the same on every rank) with ONE all-reduce (two for a divergence given by
    element-wise terms), and the gradient of this shard's columns."""

    def __init__(self, cfg: VCRDConfig, v0: int, rank: int, world: int, group, chunk_rows: int,
                 dtype: torch.dtype) -> None:
        self.cfg, self.v0, self.rank, self.world, self.group = cfg, v0, rank, world, group
        self.chunk_rows, self.dtype = chunk_rows, dtype
        self.divergence = DIVERGENCES[cfg.effective_divergence]
        self.with_ce = cfg.ce_weight > 0
        self.untempered = self.with_ce and cfg.temperature != 1.0

    def _logits(self, chunk: Chunk) -> Tuple[torch.Tensor, torch.Tensor]:
        return chunk.s.to(self.dtype), chunk.u.to(self.dtype)

    def stats(self, chunk: Chunk) -> Rows:
        x, z = self._logits(chunk)
        T, div = self.cfg.temperature, self.divergence
        local = _partials(x, z, chunk.labels, self.v0, T, div, self.untempered)
        rows = _combine(_exchange(local, self.rank, self.world, self.group), T, div, self.untempered)
        if not div.one_shard_sweep:  # its terms need both global LSEs first: a second exchange
            local = div.shard_terms(x, z, rows["lse_s"], rows["lse_u"], T, self.cfg.beta)
            sums = _exchange(local, self.rank, self.world, self.group).sum(0)
            rows.update(div.finish(sums.unbind(-1), self.cfg.beta))
        return rows

    def grad(self, chunk: Chunk, rows: Rows, out: Optional[torch.Tensor]) -> None:
        """``out`` may be the chunk's logits themselves: every read of them comes before the write."""
        if out is None:
            return
        x, z = self._logits(chunk)
        T, y, valid = self.cfg.temperature, chunk.labels, chunk.valid
        soft = None
        if self.with_ce:  # coef_ce·(softmax(s) - onehot(y)) on this shard's columns (y may be another shard's)
            Vl = x.shape[1]
            lse_untempered = rows["max_s"] + rows["log_sum_untempered"]
            soft = rows["coef_ce"][:, None] * (x - lse_untempered[:, None]).exp()
            yl = y - self.v0
            own = valid & (yl >= 0) & (yl < Vl)
            soft = soft.scatter_add(1, yl.clamp(0, Vl - 1)[:, None], torch.where(own, -rows["coef_ce"], 0.0)[:, None])
        grad_D = self.divergence.dense_grad(x, z, rows["lse_s"], rows["lse_u"], rows[self.divergence.grad_row], T,
                                            self.cfg.beta)
        write_gradient(out, x, y, valid, grad_D, None, rows["coef_kd"], rows["coef_ce"], T, False)
        if soft is not None:
            out.add_(torch.where(valid[:, None], soft, 0.0).to(out.dtype))


CALLER = "vocab_parallel_vcrd_loss"


def vocab_parallel_vcrd_loss(
    student_logits_shard: torch.Tensor,
    teacher_logits_shard: torch.Tensor,
    labels: Optional[torch.Tensor],
    *,
    vocab_start: int,
    vocab_size: int,
    group=None,
    chunk_rows: Optional[int] = None,
    **options: Unpack[CommonOptions],
):
    """The VCRD loss (SPEC §2–6) of logits sharded over the vocabulary of ``group`` (SPEC §11).

    Args:
        student_logits_shard: ``[N, W]`` or ``[B, T, W]``: columns ``[vocab_start, vocab_start + W)`` of the
            student's logits (columns ``>= vocab_size`` are padding, ignored); may require grad.
        teacher_logits_shard: the same columns of the teacher's logits, same shape; no grad.
        labels: ``[N]`` / ``[B, T]`` global token ids (the same on every rank), ``ignore_index`` for no loss.
        vocab_start: this rank's first column. ``vocab_size``: the full vocabulary V. The ranks'
            ``[vocab_start, min(vocab_start + W, V))`` must tile ``[0, V)`` (any order of ranks).
        group: the vocab-parallel process group (default: the world; an uninitialised
            ``torch.distributed`` means one process holding every column).
        chunk_rows: rows per exchange (default ``VCRD_CHUNK_ROWS``); must be equal on every rank.
        **options: :class:`vcrd.core.loss_options.CommonOptions` (``reduction``: ``"mean"``, ``"sum"`` or
            ``"none"``).

    Returns:
        The loss, identical on every rank; its ``backward()`` gives each rank the gradient of its own
        student columns (the padding columns get 0). Collectives: one ``all_gather_object`` of
        metadata, then one ``all_reduce`` per chunk of rows (two for ``divergence="jsd"``).

    Raises:
        ValueError on every rank (never a hang) when the shards do not tile ``[0, V)``, or the ranks
        disagree on ``V``, the config, the rows, the labels or the chunking, or any rank's inputs are bad.
    """
    check_keywords(CALLER, options, CommonOptions)  # as Python would: before any work
    rank, world = group_info(group)
    # every check of this rank's arguments is collected, not raised, until all ranks have exchanged
    # their metadata: a rank that raised alone would leave the others waiting in a collective
    opts = chunk = layout = None
    try:
        opts = resolve_options(CALLER, options, ("torch",), CommonOptions, impl="torch", vocab_size=vocab_size)
        if opts.reduction not in ("mean", "sum", "none"):
            raise ValueError(f"reduction: expected 'mean', 'sum' or 'none', got {opts.reduction!r}")
        chunk = settings.chunk_rows() if chunk_rows is None else chunk_rows
        if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
            raise ValueError(f"chunk_rows: expected an int >= 1, got {chunk_rows!r}")
        error = _local_error(student_logits_shard, teacher_logits_shard, vocab_start, vocab_size)
        if error is None:  # labels, step ids, cu_seqlens checked on each rank; a failure is reported to all ranks
            layout = opts.layout(labels, student_logits_shard.shape[:-1], student_logits_shard.device, vocab_size)
    except Exception as e:  # any failure is shared (agreement.py): a lone raise would hang the other ranks
        error = describe(e)

    def build() -> dict:
        lead = tuple(student_logits_shard.shape[:-1])
        # chunks depend on the shape only (never on memory layout), so every rank walks the same rows:
        # [N, W] in chunks of `chunk` rows, [B, T, W] per sequence (a chunk never crosses one)
        n_chunks = math.ceil(lead[0] / chunk) if len(lead) == 1 else lead[0] * math.ceil(lead[1] / chunk)
        return dict(error=None, v0=vocab_start, v1=min(vocab_start + student_logits_shard.shape[-1], vocab_size),
                    V=vocab_size, config=config_fields(opts.config), rows=lead, chunks=(chunk, n_chunks),
                    labels=rows_checksum(labels, opts.step_ids, opts.cu_seqlens),
                    options=(opts.reduction,
                             None if opts.num_items_in_batch is None else float(opts.num_items_in_batch)),
                    dtype=str(student_logits_shard.dtype))

    meta = local_meta(build, error)  # never raises
    agree_on_layout(meta, world, group, vocab_size, CALLER)
    v0, v1 = meta["v0"], meta["v1"]

    s_full = student_logits_shard
    Vl = v1 - v0
    batch = RowBatch(s_full[..., :Vl], teacher_logits_shard[..., :Vl], layout)
    want_grad = torch.is_grad_enabled() and s_full.requires_grad
    cfg, reduction, num_items_in_batch = opts.config, opts.reduction, opts.num_items_in_batch
    Z = row_normalizer(reduction, cfg, num_items_in_batch, layout)
    grad = grad_rows = None
    if want_grad:
        grad = torch.zeros_like(s_full, memory_format=torch.contiguous_format)
        grad_rows = grad.view(-1, grad.shape[-1])[:, :Vl]
    dtype = torch.promote_types(s_full.dtype, torch.float32)
    pair = ShardPair(cfg, v0, rank, world, group, chunk, dtype)
    with torch.no_grad():
        rows = run_chunks(pair, batch, cfg, grad_rows, 1.0 / Z, dtype=dtype)
        value, post_scale = reduce_rows(rows["per_row"], rows["w"], reduction, cfg, Z, layout.shape, layout.n_valid,
                                        num_items_in_batch)
    loss = attach_grads(value, [(s_full, grad)], post_scale) if want_grad else value
    if opts.return_stats:
        return loss, VCRDStats.from_rows(rows, layout)
    return loss


__all__ = ["vocab_parallel_vcrd_loss", "agree_on_layout", "group_info", "rows_checksum", "ShardPair", "FIELDS"]
