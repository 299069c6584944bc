"""The CPU fast path for a sparse (top-K) teacher (SPEC §10): O(K) teacher work per row, no densified teacher.

A chunk's teacher is its rows' ``ids [C, K]``, ``top [C, K]`` (``log q`` at T=1) and ``tail [C]``; the
completed teacher has ``fill = tail - log(V - K)`` on each of the ``V - K`` other tokens. At temperature
T it plays the logits ``l / T``, so with ``lse_u = log(Σ_k e^{top_k/T} + (V-K) e^{fill/T})``:
``zq = top/T - lse_u`` and ``zf = fill/T - lse_u`` (the tempered ``log q`` of a top-K and of a tail
token; ``qk = e^zq``, ``qf = e^zf``, tail mass ``Q = (V-K) qf``). One sweep of the student row gives
``p``, its log-sum-exp and argmax, and the sums the tail needs; every teacher term is a sum over the
K stored entries plus the tail in closed form:

- fkl: ``D = Σ_k qk (zq - lp_k) + Q zf - qf Σ_{v∉I} lp_v``, ``Σ_{v∉I} lp_v = Σ_v lp_v - Σ_k lp_k``;
  gradient ``p - q``: ``p - qf`` written over the row, ``p_k - qk`` scattered at the K ids
- rkl: ``D = Σ_v p lp + CE_su``; gradient ``p (lp - log q - D)``, the same way
- jsd: ``m = β q + (1-β) p`` is ``β qf + (1-β) p_v`` off the top-K (a per-row constant plus the
  student), so ``Σ_{v∉I} log m_v`` and ``KL(p‖m)`` come from the same sweep with K corrections
- ``lp_u``, ``lq_as``: ``zq`` where the token is among the ids, else ``zf``; ``lq_au = max(zq, zf)``,
  ``a_u`` its lowest index (an id, or the lowest id absent from the top-K); ``H_u = -Σ_k qk zq - Q zf``,
  ``CE_su = -Σ_k p_k zq - P zf`` with ``P = 1 - Σ_k p_k`` the student's mass off the top-K.

So every divergence is O(K) + one sweep (the formulas per divergence: :mod:`vcrd.backends.divergences`):
nothing falls back to a densified teacher on CPU. The ids of a row are assumed distinct (the top-K of
:meth:`vcrd.core.sparse_teacher.SparseTeacher.from_logits` and of the cache are). The pair
:class:`TorchSparsePair` of :func:`vcrd.backends.chunk_loop.run_chunks`, compiled per divergence like
:mod:`vcrd.backends.torch_dense`; ``V - K`` enters as a 0-dim tensor, so no vocabulary or K is compiled in
(K = V is the same graph).
"""

from __future__ import annotations

import functools
from typing import Callable, Dict, Optional, Tuple

import torch

from ..core.config import VCRDConfig
from ..core.sparse_teacher import SparseRowBatch, lowest_absent
from ..core.weights import Rows
from .chunk_loop import Chunk
from .divergences import DIVERGENCES, Divergence, weighted, write_gradient
from .torch_dense import compiled_pair, with_own_code

Teacher = Dict[str, torch.Tensor]


def _teacher(ids, top, tail, dtype: torch.dtype, temperature: float, n_tail: torch.Tensor) -> Teacher:
    """The completed teacher of a chunk in O(K): raw ``top``/``fill`` (as the densified row holds them)
    and tempered ``zq [C, K]``, ``zf [C]``, ``qk``, ``qf``, tail mass ``Q [C]``. ``n_tail`` is ``V - K``
    (a 0-dim tensor: a value, never a compiled-in constant); at K = V there is no tail (``qf = Q = 0``)."""
    top, fill = top.to(dtype), tail.to(dtype) - n_tail.clamp_min(1).log()
    a, f = top / temperature, fill / temperature
    lse_u = torch.logaddexp(torch.logsumexp(a, -1), f + n_tail.log())  # log 0 = -inf: no tail at K = V
    zq, zf = a - lse_u[:, None], f - lse_u
    qf = torch.where(n_tail > 0, zf.exp(), 0.0)
    return dict(top=top, fill=fill, zq=zq, zf=zf, qk=zq.exp(), qf=qf, Q=qf * n_tail, n_tail=n_tail)


def _teacher_logprob(ids, t: Teacher, token: torch.Tensor) -> torch.Tensor:
    """Tempered ``log q`` of ``token [C]`` under the completed teacher: its ``zq`` if stored, else ``zf``."""
    match = ids == token[:, None]
    return torch.where(match.any(-1), torch.where(match, t["zq"], -torch.inf).amax(-1), t["zf"])


def _teacher_argmax(ids, t: Teacher, vocab: int) -> torch.Tensor:
    """The completed teacher's argmax, lowest index on ties (an id, or the lowest token off the top-K)."""
    top, has_tail = t["top"], t["n_tail"] > 0
    best = torch.where(has_tail, torch.maximum(top.amax(-1), t["fill"]), top.amax(-1))
    return torch.minimum(torch.where(top == best[:, None], ids, vocab).amin(-1),
                         torch.where(has_tail & (t["fill"] == best), lowest_absent(ids), vocab))


def common_stats(s, ids, top, tail, y, temperature: float, n_tail: torch.Tensor,
                 untempered_lse: bool) -> Tuple[Rows, Dict[str, torch.Tensor]]:
    """The statistics every divergence shares (SPEC §2 on the completed teacher), and the pieces the
    divergence needs: the student's shifted row ``xs``, ``es``, and its values at the ids."""
    dtype = torch.promote_types(s.dtype, torch.float32)
    x = s.to(dtype)
    V = x.shape[-1]
    t = _teacher(ids, top, tail, dtype, temperature, n_tail)
    mx = x.amax(-1, keepdim=True)
    index = torch.arange(V, device=x.device, dtype=torch.float32)
    a_s = torch.where(x == mx, index, V).amin(-1).clamp_max(V - 1).long()
    xs = (x - mx) / temperature
    es = xs.exp()
    sum_s = es.sum(-1)
    log_sum_s = sum_s.log()
    lpk = xs.gather(1, ids) - log_sum_s[:, None]
    pk = lpk.exp()
    P = torch.where(n_tail > 0, (1 - pk.sum(-1)).clamp_min(0), 0.0)  # the student's mass off the top-K
    a_u = _teacher_argmax(ids, t, V)
    tail_ce = torch.where(P > 0, P * t["zf"], 0.0)
    rows = dict(
        lse_s=mx.squeeze(-1) / temperature + log_sum_s,
        lp_s=xs.gather(1, y[:, None]).squeeze(-1) - log_sum_s, lp_u=_teacher_logprob(ids, t, y),
        lq_as=_teacher_logprob(ids, t, a_s), lq_au=_teacher_logprob(ids, t, a_u), agree=a_s == a_u,
        H_u=-(weighted(t["qk"], t["zq"]).sum(-1) + torch.where(t["Q"] > 0, t["Q"] * t["zf"], 0.0)),
        CE_su=-(weighted(pk, t["zq"]).sum(-1) + tail_ce),
    )
    # the CE term: (max s - s[y]) + log Σ exp(s - max s); at T != 1 it needs logsumexp(s) itself
    log_sum_1 = torch.logsumexp(x - mx, -1) if untempered_lse else log_sum_s
    rows.update(max_s=mx.squeeze(-1), log_sum_untempered=log_sum_1, s_y=x.gather(1, y[:, None]).squeeze(-1))
    return rows, dict(t, xs=xs, es=es, sum_s=sum_s, log_sum_s=log_sum_s, lpk=lpk, pk=pk)


def _student(s, lse_s, temperature: float) -> Tuple[torch.Tensor, torch.Tensor]:
    dtype = torch.promote_types(s.dtype, torch.float32)
    logp = s.to(dtype) / temperature - lse_s[:, None]
    return logp, logp.exp()


@functools.cache
def chunk_functions(divergence: Divergence) -> Tuple[Callable, Callable]:
    """The divergence's statistics and gradient functions of one chunk with a sparse teacher (one pair per
    divergence, so each compiles on its own)."""

    def stats(s, ids, top, tail, y, temperature: float, beta: float, n_tail: torch.Tensor,
              untempered_lse: bool) -> Rows:
        """SPEC §2 rows on the completed teacher, with ``D`` from the divergence."""
        rows, c = common_stats(s, ids, top, tail, y, temperature, n_tail, untempered_lse)
        rows.update(divergence.sparse_rows(rows, c, beta))
        return rows

    def grad(out, s, ids, top, tail, y, valid, grad_row, lse_s, lse_untempered, coef_kd, coef_ce,
             temperature: float, beta: float, n_tail: torch.Tensor, with_ce: bool) -> None:
        """``∂D/∂(s/T)`` with the tail's ``qf, zf`` over the row, then the K ids' own terms over it."""
        logp, p = _student(s, lse_s, temperature)
        t = _teacher(ids, top, tail, logp.dtype, temperature, n_tail)
        row = grad_row[:, None]
        off = divergence.grad(p, logp, t["qf"][:, None], t["zf"][:, None], row, beta)
        at_ids = divergence.grad(p.gather(1, ids), logp.gather(1, ids), t["qk"], t["zq"], row, beta)
        write_gradient(out, s, y, valid, off.scatter(1, ids, at_ids), lse_untempered, coef_kd, coef_ce,
                       temperature, with_ce)

    name = divergence.name
    return with_own_code(stats, f"sparse_stats_{name}"), with_own_code(grad, f"sparse_grad_{name}")


class TorchSparsePair:
    """The chunk pair of the CPU fast path with a sparse teacher (``impl="torch"``, teacher ``"sparse"``)."""

    def __init__(self, cfg: VCRDConfig, batch: SparseRowBatch, chunk_rows: int, compile: bool) -> None:
        self.cfg, self.chunk_rows, self.with_ce = cfg, chunk_rows, cfg.ce_weight > 0
        self.divergence = DIVERGENCES[cfg.effective_divergence]
        self.stats_fn, self.grad_fn = chunk_functions(self.divergence)
        if compile:
            self.stats_fn, self.grad_fn = compiled_pair(self.stats_fn, self.grad_fn)
        V, K = batch.vocab, batch.ids.shape[-1]
        self.n_tail = torch.tensor(float(V - K), dtype=torch.promote_types(batch.s.dtype, torch.float32),
                                   device=batch.s.device)

    def _teacher_rows(self, chunk: Chunk) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        batch = chunk.batch
        return batch.ids[chunk.r0:chunk.r1].long(), batch.top[chunk.r0:chunk.r1], batch.tail[chunk.r0:chunk.r1]

    def stats(self, chunk: Chunk) -> Rows:
        T = self.cfg.temperature
        return self.stats_fn(chunk.s, *self._teacher_rows(chunk), chunk.labels, T, self.cfg.beta, self.n_tail,
                             self.with_ce and T != 1.0)

    def grad(self, chunk: Chunk, rows: Rows, out: Optional[torch.Tensor]) -> None:
        if out is None:
            return
        lse_untempered = torch.stack([rows["max_s"], rows["log_sum_untempered"]], 1)
        self.grad_fn(out, chunk.s, *self._teacher_rows(chunk), chunk.labels, chunk.valid,
                     rows[self.divergence.grad_row], rows["lse_s"], lse_untempered, rows["coef_kd"], rows["coef_ce"],
                     self.cfg.temperature, self.cfg.beta, self.n_tail, self.with_ce)


__all__ = ["TorchSparsePair", "chunk_functions", "common_stats"]
