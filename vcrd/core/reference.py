"""SPEC.md in plain PyTorch: the oracle every fast path is tested against.

Readable over fast: full ``[N, V]`` log-softmaxes, windows built literally from their definition
(an ``[N, N]`` mask), autograd for the gradient. Works in float64. Inputs are assumed valid
(``vcrd.loss.functional`` checks them); shapes follow SPEC §1.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from typing_extensions import Unpack

from .checks import RowLayout
from .loss_options import ReferenceOptions, parse_options
from .stats import VCRDStats


def _plogr(w: torch.Tensor, log_ratio: torch.Tensor) -> torch.Tensor:
    """``w * log_ratio`` with the convention ``0 * anything = 0`` (so ``0 log 0`` terms vanish).

    The inner ``where`` keeps ``-inf - -inf`` out of the product, so its gradient is 0, not NaN."""
    zero = torch.zeros_like(w)
    return torch.where(w > 0, w * torch.where(w > 0, log_ratio, zero), zero)


def divergence(logp: torch.Tensor, logq: torch.Tensor, divergence: str, beta: float) -> torch.Tensor:
    """``D_r`` of SPEC §3 per row from student/teacher log-probs ``[N, V]`` → ``[N]``."""
    p, q = logp.exp(), logq.exp()
    if divergence == "jsd" and beta == 0.0:
        divergence = "fkl"
    if divergence == "jsd" and beta == 1.0:
        divergence = "rkl"
    if divergence == "fkl":
        return _plogr(q, logq - logp).sum(-1)
    if divergence == "rkl":
        return _plogr(p, logp - logq).sum(-1)
    m = beta * q + (1 - beta) * p
    logm = torch.where(m > 0, torch.log(torch.where(m > 0, m, torch.ones_like(m))), -torch.inf)
    return beta * _plogr(q, logq - logm).sum(-1) + (1 - beta) * _plogr(p, logp - logm).sum(-1)


def process_logits(z: torch.Tensor, scale: float, cap: Optional[float], dtype: torch.dtype) -> torch.Tensor:
    """``cap·tanh(scale·z/cap)`` (``scale·z`` without a cap) in ``dtype`` (SPEC §1); ``z`` itself for the
    defaults."""
    if scale == 1.0 and cap is None:
        return z
    z = scale * z.to(dtype)
    return z if cap is None else cap * torch.tanh(z / cap)


def rows_layout(shape: torch.Size, step_ids: Optional[torch.Tensor],
                cu_seqlens: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    """Sequence index and step index of every row, both ``[N]``, for rows shaped ``shape``."""
    if len(shape) == 2:
        B, T = shape
        seq = torch.arange(B).repeat_interleave(T)
        pos = torch.arange(T).repeat(B)
    else:
        bounds = [0, shape[0]] if cu_seqlens is None else cu_seqlens.tolist()
        seq = torch.cat([torch.full((e - b,), i) for i, (b, e) in enumerate(zip(bounds[:-1], bounds[1:]))])
        pos = torch.cat([torch.arange(e - b) for b, e in zip(bounds[:-1], bounds[1:])])
    steps = pos if step_ids is None else step_ids.reshape(-1).cpu()
    return seq, steps


def window_mask(seq: torch.Tensor, steps: torch.Tensor, valid: torch.Tensor,
                window_steps: Optional[int]) -> torch.Tensor:
    """``[N, N]`` bool, row r marks W_r: same sequence, ``j <= r``, step >= step_r - k, j valid."""
    n = seq.numel()
    j, r = torch.arange(n)[None, :], torch.arange(n)[:, None]
    if window_steps is None:
        inside = j == r
    else:
        inside = (j <= r) & (seq[None, :] == seq[:, None]) & (steps[None, :] >= steps[:, None] - window_steps)
    return inside & valid.cpu()[None, :]


def window_mean(W: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """``[N]`` means of ``values`` over each row's window (``W [N, N]`` bool), 0 for an empty window.

    Masked by selection, not by multiplication, so a non-finite value outside a window stays out."""
    total = torch.where(W, values[None, :], torch.zeros((), dtype=values.dtype)).sum(1)
    return total / W.sum(1).clamp_min(1)


def reduce_rows_reference(per_row: torch.Tensor, w: torch.Tensor, valid: torch.Tensor, shape: Tuple[int, ...],
                          reduction: str, normalize: str, num_items_in_batch, has_labels: bool) -> torch.Tensor:
    """SPEC §6 reductions of the ``[N]`` per-row losses (``w``: the rows' weights, for ``"weights"``)."""
    if reduction == "none":
        return per_row.reshape(shape)
    if reduction == "sum" or not valid.any():
        return per_row.sum()  # an all-ignored batch: 0, whatever num_items_in_batch is
    if reduction == "batchmean":  # TRL's: per valid token with labels, per sequence (leading dim) without
        count = num_items_in_batch if num_items_in_batch is not None else \
            valid.sum().clamp_min(1) if has_labels else max(shape[0], 1)
        return per_row.sum() / count
    if normalize == "weights":
        n_valid = valid.sum()
        Z = torch.where(valid, w, 0).sum().clamp_min(1e-6 * n_valid)
        if num_items_in_batch is not None:
            Z = Z / n_valid * num_items_in_batch
        return per_row.sum() / Z
    if num_items_in_batch is not None:
        return per_row.sum() / num_items_in_batch
    return per_row.sum() / valid.sum()


def vcrd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: Optional[torch.Tensor],
    **options: Unpack[ReferenceOptions],
):
    """The VCRD loss of SPEC §1–7, straight from the formulas (``options``: :class:`ReferenceOptions`, assumed
    valid). Returns ``loss`` or ``(loss, stats)``."""
    opts = parse_options("vcrd_loss", options, ReferenceOptions)
    cfg = opts.config
    V = opts.vocab_size if opts.vocab_size is not None else student_logits.shape[-1]
    s = student_logits.reshape(-1, student_logits.shape[-1])[:, :V]
    u = teacher_logits.reshape(-1, teacher_logits.shape[-1])[:, :V].detach()
    shape = student_logits.shape[:-1]
    # without labels every row counts (TRL's labels=None); the trace token is then undefined
    y = labels.reshape(-1) if labels is not None else torch.zeros(s.shape[0], dtype=torch.int64, device=s.device)
    valid = y != cfg.ignore_index if labels is not None else torch.ones_like(y, dtype=torch.bool)
    y_safe = torch.where(valid, y, torch.zeros_like(y))
    # ignored rows never matter (SPEC §6): whatever their logits hold (a NaN), they enter as zeros
    s = torch.where(valid[:, None], s, torch.zeros((), dtype=s.dtype, device=s.device))
    u = torch.where(valid[:, None], u, torch.zeros((), dtype=u.dtype, device=u.device))
    dtype = torch.promote_types(s.dtype, torch.float32)
    T = cfg.temperature
    # SPEC §1 logit post-processing: every formula below sees s' and u' (autograd gives the exact gradient)
    s = process_logits(s, cfg.student_logit_scale, cfg.student_softcap, dtype)
    u = process_logits(u, cfg.teacher_logit_scale, cfg.teacher_softcap, dtype)

    logp = torch.log_softmax(s.to(dtype) / T, dim=-1)
    logq = torch.log_softmax(u.to(dtype) / T, dim=-1)
    D = divergence(logp, logq, cfg.divergence, cfg.beta)
    # SPEC §6 NaN rule: a NaN in a row's logits makes its D NaN, and its gradient with it (the divergences'
    # 0·log 0 = 0 masking would otherwise hide a NaN teacher, or a NaN student under rkl/jsd)
    nan_row = s.isnan().any(-1) | u.isnan().any(-1)
    if bool(nan_row.any()):
        zero = torch.zeros((), dtype=dtype, device=D.device)
        poison = torch.where(nan_row, torch.full((), torch.nan, dtype=dtype, device=D.device), zero)
        D = D + torch.where(nan_row, s.to(dtype).sum(-1), zero) * poison  # other rows: + 0, gradient 0·0

    with torch.no_grad():
        lp_s = logp.gather(1, y_s := y_safe[:, None]).squeeze(1)
        lp_u = logq.gather(1, y_s).squeeze(1)
        a_s, a_u = s.argmax(-1), u.argmax(-1)
        lq_as = logq.gather(1, a_s[:, None]).squeeze(1)
        lq_au = logq.gather(1, a_u[:, None]).squeeze(1)
        H_u = -_plogr(logq.exp(), logq).sum(-1)
        CE_su = -_plogr(logp.exp(), logq).sum(-1)

        if cfg.validity == "argmax":
            g = lq_au - lq_as
        elif cfg.validity == "expected":
            g = CE_su - H_u
        else:
            g = torch.zeros_like(D)
        if cfg.validity is None:
            w_val = torch.ones_like(D)
        else:
            sig = torch.sigmoid((g - cfg.validity_margin) / cfg.validity_tau)
            w_val = cfg.validity_floor + (1 - cfg.validity_floor) * sig

        seq, steps = rows_layout(shape, opts.step_ids, opts.cu_seqlens)
        W = window_mask(seq, steps, valid, cfg.window_steps).to(s.device)
        # l_r: the support log-ratio, clamped; 0 when both models mask the label (SPEC §5)
        both_masked = (lp_s == -torch.inf) & (lp_u == -torch.inf)
        log_ratio = torch.where(both_masked, torch.zeros_like(lp_s), (lp_s - lp_u).clamp(-50, 50))
        n, lbar = window_mean(W, lp_s), window_mean(W, log_ratio)
        w_dc = torch.sigmoid((lbar - cfg.correction_bias) / cfg.correction_tau) if cfg.correction \
            else torch.ones_like(D)
        w = torch.where(valid, w_val * w_dc, torch.zeros_like(w_val))  # ignored rows: no path for a NaN

    per_row = cfg.kd_weight * w * D
    if cfg.ce_weight > 0:  # left out at 0, so a label masked in the student (CE = inf) stays finite
        CE = -torch.log_softmax(s.to(dtype), dim=-1).gather(1, y_safe[:, None]).squeeze(1)
        per_row = per_row + cfg.ce_weight * CE
    per_row = torch.where(valid, per_row, torch.zeros_like(per_row))

    loss = reduce_rows_reference(per_row, w, valid, shape, opts.reduction, cfg.normalize, opts.num_items_in_batch,
                                 labels is not None)
    if not opts.return_stats:
        return loss
    rows = dict(D=D, w_val=w_val, w_dc=w_dc, g=g, n=n, lp_s=lp_s, lp_u=lp_u, agree=a_s == a_u)
    layout = RowLayout(y_safe, valid, None, shape, int(valid.sum()), labels is not None)
    return loss, VCRDStats.from_rows(rows, layout)
