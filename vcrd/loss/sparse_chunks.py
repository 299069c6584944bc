"""The CPU fast path of the sparse-teacher loss (SPEC §10): O(K) teacher work per row, no densified teacher.

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

So every divergence is O(K) + one sweep: nothing falls back to a densified teacher on CPU. The ids of
a row are assumed distinct (the top-K of :meth:`SparseTeacher.from_logits` and of the cache are).
Compiled per divergence like :mod:`vcrd.backends.torch_chunks` (whose helpers it reuses); ``V - K``
enters as a 0-dim tensor, so no vocabulary or K is compiled in (K = V is the same graph).
"""

from __future__ import annotations

from typing import Callable, Dict, Optional, Tuple

import torch

from ..backends.torch_chunks import _log_mixture, _weighted, _write_grad, compiled_pair
from ..core.config import VCRDConfig
from ..core.sparse_rows import lowest_absent
from ..core.weights import Rows, poison_gradient, row_loss, weigh_rows
from ..core.windows import CausalWindowMean

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


def _common_stats(s, ids, top, tail, y, temperature: float, n_tail: torch.Tensor,
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
        H_u=-(_weighted(t["qk"], t["zq"]).sum(-1) + torch.where(t["Q"] > 0, t["Q"] * t["zf"], 0.0)),
        CE_su=-(_weighted(pk, t["zq"]).sum(-1) + tail_ce),
    )
    if untempered_lse:  # the CE term at T != 1 needs logsumexp(s) itself
        rows["lse_untempered"] = mx.squeeze(-1) + torch.logsumexp(x - mx, -1)
    return rows, dict(t, xs=xs, es=es, sum_s=sum_s, log_sum_s=log_sum_s, lpk=lpk, pk=pk)


def stats_fkl(s, ids, top, tail, y, temperature: float, beta: float, n_tail: torch.Tensor,
              untempered_lse: bool) -> Rows:
    """Statistics with ``D = Σ_k qk (zq - lp_k) + Σ_{v∉I} qf (zf - lp_v)``."""
    rows, c = _common_stats(s, ids, top, tail, y, temperature, n_tail, untempered_lse)
    off_top_lp = c["xs"].sum(-1) - c["lpk"].sum(-1) - s.shape[-1] * c["log_sum_s"]  # Σ_v lp_v - Σ_k lp_k
    tail_kl = torch.where(c["Q"] > 0, c["Q"] * c["zf"] - c["qf"] * off_top_lp, 0.0)
    rows["D"] = _weighted(c["qk"], c["zq"] - c["lpk"]).sum(-1) + tail_kl
    return rows


def stats_rkl(s, ids, top, tail, y, temperature: float, beta: float, n_tail: torch.Tensor,
              untempered_lse: bool) -> Rows:
    """Statistics with ``D = KL(p‖q) = Σ_v p lp - Σ_v p log q = Σ_v p lp + CE_su``."""
    rows, c = _common_stats(s, ids, top, tail, y, temperature, n_tail, untempered_lse)
    rows["D"] = _weighted(c["es"], c["xs"]).sum(-1) / c["sum_s"] - c["log_sum_s"] + rows["CE_su"]
    return rows


def stats_jsd(s, ids, top, tail, y, temperature: float, beta: float, n_tail: torch.Tensor,
              untempered_lse: bool) -> Rows:
    """Statistics with ``D = β KL(q‖m) + (1-β) KL(p‖m)``; also ``kl_pm``. Off the top-K
    ``log m_v = log(β qf + (1-β) p_v)``: swept over the whole row, then corrected at the K ids."""
    rows, c = _common_stats(s, ids, top, tail, y, temperature, n_tail, untempered_lse)
    p, lp = c["es"] / c["sum_s"][:, None], c["xs"] - c["log_sum_s"][:, None]
    qf = c["qf"][:, None]
    lm_off = _log_mixture(p, qf, beta)  # log m as if every token were off the top-K
    lm_off_k, lm_k = _log_mixture(c["pk"], qf, beta), _log_mixture(c["pk"], c["qk"], beta)
    kl_pm = (_weighted(p, lp - lm_off).sum(-1) - _weighted(c["pk"], c["lpk"] - lm_off_k).sum(-1)
             + _weighted(c["pk"], c["lpk"] - lm_k).sum(-1))
    off_top_lm = lm_off.sum(-1) - lm_off_k.sum(-1)
    kl_qm = (_weighted(c["qk"], c["zq"] - lm_k).sum(-1)
             + torch.where(c["Q"] > 0, c["Q"] * c["zf"] - c["qf"] * off_top_lm, 0.0))
    rows["D"], rows["kl_pm"] = beta * kl_qm + (1 - beta) * kl_pm, kl_pm
    return rows


def _student(s, lse_s, temperature: float) -> Tuple[torch.Tensor, torch.Tensor]:
    dtype = torch.promote_types(s.dtype, torch.float32)
    logp = s.to(dtype) / temperature - lse_s[:, None]
    return logp, logp.exp()


def grad_fkl(out, s, ids, top, tail, y, valid, rows_D, lse_s, lse_untempered, coef_kd, coef_ce, temperature: float,
             beta: float, n_tail: torch.Tensor, with_ce: bool) -> None:
    """``∂D/∂(s/T) = p - q``: ``p - qf`` over the row, ``p_k - qk`` at the ids."""
    logp, p = _student(s, lse_s, temperature)
    t = _teacher(ids, top, tail, logp.dtype, temperature, n_tail)
    grad_D = (p - t["qf"][:, None]).scatter(1, ids, p.gather(1, ids) - t["qk"])
    _write_grad(out, s, y, valid, grad_D, lse_untempered, coef_kd, coef_ce, temperature, with_ce)


def grad_rkl(out, s, ids, top, tail, y, valid, rows_D, lse_s, lse_untempered, coef_kd, coef_ce, temperature: float,
             beta: float, n_tail: torch.Tensor, with_ce: bool) -> None:
    """``∂D/∂(s/T) = p (log p - log q - D)`` (``rows_D`` is D)."""
    logp, p = _student(s, lse_s, temperature)
    t = _teacher(ids, top, tail, logp.dtype, temperature, n_tail)
    D = rows_D[:, None]
    off = _weighted(p, logp - t["zf"][:, None] - D)
    at_ids = _weighted(p.gather(1, ids), logp.gather(1, ids) - t["zq"] - D)
    _write_grad(out, s, y, valid, off.scatter(1, ids, at_ids), lse_untempered, coef_kd, coef_ce, temperature, with_ce)


def grad_jsd(out, s, ids, top, tail, y, valid, rows_D, lse_s, lse_untempered, coef_kd, coef_ce, temperature: float,
             beta: float, n_tail: torch.Tensor, with_ce: bool) -> None:
    """``∂D/∂(s/T) = (1-β) p (log p - log m - KL(p‖m))`` (``rows_D`` is KL(p‖m))."""
    logp, p = _student(s, lse_s, temperature)
    t = _teacher(ids, top, tail, logp.dtype, temperature, n_tail)
    D = rows_D[:, None]
    off = _weighted(p, logp - _log_mixture(p, t["qf"][:, None], beta) - D)
    pk = p.gather(1, ids)
    at_ids = _weighted(pk, logp.gather(1, ids) - _log_mixture(pk, t["qk"], beta) - D)
    _write_grad(out, s, y, valid, (1 - beta) * off.scatter(1, ids, at_ids), lse_untempered, coef_kd, coef_ce,
                temperature, with_ce)


CHUNK_FUNCTIONS: Dict[str, Tuple[Callable, Callable, str]] = {
    # divergence: (statistics, gradient, the row the gradient needs besides lse_s)
    "fkl": (stats_fkl, grad_fkl, "D"),
    "rkl": (stats_rkl, grad_rkl, "D"),
    "jsd": (stats_jsd, grad_jsd, "kl_pm"),
}


def chunk_loss_and_grad(s: torch.Tensor, ids: torch.Tensor, top: torch.Tensor, tail: torch.Tensor, y: torch.Tensor,
                        valid: torch.Tensor, cfg: VCRDConfig, window: CausalWindowMean,
                        grad_target: Optional[torch.Tensor], grad_scale: float, compile: bool) -> Rows:
    """One chunk of rows (in row order): student logits ``s [C, V]``, the sparse teacher's ``ids [C, K]``,
    ``top [C, K]``, ``tail [C]``, labels ``y [C]`` (ignored rows: any in-range label), ``valid [C]``.
    Returns the rows of :func:`vcrd.backends.torch_chunks.loss_and_grad` (weighed through ``window``)
    and writes ``grad_scale · ∂(Σ_r loss_r)/∂s`` into ``grad_target [C, V]`` (may be ``s`` itself)."""
    divergence, T, beta = cfg.effective_divergence, cfg.temperature, cfg.beta
    stats_fn, grad_fn, grad_row = CHUNK_FUNCTIONS[divergence]
    if compile:
        stats_fn, grad_fn = compiled_pair(stats_fn, grad_fn)
    V, K = s.shape[-1], ids.shape[-1]
    n_tail = torch.tensor(float(V - K), dtype=torch.promote_types(s.dtype, torch.float32), device=s.device)
    with_ce = cfg.ce_weight > 0
    in_place = grad_target is s
    s, ids = s.detach(), ids.long()
    # written over the logits: pass the one detached view as both (aliased inputs of a compiled function
    # that writes one of them come out wrong)
    grad_target = s if in_place else grad_target
    rows = stats_fn(s, ids, top, tail, y, T, beta, n_tail, with_ce and T != 1.0)
    lse_untempered = rows.get("lse_untempered", rows["lse_s"])
    ce = (lse_untempered - s.gather(1, y[:, None]).squeeze(-1).to(lse_untempered.dtype)) if with_ce else 0.0
    weigh_rows(rows, valid, window, cfg, grad_scale)
    rows["per_row"] = row_loss(rows, ce, valid, cfg)
    poison_gradient(rows, valid)  # SPEC §6: never a finite gradient beside a non-finite loss
    if grad_target is not None:
        grad_fn(grad_target, s, ids, top, tail, y, valid, rows[grad_row], rows["lse_s"], lse_untempered,
                rows["coef_kd"], rows["coef_ce"], T, beta, n_tail, with_ce)
    return rows
