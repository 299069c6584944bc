"""The CPU fast path for a dense teacher: the pair ``stats(chunk)`` / ``grad(chunk, rows, out)`` of
:func:`vcrd.backends.chunk_loop.run_chunks` on plain tensor code that ``torch.compile`` fuses
(``VCRD_COMPILE=1``, the default); the only ``[N, V]`` buffer is the gradient itself.

The statistics are two compiled functions: :func:`row_sweep` reads a chunk of both logits and
returns only ``[C]`` reductions over the vocabulary (row maxima, first argmaxes, sums against the
maxima, a closed-form divergence's sums), and :func:`finish_rows` turns them, with a few gathered
logits (and, for a divergence whose sums need both LSEs, jsd, a second sweep: :func:`divergence_sweep`),
into the rows (both LSEs, label log-probs, the teacher's judgement of the argmaxes,
``H_u``, ``CE_su``, ``D`` from the divergence, :mod:`vcrd.backends.divergences`). Kept apart,
inductor fuses a sweep's reductions under one loop over the rows (each row's maxima, then its sums,
while the row is still in cache); with any ``[C]`` arithmetic between or after them in the same
graph it emits one loop over all rows per reduction instead, and the chunk's logits come from memory
again for each (docs/architecture.md, "Passes over a chunk's logits"). The gradient sweep writes the
chunk's rows of ``∂L/∂s``.

Bounded compilation: each divergence has its own sweep, finishing and gradient function (its own
compiled code), temperature and beta enter as plain numbers (dynamic, never specialised), and the
remaining static choices (the CE term, the input dtype, a gradient written over the logits) give
at most a handful of graphs per function, so a sweep over options never exhausts dynamo's
recompile limit.
"""

from __future__ import annotations

import functools
import types
from typing import Callable, Optional, Tuple

import torch

from ..core.config import VCRDConfig
from ..core.overflow import overflow_scale
from ..core.weights import Rows, label_log_ratio
from .chunk_loop import Chunk
from .divergences import DIVERGENCES, Divergence, weighted, write_gradient

Sums = Tuple[Rows, Tuple[torch.Tensor, ...]]


def promoted(x: torch.Tensor) -> torch.Tensor:
    """``x`` in its statistics dtype: fp32, or fp64 for fp64 logits."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def shifted(x: torch.Tensor, row_max: torch.Tensor, temperature: float,
            scale: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(xc, xs)``: ``xc = (x·c - max·c)/T`` (overflow-scaled by ``c = scale``, finite, <= 0) and ``xs = xc/c``,
    i.e. ``(x - max)/T`` (``-inf`` only below fp32's range). The same element-wise formula in the sweep and
    at the gathered entries, so both give the same bits."""
    xc = (x * scale - row_max * scale) / temperature
    return xc, xc * (1.0 / scale)


def shifted_rows(x: torch.Tensor, z: torch.Tensor, max_s: torch.Tensor, max_u: torch.Tensor, temperature: float,
                 scale: float) -> Rows:
    """``xc, xs`` and ``zc, zs`` (:func:`shifted`) of the promoted logits ``x, z [C, V]`` against their row maxima
    ``[C, 1]``, and ``es, eu = exp(xs), exp(zs)``."""
    xc, xs = shifted(x, max_s, temperature, scale)
    zc, zs = shifted(z, max_u, temperature, scale)
    return dict(xc=xc, xs=xs, zc=zc, zs=zs, es=xs.exp(), eu=zs.exp())


def with_log_sums(t: Rows, sum_s: torch.Tensor, sum_u: torch.Tensor) -> Rows:
    """``t`` with the rows' ``sum_s, sum_u`` ``[C]`` and their logs (what :meth:`Divergence.dense_sums` reads)."""
    return dict(t, sum_s=sum_s, sum_u=sum_u, log_sum_s=sum_s.log(), log_sum_u=sum_u.log())


def row_sweep(divergence: Divergence, s: torch.Tensor, u: torch.Tensor, temperature: float, beta: float,
              untempered_lse: bool, scale: float) -> Sums:
    """The ``[C]`` reductions over the vocabulary of ``s, u [C, V]``, and nothing else (see the module docstring).

    ``max_s``, ``max_u``; ``first_max_s``, ``first_max_u`` (lowest index of the maximum, as a float: exact below
    2^24, vectorised at full width; ``V`` for a NaN row); with ``e = exp((x - max)/T)``: ``sum_s``, ``sum_u``,
    ``ent_u = Σ e_u zs``, ``cross_su = Σ e_s zc`` (overflow-scaled); ``sum_untempered = Σ exp(s - max_s)``
    (``sum_s`` unless ``untempered_lse``); and the divergence's sums (:meth:`Divergence.dense_sums`) when they
    need only the row maxima (``one_shard_sweep``), else ``()``: they need both LSEs, so :func:`divergence_sweep`
    takes them.
    """
    x, z = promoted(s), promoted(u)
    V = x.shape[-1]
    mx, mz = x.amax(-1, keepdim=True), z.amax(-1, keepdim=True)
    index = torch.arange(V, device=x.device, dtype=torch.float32)
    t = shifted_rows(x, z, mx, mz, temperature, scale)
    sum_s, sum_u = t["es"].sum(-1), t["eu"].sum(-1)
    sums = dict(
        max_s=mx.squeeze(-1), max_u=mz.squeeze(-1),
        first_max_s=torch.where(x == mx, index, V).amin(-1), first_max_u=torch.where(z == mz, index, V).amin(-1),
        sum_s=sum_s, sum_u=sum_u, ent_u=weighted(t["eu"], t["zs"]).sum(-1),
        cross_su=weighted(t["es"], t["zc"]).sum(-1),
    )
    # the CE term's Σ exp(s - max s): at T = 1 (or without the term) sum_s itself
    sums["sum_untempered"] = (x - mx).exp().sum(-1) if untempered_lse else sum_s
    divergence_sums = divergence.dense_sums(with_log_sums(t, sum_s, sum_u), beta) if divergence.one_shard_sweep else ()
    return sums, divergence_sums


def divergence_sweep(divergence: Divergence, s: torch.Tensor, u: torch.Tensor, max_s: torch.Tensor,
                     max_u: torch.Tensor, sum_s: torch.Tensor, sum_u: torch.Tensor, temperature: float, beta: float,
                     scale: float) -> Tuple[torch.Tensor, ...]:
    """The divergence's sums (:meth:`Divergence.dense_sums`) of ``s, u [C, V]`` given :func:`row_sweep`'s row
    maxima and ``Σe`` ``[C]``: a second sweep, for a divergence whose sums need both LSEs (jsd)."""
    t = shifted_rows(promoted(s), promoted(u), max_s[:, None], max_u[:, None], temperature, scale)
    return divergence.dense_sums(with_log_sums(t, sum_s, sum_u), beta)


def finish_rows(divergence: Divergence, s: torch.Tensor, u: torch.Tensor, y: torch.Tensor, sweep: Sums,
                temperature: float, beta: float, scale: float) -> Rows:
    """SPEC §2 rows ``[C]`` from ``sweep`` (:func:`row_sweep`'s sums; for a divergence whose sums need both
    LSEs, its second sweep :func:`divergence_sweep` runs here) and the logits gathered at the labels ``y [C]``
    (ignored rows: any in-range label) and at the argmaxes. Differences that are weighted or summed were taken
    on logits times ``scale`` (:func:`vcrd.core.overflow.overflow_scale`) and are multiplied by ``1/scale``
    after the division by ``Σe``."""
    sums, divergence_sums = sweep
    V = s.shape[-1]
    mx, mz, sum_s, sum_u = sums["max_s"], sums["max_u"], sums["sum_s"], sums["sum_u"]
    if not divergence.one_shard_sweep:
        divergence_sums = divergence_sweep(divergence, s, u, mx, mz, sum_s, sum_u, temperature, beta, scale)
    log_sum_s, log_sum_u = sum_s.log(), sum_u.log()
    at = lambda x, idx: promoted(x.gather(1, idx[:, None]).squeeze(-1))  # noqa: E731
    # clamped: a NaN row has no maximum, and its result is NaN anyway
    a_s, a_u = (sums[k].clamp_max(V - 1).long() for k in ("first_max_s", "first_max_u"))
    teacher_logprob = lambda idx: shifted(at(u, idx), mz, temperature, scale)[1] - log_sum_u  # noqa: E731
    lse_s, lse_u = mx / temperature + log_sum_s, mz / temperature + log_sum_u
    s_y, u_y = at(s, y), at(u, y)
    lp_s, lp_u = shifted(s_y, mx, temperature, scale)[1] - log_sum_s, teacher_logprob(y)
    rows = dict(
        lse_s=lse_s, lse_u=lse_u, lp_s=lp_s, lp_u=lp_u,
        # the LSEs as (max/T, log Σe) for the gradient: their sum rounds log Σe away when max/T is huge
        lse_s_parts=torch.stack([mx / temperature, log_sum_s], 1),
        lse_u_parts=torch.stack([mz / temperature, log_sum_u], 1),
        lq_as=teacher_logprob(a_s), lq_au=teacher_logprob(a_u), agree=a_s == a_u,
        H_u=log_sum_u - sums["ent_u"] / sum_u,
        CE_su=log_sum_u - sums["cross_su"] / sum_s * (1.0 / scale),
        log_ratio=label_log_ratio(lp_s, lp_u, s_y, u_y, lse_s, lse_u, temperature),
        # the CE term: (max s - s[y]) + log Σ exp(s - max s); at T != 1 it needs logsumexp(s) itself
        max_s=mx, s_y=s_y,
        log_sum_untempered=sums["sum_untempered"].log(),
    )
    t = dict(sum_s=sum_s, sum_u=sum_u, log_sum_s=log_sum_s, log_sum_u=log_sum_u)
    rows.update(divergence.dense_rows(divergence_sums, t, beta, scale))
    return rows


@functools.cache
def chunk_functions(divergence: Divergence) -> Tuple[Callable, Callable, Callable]:
    """The divergence's sweep, finishing and gradient functions of one chunk (one triple per divergence, so
    each compiles on its own)."""

    def sweep(s, u, temperature: float, beta: float, untempered_lse: bool, scale: float) -> Sums:
        """:func:`row_sweep` of ``s, u [C, V]``."""
        return row_sweep(divergence, s, u, temperature, beta, untempered_lse, scale)

    def finish(s, u, y, sums: Sums, temperature: float, beta: float, scale: float) -> Rows:
        """:func:`finish_rows`: SPEC §2 rows ``[C]`` with ``D`` from the divergence."""
        return finish_rows(divergence, s, u, y, sums, temperature, beta, scale)

    def grad(out, s, u, y, valid, grad_row, lse_s, lse_u, lse_untempered, coef_kd, coef_ce,
             temperature: float, beta: float, with_ce: bool) -> None:
        """``out [C, V]`` = the chunk's gradient (:func:`vcrd.backends.divergences.write_gradient`)."""
        grad_D = divergence.dense_grad(s, u, lse_s, lse_u, grad_row, temperature, beta)
        write_gradient(out, s, y, valid, grad_D, lse_untempered, coef_kd, coef_ce, temperature, with_ce)

    name = divergence.name
    return (with_own_code(sweep, f"dense_sweep_{name}"), with_own_code(finish, f"dense_finish_{name}"),
            with_own_code(grad, f"dense_grad_{name}"))


def with_own_code(fn: Callable, name: str) -> Callable:
    """``fn`` under a code object of its own named ``name``: dynamo keeps its compiled graphs and counts its
    recompile limit per code object, so the chunk functions each divergence builds from one ``def`` must
    not share one (they would share the limit, and a sweep over divergences would fall back to eager)."""
    code = fn.__code__.replace(co_name=name, co_qualname=name)
    return types.FunctionType(code, fn.__globals__, name, fn.__defaults__, fn.__closure__)


@functools.cache
def compiled(fn: Callable) -> Callable:
    """``fn`` under ``torch.compile`` (built on first use, never at import; one per function, shared by every
    caller)."""
    return torch.compile(fn, dynamic=True)


def compiled_pair(stats_fn: Callable, grad_fn: Callable) -> Tuple[Callable, Callable]:
    """A pair of chunk functions under ``torch.compile`` (:func:`compiled`)."""
    return compiled(stats_fn), compiled(grad_fn)


class TorchDensePair:
    """The chunk pair of the CPU fast path with a dense teacher (``impl="torch"``, teacher ``"dense"``)."""

    def __init__(self, cfg: VCRDConfig, vocab: int, chunk_rows: int, compile: bool) -> None:
        self.cfg, self.chunk_rows, self.scale = cfg, chunk_rows, overflow_scale(vocab)
        self.divergence = DIVERGENCES[cfg.effective_divergence]
        functions = chunk_functions(self.divergence)
        self.sweep_fn, self.finish_fn, self.grad_fn = tuple(map(compiled, functions)) if compile else functions
        self.with_ce = cfg.ce_weight > 0

    def stats(self, chunk: Chunk) -> Rows:
        T, beta = self.cfg.temperature, self.cfg.beta
        sums = self.sweep_fn(chunk.s, chunk.u, T, beta, self.with_ce and T != 1.0, self.scale)
        return self.finish_fn(chunk.s, chunk.u, chunk.labels, sums, T, beta, self.scale)

    def grad(self, chunk: Chunk, rows: Rows, out: Optional[torch.Tensor]) -> None:
        if out is None:
            return
        lse_untempered = torch.stack([rows["max_s"], rows["log_sum_untempered"]], 1)
        self.grad_fn(out, chunk.s, chunk.u, chunk.labels, chunk.valid, rows[self.divergence.grad_row],
                     rows["lse_s_parts"], rows["lse_u_parts"], lse_untempered, rows["coef_kd"], rows["coef_ce"],
                     self.cfg.temperature, self.cfg.beta, self.with_ce)


__all__ = ["TorchDensePair", "chunk_functions", "compiled", "compiled_pair", "divergence_sweep", "finish_rows",
           "promoted", "row_sweep", "shifted", "shifted_rows", "with_log_sums", "with_own_code"]
