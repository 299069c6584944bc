"""The CPU fast path: rows in chunks, loss and gradient computed together in the forward pass.

Per chunk of rows, in order: (1) a statistics sweep over the chunk's logits (both LSEs, label
log-probs, argmaxes and the teacher's judgement of them, H_u, CE_su, D); (2) the weights, from
the causal window whose prefix sums carry across chunks (SPEC §5: the window is causal, so the
chunk's weights are final once its own rows are in); (3) a gradient sweep writing the chunk's
rows of ``∂L/∂s``. The chunk is still in cache for (3). The per-chunk math is plain tensor code
that ``torch.compile`` fuses (``VCRD_COMPILE=1``, the default); the only ``[N, V]`` buffer is
the gradient itself.

Bounded compilation: each divergence has its own statistics and gradient function (its own
compiled code), temperature and beta enter as plain numbers (dynamic, never specialised), and the
remaining static choices (the CE term, the input dtype, a gradient written over the logits) give
at most a handful of graphs per function, so a sweep over options never exhausts dynamo's
recompile limit.
"""

from __future__ import annotations

import functools
from typing import Callable, Dict, Optional, Tuple

import torch

from ..core.checks import RowBatch
from ..core.config import VCRDConfig
from ..core.overflow import overflow_scale
from ..core.weights import Rows, concat_rows, label_log_ratio, poison_gradient, row_loss, weigh_rows
from ..core.windows import CausalWindowMean


def _weighted(w: torch.Tensor, log_ratio: torch.Tensor) -> torch.Tensor:
    """``w · log_ratio`` with ``0 · anything = 0`` (the ``0 log 0`` terms of a divergence vanish)."""
    return torch.where(w > 0, w * log_ratio, 0.0)


def _common_stats(s: torch.Tensor, u: torch.Tensor, y: torch.Tensor, temperature: float,
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
        H_u=log_sum_u - _weighted(eu, zs).sum(-1) / sum_u,
        CE_su=log_sum_u - _weighted(es, zc).sum(-1) / sum_s * (1.0 / scale),
        log_ratio=label_log_ratio(lp_s, lp_u, x.gather(1, y[:, None]).squeeze(-1), z.gather(1, y[:, None]).squeeze(-1),
                                  lse_s, lse_u, temperature),
    )
    if untempered_lse:  # the CE term at T != 1 needs logsumexp(s) itself
        log_sum_1 = torch.logsumexp(x - mx, -1)
        rows["lse_untempered"] = mx.squeeze(-1) + log_sum_1
        rows["lse_untempered_parts"] = torch.cat([mx, log_sum_1[:, None]], 1)
    shifted = dict(xs=xs, zs=zs, xc=xc, zc=zc, es=es, eu=eu, sum_s=sum_s, sum_u=sum_u, log_sum_s=log_sum_s,
                   log_sum_u=log_sum_u)
    return rows, shifted


def _log_mixture(p: torch.Tensor, q: torch.Tensor, beta: float) -> torch.Tensor:
    """``log m`` with ``m = β q + (1-β) p``, from the probabilities themselves (one log per element;
    clamped at the smallest normal float so a subnormal ``p`` never meets ``log 0``)."""
    return (beta * q + (1 - beta) * p).clamp_min(torch.finfo(p.dtype).tiny).log()


def stats_fkl(s, u, y, temperature: float, beta: float,
              untempered_lse: bool, scale: float) -> Rows:
    """Statistics with ``D = KL(q‖p) = Σ q (z' - x')/Σ e_u + log Σ e_s - log Σ e_u``."""
    rows, t = _common_stats(s, u, y, temperature, untempered_lse, scale)
    kl = _weighted(t["eu"], t["zc"] - t["xc"]).sum(-1) / t["sum_u"] * (1.0 / scale)
    rows["D"] = kl + t["log_sum_s"] - t["log_sum_u"]
    return rows


def stats_rkl(s, u, y, temperature: float, beta: float,
              untempered_lse: bool, scale: float) -> Rows:
    """Statistics with ``D = KL(p‖q)``."""
    rows, t = _common_stats(s, u, y, temperature, untempered_lse, scale)
    kl = _weighted(t["es"], t["xc"] - t["zc"]).sum(-1) / t["sum_s"] * (1.0 / scale)
    rows["D"] = kl + t["log_sum_u"] - t["log_sum_s"]
    return rows


def stats_jsd(s, u, y, temperature: float, beta: float,
              untempered_lse: bool, scale: float) -> Rows:
    """Statistics with ``D = β KL(q‖m) + (1-β) KL(p‖m)``; also ``kl_pm = KL(p‖m)``, which the
    gradient needs."""
    rows, t = _common_stats(s, u, y, temperature, untempered_lse, scale)
    logp, logq = t["xs"] - t["log_sum_s"][:, None], t["zs"] - t["log_sum_u"][:, None]
    p, q = t["es"] / t["sum_s"][:, None], t["eu"] / t["sum_u"][:, None]
    logm = _log_mixture(p, q, beta)
    kl_qm, kl_pm = _weighted(q, logq - logm).sum(-1), _weighted(p, logp - logm).sum(-1)
    rows["D"], rows["kl_pm"] = beta * kl_qm + (1 - beta) * kl_pm, kl_pm
    return rows


def minus_lse(x: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """``x - lse`` for ``x [C, V]`` and ``lse [C]``, or ``lse [C, 2]`` holding ``(max, log Σe)``: then
    ``(x - max) - log Σe``, exact for ties at a maximum so large that ``max + log Σe`` rounds to ``max``."""
    if lse.dim() == 2:
        return (x - lse[:, :1]) - lse[:, 1:]
    return x - lse[:, None]


def _write_grad(out, s, y, valid, grad_D, lse_untempered, coef_kd, coef_ce, temperature: float, with_ce: bool) -> None:
    """``out = coef_kd/T ⊙ ∂D/∂(s/T) + coef_ce ⊙ (softmax(s) - onehot(y))`` in valid rows, 0 elsewhere.

    Entries below the smallest normal float become 0 (they make CPU GEMMs on the gradient ~5×
    slower); NaN is kept (SPEC §6: never a finite gradient beside a NaN loss).
    """
    grad = (coef_kd / temperature)[:, None] * grad_D
    if with_ce:
        grad = grad + coef_ce[:, None] * minus_lse(s.to(grad.dtype), lse_untempered).exp()
        grad = grad.scatter_add(1, y[:, None], -coef_ce[:, None])
    flush = grad.abs() < torch.finfo(grad.dtype).tiny
    out.copy_(torch.where(valid[:, None] & ~flush, grad, 0.0))


def _log_probs(s, u, lse_s, lse_u, temperature):
    """``log p = s/T - lse_s``, ``log q = u/T - lse_u`` (``lse`` ``[C]`` or ``(max/T, log Σe)``: :func:`minus_lse`);
    ``-inf`` only where the true value is below fp32's range."""
    dtype = torch.promote_types(s.dtype, torch.float32)
    return minus_lse(s.to(dtype) / temperature, lse_s), minus_lse(u.to(dtype) / temperature, lse_u)


def grad_fkl(out, s, u, y, valid, rows_D, lse_s, lse_u, lse_untempered, coef_kd, coef_ce,
             temperature: float, beta: float, with_ce: bool) -> None:
    """``∂D/∂(s/T) = p - q``."""
    logp, logq = _log_probs(s, u, lse_s, lse_u, temperature)
    _write_grad(out, s, y, valid, logp.exp() - logq.exp(), lse_untempered, coef_kd, coef_ce, temperature, with_ce)


def grad_rkl(out, s, u, y, valid, rows_D, lse_s, lse_u, lse_untempered, coef_kd, coef_ce,
             temperature: float, beta: float, with_ce: bool) -> None:
    """``∂D/∂(s/T) = p ⊙ (log p - log q - D)`` (``rows_D`` is D), taken on halves and doubled once
    (bit-identical where nothing overflows): ``log p - log q`` can exceed fp32's range where the
    product with ``p`` does not."""
    dtype = torch.promote_types(s.dtype, torch.float32)
    logp = minus_lse(s.to(dtype) / temperature, lse_s)
    half_logq = minus_lse(u.to(dtype) / temperature * 0.5, lse_u * 0.5)
    p = logp.exp()
    grad_D = torch.where(p > 0, p * ((logp * 0.5 - half_logq) - rows_D[:, None] * 0.5) * 2, 0.0)
    _write_grad(out, s, y, valid, grad_D, lse_untempered, coef_kd, coef_ce, temperature, with_ce)


def grad_jsd(out, s, u, y, valid, rows_D, lse_s, lse_u, lse_untempered, coef_kd, coef_ce,
             temperature: float, beta: float, with_ce: bool) -> None:
    """``∂D/∂(s/T) = (1-β) p ⊙ (log p - log m - KL(p‖m))`` (``rows_D`` is KL(p‖m))."""
    logp, logq = _log_probs(s, u, lse_s, lse_u, temperature)
    p = logp.exp()
    grad_D = (1 - beta) * _weighted(p, logp - _log_mixture(p, logq.exp(), beta) - rows_D[:, None])
    _write_grad(out, s, y, valid, grad_D, lse_untempered, coef_kd, coef_ce, temperature, with_ce)


CHUNK_FUNCTIONS: Dict[str, Tuple[Callable, Callable, str]] = {
    # divergence: (statistics, gradient, the row the gradient needs besides the LSEs)
    "fkl": (stats_fkl, grad_fkl, "D"),
    "rkl": (stats_rkl, grad_rkl, "D"),
    "jsd": (stats_jsd, grad_jsd, "kl_pm"),
}


@functools.cache
def compiled_pair(stats_fn: Callable, grad_fn: Callable) -> Tuple[Callable, Callable]:
    """A divergence's two chunk functions under ``torch.compile`` (built on first use, never at import;
    one compiled pair per pair of functions, shared by every caller)."""
    return torch.compile(stats_fn, dynamic=True), torch.compile(grad_fn, dynamic=True)


def loss_and_grad(batch: RowBatch, cfg: VCRDConfig, grad_out: Optional[torch.Tensor], grad_scale: float,
                  chunk_rows: int, compile: bool, window: Optional[CausalWindowMean] = None) -> Rows:
    """Rows of SPEC §2–6 for a checked batch, writing ``grad_scale · ∂(Σ_r loss_r)/∂s`` into ``grad_out``.

    ``grad_out`` is ``[N, V]`` (a view of the student gradient, any float dtype), ``batch.s`` itself
    (the gradient written over the logits: each chunk's rows are read before they are overwritten)
    or None for no gradient. ``window`` carries the causal window from earlier rows (the
    fused-linear loss walks token chunks); by default a new one over ``batch.starts``. Returns
    ``[N]`` rows: ``per_row`` (unnormalised ``m·[kd·w·D + ce·CE]``), ``w`` (``m·w``), and the
    statistics of SPEC §7.
    """
    divergence, T, beta = cfg.effective_divergence, cfg.temperature, cfg.beta
    stats_fn, grad_fn, grad_row = CHUNK_FUNCTIONS[divergence]
    if compile:
        stats_fn, grad_fn = compiled_pair(stats_fn, grad_fn)
    with_ce = cfg.ce_weight > 0
    in_place = grad_out is batch.s
    window = window if window is not None else CausalWindowMean(batch.starts, 2)
    scale = overflow_scale(batch.vocab)
    parts = []
    for r0, r1, s, u in batch.chunks(chunk_rows):
        # detached views: the student logits may require grad, and that must not be a graph variant
        s, u, y, valid = s.detach(), u.detach(), batch.labels[r0:r1], batch.valid[r0:r1]
        rows = stats_fn(s, u, y, T, beta, with_ce and T != 1.0, scale)
        lse_untempered = rows.get("lse_untempered_parts", rows["lse_s_parts"])
        # CE = (max s - s[y]) + log Σ exp(s - max s): inf only where the true value is beyond fp32's range
        ce = (lse_untempered[:, 0] - s.gather(1, y[:, None]).squeeze(-1).to(lse_untempered.dtype)) + \
            lse_untempered[:, 1] if with_ce else 0.0
        weigh_rows(rows, valid, window, cfg, grad_scale)
        rows["per_row"] = row_loss(rows, ce, valid, cfg)
        poison_gradient(rows, valid)
        if grad_out is not None:
            # written over the logits: pass the one chunk view as both, never two views of one buffer
            # (aliased inputs of a compiled function that writes one of them come out wrong)
            target = s if in_place else grad_out[r0:r1]
            grad_fn(target, s, u, y, valid, rows[grad_row], rows["lse_s_parts"], rows["lse_u_parts"], lse_untempered,
                    rows["coef_kd"], rows["coef_ce"], T, beta, with_ce)
        parts.append(rows)
    return concat_rows(parts, torch.promote_types(batch.s.dtype, torch.float32), batch.s.device)
