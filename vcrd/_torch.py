"""The CPU fast path: rows in chunks, loss and gradient computed together in the forward pass.

Per chunk of rows, in order: (1) statistics sweep over the chunk's logits (both LSEs, label
log-probs, argmaxes and the teacher's judgement of them, H_u, CE_su, D); (2) the weights, from
the causal window whose prefix sums carry across chunks (SPEC §5: the window is causal, so the
chunk's weights are final once its own rows are in); (3) gradient sweep writing the chunk's rows
of ``∂L/∂s`` (unnormalised; the backward scales by ``grad_output / Z``). The chunk is still in
cache for (3). The per-chunk math is plain tensor code that ``torch.compile`` can fuse
(``compile=True`` / ``VCRD_COMPILE=1``); the only ``[N, V]`` buffer is the gradient itself.
"""

from __future__ import annotations

import functools
import math
from typing import Dict, Optional

import torch

from .config import VCRDConfig
from .inputs import RowBatch
from .weights import row_weights
from .windows import CausalWindowMean

Rows = Dict[str, torch.Tensor]


def _plogr(w: torch.Tensor, log_ratio: torch.Tensor) -> torch.Tensor:
    return torch.where(w > 0, w * log_ratio, 0.0)


def _log_mixture(logp: torch.Tensor, logq: torch.Tensor, beta: float) -> torch.Tensor:
    return torch.logaddexp(logq + math.log(beta), logp + math.log1p(-beta))


def chunk_stats(s: torch.Tensor, u: torch.Tensor, y: torch.Tensor, temperature: float,
                divergence: str, beta: float, need_lse1: bool) -> Rows:
    """One sweep over a chunk ``s, u [C, V]``, ``y [C]`` (ignored rows: any in-range label).

    Returns ``[C]`` fp32 rows: ``lse_s, lse_u, lp_s, lp_u, lq_as, lq_au, H_u, CE_su, D, agree``
    and ``lse1`` (untempered student LSE, for CE) when ``need_lse1``. Sums are taken against the
    row maxima (``e = exp((x - max)/T)``) so one read after the max gives every statistic; the
    log-ratio inside a sum is ``d = (u - s)/T - (max u - max s)/T``, small when the models agree.
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
    xs, zs = (x - mx) / temperature, (z - mz) / temperature  # tempered, shifted: <= 0
    es, eu = xs.exp(), zs.exp()
    Ss, Su = es.sum(-1), eu.sum(-1)
    log_Ss, log_Su = Ss.log(), Su.log()
    lse_s, lse_u = mx.squeeze(-1) / temperature + log_Ss, mz.squeeze(-1) / temperature + log_Su
    logq_row = lambda idx: zs.gather(1, idx).squeeze(-1) - log_Su  # noqa: E731
    rows = dict(
        lse_s=lse_s, lse_u=lse_u,
        lp_s=xs.gather(1, y[:, None]).squeeze(-1) - log_Ss, lp_u=logq_row(y[:, None]),
        lq_as=logq_row(a_s), lq_au=logq_row(a_u), agree=(a_s == a_u).squeeze(-1),
        H_u=log_Su - _plogr(eu, zs).sum(-1) / Su,
        CE_su=log_Su - _plogr(es, zs).sum(-1) / Ss,
    )
    if divergence == "fkl":
        rows["D"] = _plogr(eu, zs - xs).sum(-1) / Su + log_Ss - log_Su
    elif divergence == "rkl":
        rows["D"] = _plogr(es, xs - zs).sum(-1) / Ss + log_Su - log_Ss
    else:
        logp, logq = xs - log_Ss[:, None], zs - log_Su[:, None]
        logm = _log_mixture(logp, logq, beta)
        kl_qm, kl_pm = _plogr(logq.exp(), logq - logm).sum(-1), _plogr(logp.exp(), logp - logm).sum(-1)
        rows["D"] = beta * kl_qm + (1 - beta) * kl_pm
    if need_lse1:
        rows["lse1"] = lse_s if temperature == 1.0 else mx.squeeze(-1) + torch.logsumexp(x - mx, -1)
    return rows


def chunk_grad(out: torch.Tensor, s: torch.Tensor, u: torch.Tensor, y: torch.Tensor, valid: torch.Tensor,
               lse_s: torch.Tensor, lse_u: torch.Tensor, lse1: Optional[torch.Tensor], D: torch.Tensor,
               coef_kd: torch.Tensor, coef_ce: torch.Tensor, temperature: float, divergence: str, beta: float) -> None:
    """Write ``coef_kd ⊙ ∂D/∂s + coef_ce ⊙ (softmax(s) - onehot(y))`` for a chunk into ``out [C, V]``
    (any float dtype; 0 in rows that are not valid, and where the value is subnormal).

    ``∂D/∂s`` is ``(p - q)/T`` (fkl), ``p ⊙ (log p - log q - D)/T`` (rkl),
    ``(1-β)/T · p ⊙ (log p - log m - KL(p‖m))`` (jsd, with ``m = βq + (1-β)p``).
    """
    dtype = torch.promote_types(s.dtype, torch.float32)
    logp = s.to(dtype) / temperature - lse_s[:, None]
    logq = u.to(dtype) / temperature - lse_u[:, None]
    p = logp.exp()
    if divergence == "fkl":
        dD = p - logq.exp()
    elif divergence == "rkl":
        dD = _plogr(p, logp - logq - D[:, None])
    else:
        logm = _log_mixture(logp, logq, beta)
        kl_pm = _plogr(p, logp - logm).sum(-1, keepdim=True)
        dD = (1 - beta) * _plogr(p, logp - logm - kl_pm)
    grad = (coef_kd / temperature)[:, None] * dD
    if lse1 is not None:
        p1 = (s.to(dtype) - lse1[:, None]).exp()
        grad = grad + coef_ce[:, None] * p1
        grad = grad.scatter_add(1, y[:, None], -coef_ce[:, None])
    # subnormal entries (|g| < smallest normal) become 0: they make CPU GEMMs on the gradient ~5× slower
    keep = valid[:, None] & (grad.abs() >= torch.finfo(dtype).tiny)
    out.copy_(torch.where(keep, grad, 0.0))


@functools.cache
def _compiled_kernels():
    """The two chunk functions under ``torch.compile`` (built on first use, never at import)."""
    return torch.compile(chunk_stats, dynamic=True), torch.compile(chunk_grad, dynamic=True)


def loss_and_grad(batch: RowBatch, cfg: VCRDConfig, grad_out: Optional[torch.Tensor], grad_scale: float,
                  chunk_rows: int, compile: bool, window: Optional[CausalWindowMean] = None) -> Rows:
    """Rows of SPEC §2–6 for a checked batch, writing ``grad_scale · ∂(Σ_r loss_r)/∂s`` into ``grad_out``.

    ``grad_out`` is ``[N, V]`` (a view of the student gradient, any float dtype; it may be ``s``
    itself, each chunk's rows are read before they are overwritten) or None for no gradient.
    ``window`` carries the causal window from earlier rows (the fused-linear loss walks token
    chunks); by default a new one over ``batch.starts``. Returns ``[N]`` rows: ``per_row``
    (unnormalised ``m·[kd·w·D + ce·CE]``), ``w`` (``m·w``), and the statistics of SPEC §7.
    """
    s, u, y, valid, starts = batch.s, batch.u, batch.labels, batch.valid, batch.starts
    N = s.shape[0]
    stats_fn, grad_fn = _compiled_kernels() if compile else (chunk_stats, chunk_grad)
    divergence, T, beta = cfg.effective_divergence, cfg.temperature, cfg.beta
    need_ce = cfg.ce_weight > 0
    window = window if window is not None else CausalWindowMean(starts, 2)
    parts = []
    for c0 in range(0, N, chunk_rows):
        c1 = min(N, c0 + chunk_rows)
        sc, uc, yc, vc = s[c0:c1], u[c0:c1], y[c0:c1], valid[c0:c1]
        rows = stats_fn(sc, uc, yc, T, divergence, beta, need_ce)
        rows.update(row_weights(rows, vc, window, cfg))
        w = rows["w_val"] * rows["w_dc"]
        coef_kd = torch.where(vc, grad_scale * cfg.kd_weight * w, 0.0)
        coef_ce = vc.to(w.dtype) * (grad_scale * cfg.ce_weight)
        ce = rows["lse1"] - sc.gather(1, yc[:, None]).squeeze(-1).to(w.dtype) if need_ce else 0.0
        rows["per_row"] = torch.where(vc, cfg.kd_weight * w * rows["D"] + cfg.ce_weight * ce, 0.0)
        rows["w"] = torch.where(vc, w, 0.0)
        if grad_out is not None:
            grad_fn(sc if grad_out is s else grad_out[c0:c1], sc, uc, yc, vc, rows["lse_s"], rows["lse_u"], rows.get("lse1"), rows["D"],
                                  coef_kd, coef_ce, T, divergence, beta)
        parts.append(rows)
    if not parts:
        empty = torch.zeros(0, dtype=torch.promote_types(s.dtype, torch.float32), device=s.device)
        return {k: empty for k in ("per_row", "w", "D", "w_val", "w_dc", "g", "n", "lp_s", "lp_u", "agree")}
    return {k: torch.cat([r[k] for r in parts]) for k in parts[0]}
