"""Per-row statistics a call returns with ``return_stats=True`` (SPEC §7)."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Dict

import torch

ROW_FIELDS = ("D", "w_val", "w_dc", "g", "n", "lp_s", "lp_u", "agree")
LABEL_FIELDS = ("n", "lp_s", "lp_u")  # depend on the trace token


@dataclass
class VCRDStats:
    """Detached per-row tensors, each shaped like the labels; ignored rows hold 0 (``agree``: False).

    ``D`` divergence, ``w_val`` validity weight, ``w_dc`` correction weight, ``g`` validity gap,
    ``n`` local naturalness (window mean of ``lp_s``), ``lp_s``/``lp_u`` tempered log-probs of the
    label under student/teacher, ``agree`` whether both argmaxes match. ``valid`` marks the rows
    that count.
    """

    D: torch.Tensor
    w_val: torch.Tensor
    w_dc: torch.Tensor
    g: torch.Tensor
    n: torch.Tensor
    lp_s: torch.Tensor
    lp_u: torch.Tensor
    agree: torch.Tensor
    valid: torch.Tensor

    @classmethod
    def from_rows(cls, rows: Dict[str, torch.Tensor], layout) -> VCRDStats:
        """Zero the ignored rows, detach, and reshape ``[N]`` rows to the labels' shape (a
        :class:`vcrd.core.checks.RowLayout`). Without labels the label statistics (``lp_s``, ``lp_u``,
        ``n``) are undefined: NaN."""
        out = {}
        for name in ROW_FIELDS:
            value = rows[name].detach()
            if name in LABEL_FIELDS and not layout.has_labels:
                value = torch.full_like(value, torch.nan)
            zero = torch.zeros((), dtype=value.dtype, device=value.device)
            out[name] = torch.where(layout.valid, value, zero).reshape(layout.shape)
        return cls(**out, valid=layout.valid.reshape(layout.shape))

    def means(self) -> Dict[str, torch.Tensor]:
        """Batch means over the valid rows, as 0-dim tensors (no host sync); 0 if none are valid."""
        count = self.valid.sum().clamp_min(1)
        return {f.name: getattr(self, f.name).double().sum() / count for f in fields(self) if f.name != "valid"}
