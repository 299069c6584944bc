"""The CPU fast path for a dense teacher: the pair ``stats(chunk)`` / ``grad(chunk, rows, out)`` of
:func:`vcrd.backends.chunk_loop.run_chunks` on plain tensor code that ``torch.compile`` fuses
(``VCRD_COMPILE=1``, the default); the only ``[N, V]`` buffer is the gradient itself.

The statistics sweep reads a chunk of both logits once (both LSEs, label log-probs, argmaxes and the
teacher's judgement of them, ``H_u``, ``CE_su``) and asks the divergence
(:mod:`vcrd.backends.divergences`) for ``D``; the gradient sweep writes the chunk's rows of ``∂L/∂s``.

Bounded compilation: each divergence has its own statistics and gradient function (its own
compiled code), temperature and beta enter as plain numbers (dynamic, never specialised), and the
remaining static choices (the CE term, the input dtype, a gradient written over the logits) give
at most a handful of graphs per function, so a sweep over options never exhausts dynamo's
recompile limit.
"""

from __future__ import annotations

import functools
import types
from typing import Callable, Dict, Optional, Tuple

import torch

from ..core.config import VCRDConfig
from ..core.overflow import overflow_scale
from ..core.weights import Rows, label_log_ratio
from .chunk_loop import Chunk
from .divergences import DIVERGENCES, Divergence, weighted, write_gradient


def common_stats(s: torch.Tensor, u: torch.Tensor, y: torch.Tensor, temperature: float,
                  untempered_lse: bool, scale: float) -> Tuple[Rows, Dict[str, torch.Tensor]]:
    """The statistics every divergence shares, and the tempered, shifted rows the divergence needs.

    ``s, u [C, V]``, ``y [C]`` (ignored rows: any in-range label). Sums are taken against the row
    maxima (``e = exp((x - max)/T)``), so one read after the max gives every statistic. Differences
    that are weighted or summed are taken on logits times ``scale`` (:func:`vcrd.core.overflow.overflow_scale`:
    finite for any fp32 logits at T >= 1) and multiplied by ``1/scale`` after the division by ``Σe``.
    """
    dtype = torch.promote_types(s.dtype, torch.float32)
    x, z = s.to(dtype), u.to(dtype)
    V = x.shape[-1]
    mx, mz = x.amax(-1, keepdim=True), z.amax(-1, keepdim=True)
    # lowest index of the maximum, found in the same loop as the sums; indices as floats (exact below
    # 2^24, and vectorised at full width); clamped: a NaN row has none, and its result is NaN anyway
    index = torch.arange(V, device=x.device, dtype=torch.float32)
    a_s = torch.where(x == mx, index, V).amin(-1, keepdim=True).clamp_max(V - 1).long()
    a_u = torch.where(z == mz, index, V).amin(-1, keepdim=True).clamp_max(V - 1).long()
    # tempered, shifted, scaled: <= 0 and finite; unscaled: -inf only below fp32's range, where e = 0
    xc, zc = (x * scale - mx * scale) / temperature, (z * scale - mz * scale) / temperature
    xs, zs = xc * (1.0 / scale), zc * (1.0 / scale)
    es, eu = xs.exp(), zs.exp()
    sum_s, sum_u = es.sum(-1), eu.sum(-1)
    log_sum_s, log_sum_u = sum_s.log(), sum_u.log()
    teacher_logprob = lambda idx: zs.gather(1, idx).squeeze(-1) - log_sum_u  # noqa: E731
    lse_s, lse_u = mx.squeeze(-1) / temperature + log_sum_s, mz.squeeze(-1) / temperature + log_sum_u
    lp_s, lp_u = xs.gather(1, y[:, None]).squeeze(-1) - log_sum_s, teacher_logprob(y[:, None])
    rows = dict(
        lse_s=lse_s, lse_u=lse_u, lp_s=lp_s, lp_u=lp_u,
        # the LSEs as (max/T, log Σe) for the gradient: their sum rounds log Σe away when max/T is huge
        lse_s_parts=torch.cat([mx / temperature, log_sum_s[:, None]], 1),
        lse_u_parts=torch.cat([mz / temperature, log_sum_u[:, None]], 1),
        lq_as=teacher_logprob(a_s), lq_au=teacher_logprob(a_u), agree=(a_s == a_u).squeeze(-1),
        H_u=log_sum_u - weighted(eu, zs).sum(-1) / sum_u,
        CE_su=log_sum_u - weighted(es, zc).sum(-1) / sum_s * (1.0 / scale),
        log_ratio=label_log_ratio(lp_s, lp_u, x.gather(1, y[:, None]).squeeze(-1), z.gather(1, y[:, None]).squeeze(-1),
                                  lse_s, lse_u, temperature),
    )
    # the CE term: (max s - s[y]) + log Σ exp(s - max s); at T != 1 it needs logsumexp(s) itself
    log_sum_1 = torch.logsumexp(x - mx, -1) if untempered_lse else log_sum_s
    rows.update(max_s=mx.squeeze(-1), log_sum_untempered=log_sum_1, s_y=x.gather(1, y[:, None]).squeeze(-1))
    shifted = dict(xs=xs, zs=zs, xc=xc, zc=zc, es=es, eu=eu, sum_s=sum_s, sum_u=sum_u, log_sum_s=log_sum_s,
                   log_sum_u=log_sum_u)
    return rows, shifted


@functools.cache
def chunk_functions(divergence: Divergence) -> Tuple[Callable, Callable]:
    """The divergence's statistics and gradient functions of one chunk (one pair per divergence, so each
    compiles on its own)."""

    def stats(s, u, y, temperature: float, beta: float, untempered_lse: bool, scale: float) -> Rows:
        """SPEC §2 rows of ``s, u [C, V]``, ``y [C]``, with ``D`` from the divergence."""
        rows, shifted = common_stats(s, u, y, temperature, untempered_lse, scale)
        rows.update(divergence.dense_rows(shifted, beta, scale))
        return rows

    def grad(out, s, u, y, valid, grad_row, lse_s, lse_u, lse_untempered, coef_kd, coef_ce,
             temperature: float, beta: float, with_ce: bool) -> None:
        """``out [C, V]`` = the chunk's gradient (:func:`vcrd.backends.divergences.write_gradient`)."""
        grad_D = divergence.dense_grad(s, u, lse_s, lse_u, grad_row, temperature, beta)
        write_gradient(out, s, y, valid, grad_D, lse_untempered, coef_kd, coef_ce, temperature, with_ce)

    return with_own_code(stats, f"dense_stats_{divergence.name}"), with_own_code(grad, f"dense_grad_{divergence.name}")


def with_own_code(fn: Callable, name: str) -> Callable:
    """``fn`` under a code object of its own named ``name``: dynamo keeps its compiled graphs and counts its
    recompile limit per code object, so the chunk functions each divergence builds from one ``def`` must
    not share one (they would share the limit, and a sweep over divergences would fall back to eager)."""
    code = fn.__code__.replace(co_name=name, co_qualname=name)
    return types.FunctionType(code, fn.__globals__, name, fn.__defaults__, fn.__closure__)


@functools.cache
def compiled_pair(stats_fn: Callable, grad_fn: Callable) -> Tuple[Callable, Callable]:
    """A divergence's two chunk functions under ``torch.compile`` (built on first use, never at import;
    one compiled pair per pair of functions, shared by every caller)."""
    return torch.compile(stats_fn, dynamic=True), torch.compile(grad_fn, dynamic=True)


class TorchDensePair:
    """The chunk pair of the CPU fast path with a dense teacher (``impl="torch"``, teacher ``"dense"``)."""

    def __init__(self, cfg: VCRDConfig, vocab: int, chunk_rows: int, compile: bool) -> None:
        self.cfg, self.chunk_rows, self.scale = cfg, chunk_rows, overflow_scale(vocab)
        self.divergence = DIVERGENCES[cfg.effective_divergence]
        self.stats_fn, self.grad_fn = chunk_functions(self.divergence)
        if compile:
            self.stats_fn, self.grad_fn = compiled_pair(self.stats_fn, self.grad_fn)
        self.with_ce = cfg.ce_weight > 0

    def stats(self, chunk: Chunk) -> Rows:
        T = self.cfg.temperature
        return self.stats_fn(chunk.s, chunk.u, chunk.labels, T, self.cfg.beta, self.with_ce and T != 1.0, self.scale)

    def grad(self, chunk: Chunk, rows: Rows, out: Optional[torch.Tensor]) -> None:
        if out is None:
            return
        lse_untempered = torch.stack([rows["max_s"], rows["log_sum_untempered"]], 1)
        self.grad_fn(out, chunk.s, chunk.u, chunk.labels, chunk.valid, rows[self.divergence.grad_row],
                     rows["lse_s_parts"], rows["lse_u_parts"], lse_untempered, rows["coef_kd"], rows["coef_ce"],
                     self.cfg.temperature, self.cfg.beta, self.with_ce)


__all__ = ["TorchDensePair", "chunk_functions", "common_stats", "compiled_pair", "with_own_code"]
