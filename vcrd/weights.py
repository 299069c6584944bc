"""The detached per-row weights of SPEC §4–5 from per-row statistics (shared by every fast path)."""

from __future__ import annotations

from typing import Dict

import torch

from .config import VCRDConfig
from .windows import CausalWindowMean


def row_weights(rows: Dict[str, torch.Tensor], valid: torch.Tensor, window: CausalWindowMean,
                cfg: VCRDConfig) -> Dict[str, torch.Tensor]:
    """``g, w_val, n, w_dc`` for the next rows of ``window`` (which they are pushed into).

    ``rows`` holds ``[C]`` tensors ``lq_as, lq_au, CE_su, H_u, lp_s, lp_u``.
    ``g = lq_au - lq_as`` (argmax) or ``CE_su - H_u`` (expected); ``w_val = floor + (1-floor)·σ((g-margin)/tau)``;
    ``n``, ``lbar`` = window means of ``lp_s`` and ``lp_s - lp_u``; ``w_dc = σ((lbar - bias)/tau_c)``.
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
    means = window.push(torch.stack([rows["lp_s"], rows["lp_s"] - rows["lp_u"]], 1), valid)
    n, lbar = means[:, 0], means[:, 1]
    w_dc = torch.sigmoid((lbar - cfg.correction_bias) / cfg.correction_tau) if cfg.correction else torch.ones_like(g)
    return dict(g=g, w_val=w_val, n=n, w_dc=w_dc)
