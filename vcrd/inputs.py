"""Input checks and the row view every implementation works on (SPEC §1).

Every check runs before any pass over the logits and raises ``TypeError``/``ValueError`` naming the
argument, what was expected and what was given. The result, :class:`RowBatch`, holds ``[N, V]``
views (no copies) of both logits restricted to the shared vocabulary, safe labels, the valid-row
mask and the first row of each row's causal window.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Optional, Tuple

import torch

from .config import VCRDConfig
from .windows import sequence_ids, window_starts

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
REDUCTIONS = ("mean", "sum", "none")


@dataclass
class RowBatch:
    """Logits as rows: ``s, u`` are views (never copies) restricted to the shared vocabulary,
    ``[N, V]``, or ``[B, T, V]`` when the input's rows cannot be flattened without a copy (a shifted
    ``logits[:, :-1]``); ``labels [N]`` (ignored rows set to 0), ``valid [N]``, ``starts [N]``
    (window starts), ``shape`` (the labels' shape), ``n_valid`` (a Python int)."""

    s: torch.Tensor
    u: torch.Tensor
    labels: torch.Tensor
    valid: torch.Tensor
    starts: torch.Tensor
    shape: torch.Size
    n_valid: int

    @property
    def vocab(self) -> int:
        return self.s.shape[-1]

    def chunks(self, rows: int) -> Iterator[Tuple[int, int, torch.Tensor, torch.Tensor]]:
        """``(r0, r1, s, u)`` for consecutive chunks of at most ``rows`` rows, in row order; ``s, u``
        are ``[r1 - r0, V]`` views. With ``[B, T, V]`` views a chunk never crosses a sequence."""
        if self.s.dim() == 2:
            blocks = [(0, self.s, self.u)]
        else:
            T = self.s.shape[1]
            blocks = [(b * T, self.s[b], self.u[b]) for b in range(self.s.shape[0])]
        for base, s, u in blocks:
            for c0 in range(0, s.shape[0], rows):
                c1 = min(s.shape[0], c0 + rows)
                yield base + c0, base + c1, s[c0:c1], u[c0:c1]


def _rows_view(x: torch.Tensor, V: int) -> Optional[torch.Tensor]:
    """``x[..., :V]`` as an ``[N, V]`` view, or None when that would need a copy."""
    x = x[..., :V]
    try:
        return x.view(-1, V)
    except RuntimeError:
        return None


def _tensor(name: str, value, kinds: str) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(value).__name__}")
    if kinds == "float" and value.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name}: expected a float32, bfloat16, float16 or float64 tensor, got {value.dtype}")
    if kinds == "int" and (value.dtype.is_floating_point or value.dtype.is_complex or value.dtype == torch.bool):
        raise TypeError(f"{name}: expected an integer tensor (int64), got {value.dtype}")
    return value


def check_logits(student_logits, teacher_logits, vocab_size: Optional[int]) -> int:
    """Check both logits tensors and the vocabulary; return the vocabulary size V used."""
    s = _tensor("student_logits", student_logits, "float")
    u = _tensor("teacher_logits", teacher_logits, "float")
    if s.dim() not in (2, 3):
        raise ValueError(f"student_logits: expected shape [N, V] or [B, T, V], got {tuple(s.shape)}")
    if u.shape[:-1] != s.shape[:-1] or u.dim() != s.dim():
        raise ValueError(f"teacher_logits: expected leading shape {tuple(s.shape[:-1])} like student_logits, "
                         f"got {tuple(u.shape)}")
    if u.requires_grad:
        raise ValueError("teacher_logits: the teacher must not require grad (compute it under torch.no_grad() "
                         "or pass teacher_logits.detach())")
    if u.device != s.device:
        raise ValueError(f"teacher_logits: expected device {s.device} like student_logits, got {u.device}")
    return check_vocab(s.shape[-1], u.shape[-1], vocab_size)


def check_vocab(v_student: int, v_teacher: int, vocab_size: Optional[int]) -> int:
    """The shared vocabulary V (SPEC §1): both sizes if equal, else ``vocab_size`` (required)."""
    if vocab_size is None:
        if v_student != v_teacher:
            raise ValueError(f"vocab_size: student vocabulary {v_student} != teacher vocabulary {v_teacher}; "
                             f"pass vocab_size=V with V <= {min(v_student, v_teacher)} to compare columns 0..V-1")
        return v_student
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int):
        raise TypeError(f"vocab_size: expected an int, got {type(vocab_size).__name__}")
    if not 1 <= vocab_size <= min(v_student, v_teacher):
        raise ValueError(f"vocab_size: expected 1 <= vocab_size <= {min(v_student, v_teacher)}, got {vocab_size}")
    return vocab_size


def check_options(reduction: str, impl: str, num_items_in_batch, cfg: VCRDConfig, impls) -> None:
    """Check the call options that are not tensors."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction: expected one of {REDUCTIONS}, got {reduction!r}")
    if impl not in impls:
        raise ValueError(f"impl: expected one of {tuple(impls)}, got {impl!r}")
    if num_items_in_batch is None:
        return
    if reduction != "mean":
        raise ValueError(f"num_items_in_batch: only applies to reduction='mean', got reduction={reduction!r}")
    value = num_items_in_batch.item() if isinstance(num_items_in_batch, torch.Tensor) else num_items_in_batch
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        raise ValueError(f"num_items_in_batch: expected a number >= 0, got {num_items_in_batch!r}")


def rows_of(labels_shape: torch.Size, labels: torch.Tensor, step_ids: Optional[torch.Tensor],
            cu_seqlens: Optional[torch.Tensor], cfg: VCRDConfig, V: int):
    """Check labels, step ids and cu_seqlens for rows shaped ``labels_shape``; return
    ``(labels [N] with ignored rows set to 0, valid [N], starts [N], n_valid)``."""
    device = labels.device
    y = labels.reshape(-1)
    N = y.numel()
    valid = y != cfg.ignore_index
    if N:
        bad = valid & ((y < 0) | (y >= V))
        if bool(bad.any()):
            r = int(bad.nonzero()[0, 0])
            raise ValueError(f"labels: expected values in [0, {V}) or ignore_index={cfg.ignore_index}, "
                             f"got {int(y[r])} at flat row {r}")
    batch = labels_shape[0] if len(labels_shape) == 2 else None
    if cu_seqlens is not None:
        _tensor("cu_seqlens", cu_seqlens, "int")
        if batch is not None:
            raise ValueError("cu_seqlens: only for packed [N, V] inputs; [B, T, V] inputs have one sequence per b")
        cu = cu_seqlens.to(device=device, dtype=torch.int64)
        if cu.dim() != 1 or cu.numel() < 2 or int(cu[0]) != 0 or int(cu[-1]) != N or bool((cu[1:] < cu[:-1]).any()):
            raise ValueError(f"cu_seqlens: expected a 1-D non-decreasing tensor from 0 to N={N}, "
                             f"got {cu_seqlens.tolist() if cu_seqlens.numel() <= 16 else tuple(cu_seqlens.shape)}")
        cu_seqlens = cu
    seq = sequence_ids(N, batch, cu_seqlens, device)
    if step_ids is not None:
        _tensor("step_ids", step_ids, "int")
        if step_ids.shape != labels_shape:
            raise ValueError(f"step_ids: expected shape {tuple(labels_shape)} like labels, got {tuple(step_ids.shape)}")
        steps = step_ids.reshape(-1).to(device=device, dtype=torch.int64)
        drops = (steps[1:] < steps[:-1]) & (seq[1:] == seq[:-1])
        if bool(drops.any()):
            r = int(drops.nonzero()[0, 0]) + 1
            raise ValueError(f"step_ids: expected non-decreasing values within each sequence, "
                             f"got {int(steps[r - 1])} then {int(steps[r])} at flat row {r}")
        step_ids = steps
    starts = window_starts(seq, step_ids, cfg.window_steps)
    return torch.where(valid, y, 0), valid, starts, int(valid.sum())


def prepare(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
            step_ids: Optional[torch.Tensor], cu_seqlens: Optional[torch.Tensor], cfg: VCRDConfig,
            vocab_size: Optional[int]) -> RowBatch:
    """All checks of SPEC §1 on logits-level inputs, then the row view."""
    V = check_logits(student_logits, teacher_logits, vocab_size)
    _tensor("labels", labels, "int")
    lead = student_logits.shape[:-1]
    if labels.shape != lead:
        raise ValueError(f"labels: expected shape {tuple(lead)} like the logits' leading dims, "
                         f"got {tuple(labels.shape)}")
    if labels.device != student_logits.device:
        raise ValueError(f"labels: expected device {student_logits.device} like student_logits, got {labels.device}")
    y, valid, starts, n_valid = rows_of(labels.shape, labels, step_ids, cu_seqlens, cfg, V)
    s, u = _rows_view(student_logits, V), _rows_view(teacher_logits, V)
    if s is None or u is None:  # keep [B, T, V] views: flattening them would copy N·V elements
        s, u = student_logits[..., :V], teacher_logits[..., :V]
    return RowBatch(s, u, y, valid, starts, labels.shape, n_valid)

