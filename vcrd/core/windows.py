"""Causal local windows over token rows (SPEC §5), in O(N) with prefix sums.

The window of row r (sequence b, step i = step_ids[r]) is
``W_r = {j in b : j <= r, step_ids[j] >= i - k, j not ignored}``. Because step ids never decrease
along a sequence, the rows ``j <= r`` with ``step_ids[j] >= i - k`` form one contiguous range
``[start_r, r]``, so a window mean is a difference of two prefix sums divided by a difference of
two prefix counts. ``start`` depends only on the layout and the step ids, never on the logits, so
it is computed once, before any sweep over the vocabulary.
"""

from __future__ import annotations

from typing import Optional

import torch

STEP_SPAN = 2**32  # step ids within one sequence span fewer values than this (checked by vcrd.core.checks)


def sequence_ids(n_rows: int, batch: Optional[int], cu_seqlens: Optional[torch.Tensor],
                 device: torch.device) -> torch.Tensor:
    """The sequence index of every row, ``[N]`` int64.

    ``batch`` is B for ``[B, T]`` inputs (row r belongs to sequence ``r // T``); ``cu_seqlens``
    ``[S+1]`` gives packed boundaries; with neither, all rows form one sequence.
    """
    if cu_seqlens is not None:  # output_size given: no host sync for the output's length
        lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).to(device=device, dtype=torch.int64)
        return torch.repeat_interleave(torch.arange(len(lengths), device=device), lengths, output_size=n_rows)
    if batch is not None:
        return torch.arange(n_rows, device=device) // (n_rows // batch)
    return torch.zeros(n_rows, dtype=torch.int64, device=device)


def positions_in_sequence(seq: torch.Tensor) -> torch.Tensor:
    """Position of each row within its sequence (0, 1, 2, ... restarting at each new sequence)."""
    n = seq.numel()
    idx = torch.arange(n, device=seq.device)
    is_first = torch.ones(n, dtype=torch.bool, device=seq.device)
    is_first[1:] = seq[1:] != seq[:-1]
    first_index = torch.cummax(torch.where(is_first, idx, 0), dim=0).values
    return idx - first_index


def window_starts(seq: torch.Tensor, step_ids: Optional[torch.Tensor],
                  window_steps: Optional[int]) -> torch.Tensor:
    """First row of each row's causal window, ``[N]`` int64 (the window is ``[start_r, r]``).

    ``window_steps=None`` gives the row alone; without ``step_ids`` every token is its own step,
    so ``k`` counts tokens. Rows must be grouped by sequence, step ids non-decreasing within one.
    """
    n = seq.numel()
    idx = torch.arange(n, device=seq.device)
    if window_steps is None:
        return idx
    steps = positions_in_sequence(seq) if step_ids is None else step_ids.reshape(-1).to(torch.int64)
    if n == 0:
        return idx
    # Order rows by (sequence, step) with one integer key: steps relative to the sequence's first
    # step are >= 0 and < STEP_SPAN, so key = seq * STEP_SPAN + rel is sorted along the rows (a
    # constant span: no host sync on the data)
    rel = relative_steps(seq, steps)
    key = seq * STEP_SPAN + rel
    target = seq * STEP_SPAN + (rel - window_steps).clamp_min(0)
    return torch.searchsorted(key, target, right=False)


def relative_steps(seq: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
    """Each row's step minus its sequence's first step (``[N]``; rows grouped by sequence)."""
    return steps - steps[torch.searchsorted(seq, seq, right=False)]


class CausalWindowMean:
    """Streaming window means: push rows in order, get each pushed row's mean over its window.

    ``starts`` ``[N]`` comes from :func:`window_starts`. ``push(values [C, K], valid [C])`` for the
    next C rows returns ``[C, K]`` means of ``values`` over the valid rows of each window (0 where
    a window holds no valid row). Prefix sums are float64, so long sequences lose no precision.
    Non-finite values are counted apart from the finite sums, so a NaN or an infinity reaches
    exactly the windows that contain it (a window with a NaN, or with both infinities, is NaN;
    one with an infinity is that infinity), never a later window through the prefix sums.
    """

    def __init__(self, starts: torch.Tensor, width: int) -> None:
        n = starts.numel()
        self.starts = starts
        # per prefix: the finite sum, then counts of NaN, +inf and -inf, per column; and valid rows
        self.sums = torch.zeros(4, n + 1, width, dtype=torch.float64, device=starts.device)
        self.counts = torch.zeros(n + 1, dtype=torch.float64, device=starts.device)
        self.next_row = 0

    def push(self, values: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        c0, c1 = self.next_row, self.next_row + values.shape[0]
        if c1 > self.starts.numel():
            raise ValueError(f"push: {c1} rows pushed into windows over {self.starts.numel()} rows")
        x = values.to(torch.float64)
        keep = valid[:, None]  # a NaN in an ignored row stays out
        parts = torch.stack([torch.where(keep & x.isfinite(), x, 0.0), (keep & x.isnan()).double(),
                             (keep & (x == torch.inf)).double(), (keep & (x == -torch.inf)).double()])
        self.sums[:, c0 + 1:c1 + 1] = self.sums[:, c0:c0 + 1] + torch.cumsum(parts, 1)
        self.counts[c0 + 1:c1 + 1] = self.counts[c0] + torch.cumsum(valid.to(torch.float64), 0)
        self.next_row = c1
        start = self.starts[c0:c1]
        total, nan, pos, neg = self.sums[:, c0 + 1:c1 + 1] - self.sums[:, start]
        count = self.counts[c0 + 1:c1 + 1] - self.counts[start]
        mean = total / count.clamp_min(1.0)[:, None]
        mean = torch.where(pos > 0, torch.inf, torch.where(neg > 0, -torch.inf, mean))
        mean = torch.where((nan > 0) | ((pos > 0) & (neg > 0)), torch.nan, mean)
        return mean.to(values.dtype)


def window_means(values: torch.Tensor, valid: torch.Tensor, starts: torch.Tensor) -> torch.Tensor:
    """All window means at once: ``values [N, K]``, ``valid [N]``, ``starts [N]`` → ``[N, K]``."""
    return CausalWindowMean(starts, values.shape[1]).push(values, valid)
