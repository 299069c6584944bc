"""Input checks and the row view every implementation works on (SPEC §1).

Every check runs before any pass over the logits and raises ``TypeError``/``ValueError`` naming the
argument, what was expected and what was given. The result, :class:`RowBatch`, holds ``[N, V]``
views (no copies) of both logits restricted to the shared vocabulary, safe labels, the valid-row
mask and the first row of each row's causal window.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator, Optional, Tuple, Union

import torch

from .config import VCRDConfig
from .windows import STEP_SPAN, relative_steps, sequence_ids, window_starts

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
REDUCTIONS = ("mean", "sum", "none", "batchmean")


@dataclass
class RowLayout:
    """Where each row stands: ``labels [N]`` (ignored rows set to 0), ``valid [N]``, ``starts [N]``
    (first row of each row's causal window), ``shape`` (the labels' shape), ``n_valid`` (a Python int;
    a 0-dim tensor when the values were not checked, so nothing waits for the device),
    ``has_labels`` (False when the caller passed none: every row counts)."""

    labels: torch.Tensor
    valid: torch.Tensor
    starts: torch.Tensor
    shape: torch.Size
    n_valid: Union[int, torch.Tensor]
    has_labels: bool = True


@dataclass
class RowBatch:
    """Logits as rows: ``s, u`` are views (never copies) restricted to the shared vocabulary,
    ``[N, V]``, or ``[B, T, V]`` when the input's rows cannot be flattened without a copy (a shifted
    ``logits[:, :-1]``); ``rows`` is the :class:`RowLayout` (labels, valid rows, window starts)."""

    s: torch.Tensor
    u: torch.Tensor
    rows: RowLayout

    labels = property(lambda self: self.rows.labels)
    valid = property(lambda self: self.rows.valid)
    starts = property(lambda self: self.rows.starts)
    shape = property(lambda self: self.rows.shape)
    n_valid = property(lambda self: self.rows.n_valid)

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


def rows_view(x: torch.Tensor, V: int) -> Optional[torch.Tensor]:
    """``x[..., :V]`` as an ``[N, V]`` view, or None when that would need a copy."""
    x = x[..., :V]
    try:
        return x.view(-1, V)
    except RuntimeError:
        return None


def check_tensor(name: str, value, kinds: str) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(value).__name__}")
    if kinds == "float" and value.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name}: expected a float32, bfloat16, float16 or float64 tensor, got {value.dtype}")
    if kinds == "int" and (value.dtype.is_floating_point or value.dtype.is_complex or value.dtype == torch.bool):
        raise TypeError(f"{name}: expected an integer tensor (int64), got {value.dtype}")
    return value


def check_logits(student_logits, teacher_logits, vocab_size: Optional[int]) -> int:
    """Check both logits tensors and the vocabulary; return the vocabulary size V used."""
    s = check_tensor("student_logits", student_logits, "float")
    u = check_tensor("teacher_logits", teacher_logits, "float")
    if s.dim() not in (2, 3):
        raise ValueError(f"student_logits: expected shape [N, V] or [B, T, V], got {tuple(s.shape)}")
    if u.shape[:-1] != s.shape[:-1] or u.dim() != s.dim():
        raise ValueError(f"teacher_logits: expected leading shape {tuple(s.shape[:-1])} like student_logits, "
                         f"got {tuple(u.shape)}")
    check_frozen("teacher_logits", u)
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


def check_fused_options(reduction: str, chunk_size) -> None:
    """The fused-linear losses' own options: ``reduction`` without ``"none"`` (per-row losses would need
    per-row upstream gradients before the weight GEMM), ``chunk_size`` ``"auto"`` or an int >= 1."""
    if reduction not in ("mean", "sum", "batchmean"):
        raise ValueError(f"reduction: expected 'mean', 'sum' or 'batchmean' for the fused-linear loss, "
                         f"got {reduction!r}")
    if chunk_size != "auto" and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size: expected 'auto' or an int >= 1, got {chunk_size!r}")


def check_options(reduction: str, impl: str, num_items_in_batch, cfg: VCRDConfig, impls,
                  check_values: bool = True) -> None:
    """Check the call options that are not tensors (a tensor ``num_items_in_batch``'s value only with
    ``check_values``: reading it waits for the device)."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction: expected one of {REDUCTIONS}, got {reduction!r}")
    if impl not in impls:
        raise ValueError(f"impl: expected one of {tuple(impls)}, got {impl!r}")
    if num_items_in_batch is None:
        return
    if reduction not in ("mean", "batchmean"):
        raise ValueError(f"num_items_in_batch: only applies to reduction='mean' or 'batchmean', "
                         f"got reduction={reduction!r}")
    if isinstance(num_items_in_batch, torch.Tensor):
        if num_items_in_batch.numel() != 1:  # the shape is known without waiting for the device
            raise ValueError(f"num_items_in_batch: expected a number or a one-element tensor (a count), got a tensor "
                             f"of shape {tuple(num_items_in_batch.shape)}")
        if not check_values:
            return
    value = num_items_in_batch.item() if isinstance(num_items_in_batch, torch.Tensor) else num_items_in_batch
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < math.inf:
        raise ValueError(f"num_items_in_batch: expected a finite number >= 0, got {num_items_in_batch!r}")


def check_labels(labels, lead_shape: torch.Size, device: torch.device, cfg: VCRDConfig) -> Optional[torch.Tensor]:
    """``labels``: an integer tensor shaped like the rows (``lead_shape``), on ``device``; or None (every
    row counts, as in TRL's ``generalized_jsd_loss(labels=None)``), allowed when the config needs no
    trace token (the correction weight and the CE term do)."""
    if labels is None:
        needs = [what for what, on in (("correction=True", cfg.correction), ("ce_weight > 0", cfg.ce_weight > 0))
                 if on]
        if needs:
            raise ValueError(f"labels: required with {' and '.join(needs)} (they use the trace token's log-prob); "
                             "pass labels, or use a config without them (e.g. config='kd')")
        return None
    check_tensor("labels", labels, "int")
    if labels.shape != lead_shape:
        raise ValueError(f"labels: expected shape {tuple(lead_shape)} like the inputs' leading dims, "
                         f"got {tuple(labels.shape)}")
    if labels.device != device:
        raise ValueError(f"labels: expected device {device} like the student's inputs, got {labels.device}")
    return labels


def check_frozen(name: str, t: Optional[torch.Tensor]) -> None:
    """The teacher's tensors never receive a gradient (SPEC §1)."""
    if t is not None and t.requires_grad:
        raise ValueError(f"{name}: the teacher must not require grad (compute it under torch.no_grad() "
                         f"or pass {name}.detach())")


def check_rows(labels: Optional[torch.Tensor], lead_shape: torch.Size, device: torch.device,
               step_ids: Optional[torch.Tensor], cu_seqlens: Optional[torch.Tensor], cfg: VCRDConfig,
               V: int, check_values: bool = True) -> RowLayout:
    """Check label values, step ids and cu_seqlens for rows shaped ``lead_shape``; return their layout.
    Without labels every row is valid (and the label-dependent statistics are undefined).

    ``check_values=False`` skips every check that reads tensor values (label range, cu_seqlens bounds and
    order, step ids non-decreasing and spanning < 2^32 per sequence) and leaves ``n_valid`` a 0-dim
    tensor: no host-device synchronisation (CUDA graphs, a larger compiled graph). The caller vouches
    for the values; wrong ones give wrong results or an indexing error, not a clear message."""
    labels_shape = lead_shape
    N = math.prod(lead_shape)
    if labels is None:
        y, valid = torch.zeros(N, dtype=torch.int64, device=device), torch.ones(N, dtype=torch.bool, device=device)
    else:
        y = labels.reshape(-1)
        valid = y != cfg.ignore_index
    if N and check_values:
        bad = valid & ((y < 0) | (y >= V))
        if bool(bad.any()):
            r = int(bad.nonzero()[0, 0])
            raise ValueError(f"labels: expected values in [0, {V}) or ignore_index={cfg.ignore_index}, "
                             f"got {int(y[r])} at flat row {r}")
    batch = labels_shape[0] if len(labels_shape) == 2 else None
    if cu_seqlens is not None:
        check_tensor("cu_seqlens", cu_seqlens, "int")
        if batch is not None:
            raise ValueError("cu_seqlens: only for packed [N, V] inputs; [B, T, V] inputs have one sequence per b")
        cu = cu_seqlens.to(device=device, dtype=torch.int64)
        if cu.dim() != 1 or cu.numel() < 2 or (
                check_values and (int(cu[0]) != 0 or int(cu[-1]) != N or bool((cu[1:] < cu[:-1]).any()))):
            raise ValueError(f"cu_seqlens: expected a 1-D non-decreasing tensor from 0 to N={N}, "
                             f"got {cu_seqlens.tolist() if cu_seqlens.numel() <= 16 else tuple(cu_seqlens.shape)}")
        cu_seqlens = cu
    seq = sequence_ids(N, batch, cu_seqlens, device)
    if step_ids is not None:
        check_tensor("step_ids", step_ids, "int")
        if step_ids.shape != labels_shape:
            raise ValueError(f"step_ids: expected shape {tuple(labels_shape)} like labels, got {tuple(step_ids.shape)}")
        steps = step_ids.reshape(-1).to(device=device, dtype=torch.int64)
        drops = (steps[1:] < steps[:-1]) & (seq[1:] == seq[:-1])
        if check_values and bool(drops.any()):
            r = int(drops.nonzero()[0, 0]) + 1
            raise ValueError(f"step_ids: expected non-decreasing values within each sequence, "
                             f"got {int(steps[r - 1])} then {int(steps[r])} at flat row {r}")
        span = int(relative_steps(seq, steps).max()) + 1 if check_values and N else 0
        if span > STEP_SPAN:
            raise ValueError(f"step_ids: expected fewer than {STEP_SPAN} steps within one sequence, got {span}")
        step_ids = steps
    starts = window_starts(seq, step_ids, cfg.window_steps)
    n_valid = int(valid.sum()) if check_values else valid.sum()
    return RowLayout(torch.where(valid, y, 0), valid, starts, labels_shape, n_valid, labels is not None)


def prepare(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
            step_ids: Optional[torch.Tensor], cu_seqlens: Optional[torch.Tensor], cfg: VCRDConfig,
            vocab_size: Optional[int], check_values: bool = True) -> RowBatch:
    """All checks of SPEC §1 on logits-level inputs (those reading tensor values only with
    ``check_values``: :func:`check_rows`), then the row view."""
    V = check_logits(student_logits, teacher_logits, vocab_size)
    lead, device = student_logits.shape[:-1], student_logits.device
    layout = check_rows(check_labels(labels, lead, device, cfg), lead, device, step_ids, cu_seqlens, cfg, V,
                        check_values)
    s, u = rows_view(student_logits, V), rows_view(teacher_logits, V)
    if s is None or u is None:  # keep [B, T, V] views: flattening them would copy N·V elements
        s, u = student_logits[..., :V], teacher_logits[..., :V]
    return RowBatch(s, u, layout)



def _float_tensor(name: str, value, dims) -> torch.Tensor:
    t = check_tensor(name, value, "float")
    if t.dim() not in dims:
        raise ValueError(f"{name}: expected {' or '.join(map(str, dims))} dimensions, got shape {tuple(t.shape)}")
    return t


def check_linear(student_hidden, student_weight, teacher_hidden, teacher_weight, student_bias, teacher_bias,
                 vocab_size: Optional[int]) -> int:
    """Check hidden states ``[N, H]``/``[B, T, H]``, LM heads ``[V, H]`` and biases ``[V]`` of both
    models (the teacher's frozen); return the shared vocabulary V."""
    h_s = _float_tensor("student_hidden", student_hidden, (2, 3))
    h_t = _float_tensor("teacher_hidden", teacher_hidden, (2, 3))
    if h_t.shape[:-1] != h_s.shape[:-1]:
        raise ValueError(f"teacher_hidden: expected leading shape {tuple(h_s.shape[:-1])} like student_hidden, "
                         f"got {tuple(h_t.shape)}")
    models = (("student", h_s, student_weight, student_bias), ("teacher", h_t, teacher_weight, teacher_bias))
    for who, h, weight, bias in models:
        w = _float_tensor(f"{who}_weight", weight, (2,))
        if w.shape[1] != h.shape[-1]:
            raise ValueError(f"{who}_weight: expected shape [V, {h.shape[-1]}] to match the hidden size, "
                             f"got {tuple(w.shape)}")
        if bias is not None and _float_tensor(f"{who}_bias", bias, (1,)).shape[0] != w.shape[0]:
            raise ValueError(f"{who}_bias: expected shape [{w.shape[0]}], got {tuple(bias.shape)}")
    for name, t in (("teacher_hidden", h_t), ("teacher_weight", teacher_weight), ("teacher_bias", teacher_bias)):
        check_frozen(name, t)
    devices = {t.device for t in (h_s, student_weight, h_t, teacher_weight)}
    if len(devices) > 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(map(str, devices))}")
    return check_vocab(student_weight.shape[0], teacher_weight.shape[0], vocab_size)
