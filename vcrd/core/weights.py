"""From per-row statistics to per-row outputs (SPEC §4–6), shared by every backend.

A backend sweeps the logits for the statistics of SPEC §2 (``[C]`` rows); :func:`weigh_rows` turns
them, in row order, into the detached weights and the two gradient coefficients the backend's
gradient sweep needs, and :func:`row_loss` into the unnormalised per-row loss.
"""

from __future__ import annotations

from typing import Dict, List, Union

import torch

from .config import VCRDConfig
from .windows import CausalWindowMean

Rows = Dict[str, torch.Tensor]
# what a backend returns per row: the loss parts of SPEC §6 and the statistics of SPEC §7
OUTPUT_ROWS = ("per_row", "w", "D", "w_val", "w_dc", "g", "n", "lp_s", "lp_u", "agree")
LOG_RATIO_CLAMP = 50.0


def support_log_ratio(lp_s: torch.Tensor, lp_u: torch.Tensor) -> torch.Tensor:
    """``l = clamp(lp_s - lp_u, -50, 50)``, and 0 where both are ``-inf`` (SPEC §5): a label that one
    model masks must not poison every later window. NaN stays NaN."""
    both_masked = (lp_s == -torch.inf) & (lp_u == -torch.inf)
    return torch.where(both_masked, 0.0, (lp_s - lp_u).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))


def label_log_ratio(lp_s: torch.Tensor, lp_u: torch.Tensor, s_y: torch.Tensor, u_y: torch.Tensor,
                    lse_s: torch.Tensor, lse_u: torch.Tensor, temperature: float) -> torch.Tensor:
    """:func:`support_log_ratio`, also where both label log-probs overflowed fp32 to ``-inf`` (true
    values below -3.4·10³⁸) although a label logit ``s_y``/``u_y`` is finite: there ``lp_s - lp_u =
    (s_y - u_y)/T - (lse_s - lse_u)`` is taken on halves (finite whenever |l| could be below the clamp)."""
    lost = (lp_s == -torch.inf) & (lp_u == -torch.inf) & ((s_y > -torch.inf) | (u_y > -torch.inf))
    halves = ((s_y.to(lse_s.dtype) * 0.5 - u_y.to(lse_s.dtype) * 0.5) / temperature - (lse_s * 0.5 - lse_u * 0.5)) * 2
    return torch.where(lost, halves.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP), support_log_ratio(lp_s, lp_u))


def row_weights(rows: Rows, valid: torch.Tensor, window: CausalWindowMean, cfg: VCRDConfig) -> Rows:
    """``g, w_val, n, w_dc`` for the next rows of ``window`` (which they are pushed into).

    ``rows`` holds ``[C]`` tensors ``lq_as, lq_au, CE_su, H_u, lp_s, lp_u``, and ``log_ratio`` (``l``,
    :func:`label_log_ratio`) when the backend computed it (else ``l`` comes from ``lp_s, lp_u``).
    ``g = lq_au - lq_as`` (argmax) or ``CE_su - H_u`` (expected); ``w_val = floor + (1-floor)·σ((g-margin)/tau)``;
    ``n``, ``lbar`` = window means of ``lp_s`` and ``l``; ``w_dc = σ((lbar - bias)/tau_c)``.
    """
    if cfg.validity == "argmax":
        g = rows["lq_au"] - rows["lq_as"]
    elif cfg.validity == "expected":
        g = rows["CE_su"] - rows["H_u"]
    else:
        g = torch.zeros_like(rows["lp_s"])
    if cfg.validity is None:
        w_val = torch.ones_like(g)
    else:
        sig = torch.sigmoid((g - cfg.validity_margin) / cfg.validity_tau)
        w_val = cfg.validity_floor + (1 - cfg.validity_floor) * sig
    log_ratio = rows["log_ratio"] if "log_ratio" in rows else support_log_ratio(rows["lp_s"], rows["lp_u"])
    means = window.push(torch.stack([rows["lp_s"], log_ratio], 1), valid)
    naturalness, lbar = means[:, 0], means[:, 1]
    w_dc = torch.sigmoid((lbar - cfg.correction_bias) / cfg.correction_tau) if cfg.correction else torch.ones_like(g)
    return dict(g=g, w_val=w_val, n=naturalness, w_dc=w_dc)


def weigh_rows(rows: Rows, valid: torch.Tensor, window: CausalWindowMean, cfg: VCRDConfig,
               grad_scale: float) -> Rows:
    """Add the weights and the gradient coefficients of SPEC §6 to a chunk's statistics ``rows``
    (in place; returned).

    Adds ``g, w_val, n, w_dc``; ``w = m·w_val·w_dc``; ``coef_kd = m·grad_scale·kd·w`` and
    ``coef_ce = m·grad_scale·ce_w``, the factors of ``∂D/∂s`` and of ``softmax(s) - onehot(y)`` in the
    gradient. Ignored rows get 0; a NaN in a valid row stays NaN everywhere it reaches (SPEC §6).
    """
    rows.update(row_weights(rows, valid, window, cfg))
    w = rows["w_val"] * rows["w_dc"]
    rows["w"] = torch.where(valid, w, 0.0)
    rows["coef_kd"] = torch.where(valid, grad_scale * cfg.kd_weight * w, 0.0)
    rows["coef_ce"] = valid.to(w.dtype) * (grad_scale * cfg.ce_weight)
    return rows


def row_loss(rows: Rows, ce: Union[torch.Tensor, float], valid: torch.Tensor, cfg: VCRDConfig) -> torch.Tensor:
    """The unnormalised per-row loss ``m·[kd·w·D + ce_w·CE]`` of SPEC §6 (``[C]``), from weighed rows;
    ``ce`` is ``CE_r = -log softmax(s)[y]`` (``[C]``, or 0.0 when ``ce_weight`` is 0)."""
    return torch.where(valid, cfg.kd_weight * rows["w_val"] * rows["w_dc"] * rows["D"] + cfg.ce_weight * ce, 0.0)


def poison_gradient(rows: Rows, valid: torch.Tensor) -> Rows:
    """SPEC §6, never a finite gradient beside a non-finite loss: valid rows whose ``per_row`` loss is
    ``inf`` or NaN get NaN gradient coefficients ``coef_kd``, ``coef_ce`` (their whole gradient row
    becomes NaN). In place; returned."""
    bad = valid & ~rows["per_row"].isfinite()
    for name in ("coef_kd", "coef_ce"):
        rows[name] = torch.where(bad, torch.nan, rows[name])
    return rows


def concat_rows(parts: List[Rows], dtype: torch.dtype, device: torch.device) -> Rows:
    """The :data:`OUTPUT_ROWS` of consecutive chunks joined into ``[N]`` rows (empty when no chunk)."""
    if not parts:
        return {k: torch.zeros(0, dtype=torch.bool if k == "agree" else dtype, device=device) for k in OUTPUT_ROWS}
    return {k: torch.cat([r[k] for r in parts]) for k in OUTPUT_ROWS}
