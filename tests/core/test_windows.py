"""vcrd/core/windows.py (prefix sums, streaming) against the window definition written as a loop."""

from __future__ import annotations

import pytest
import torch

from vcrd.core.windows import CausalWindowMean, positions_in_sequence, sequence_ids, window_means, window_starts

from ..helpers import step_ids_for


def naive_means(values, valid, seq, steps, k):
    out = torch.zeros_like(values)
    for r in range(len(values)):
        members = [j for j in range(r + 1) if valid[j] and seq[j] == seq[r] and
                   (j == r if k is None else steps[j] >= steps[r] - k)]
        if members:
            out[r] = values[members].mean(0)
    return out


def packed(n_seq=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, 30, (n_seq,), generator=g)
    # the sequence ids written out by hand (row r belongs to sequence i when cu[i] <= r < cu[i + 1]), never
    # from the production sequence_ids (a mutation there would shape the oracle too)
    seq = torch.tensor([i for i, n in enumerate(lengths.tolist()) for _ in range(n)], dtype=torch.int64)
    steps = torch.cat([step_ids_for(int(n), seed=i) + 7 * i for i, n in enumerate(lengths)])
    return seq, steps


@pytest.mark.parametrize("k", [0, 1, 4, None], ids=["k0", "k1", "k4", "row"])
@pytest.mark.parametrize("with_steps", [True, False], ids=["steps", "tokens"])
def test_window_means_match_definition(k, with_steps):
    seq, steps = packed()
    N = len(seq)
    g = torch.Generator().manual_seed(3)
    values = torch.randn(N, 2, generator=g, dtype=torch.float64)
    valid = torch.rand(N, generator=g) > 0.25
    starts = window_starts(seq, steps if with_steps else None, k)
    want = naive_means(values, valid, seq, steps if with_steps else positions_in_sequence(seq), k)
    torch.testing.assert_close(window_means(values, valid, starts), want)


def test_streaming_in_chunks_equals_one_shot():
    seq, steps = packed(seed=5)
    N = len(seq)
    values = torch.randn(N, 2, dtype=torch.float64)
    valid = torch.rand(N) > 0.2
    starts = window_starts(seq, steps, 3)
    stream = CausalWindowMean(starts, 2)
    chunks = [stream.push(values[a:a + 7], valid[a:a + 7]) for a in range(0, N, 7)]
    torch.testing.assert_close(torch.cat(chunks), window_means(values, valid, starts))
    with pytest.raises(ValueError, match="push"):
        stream.push(values[:1], valid[:1])


def test_packed_sequence_ids_follow_cu_seqlens():
    cu = torch.tensor([0, 3, 3, 7, 8])  # lengths 3, 0 (an empty sequence), 4, 1
    assert sequence_ids(8, None, cu, torch.device("cpu")).tolist() == [0, 0, 0, 2, 2, 2, 2, 3]
    seq, steps = packed()  # the random layouts of the tests above, from their cu_seqlens
    lengths = torch.bincount(seq, minlength=4)
    cu = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
    assert torch.equal(sequence_ids(len(seq), None, cu, torch.device("cpu")), seq)


def test_batched_layout_and_positions():
    seq = sequence_ids(12, 3, None, torch.device("cpu"))
    assert seq.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert positions_in_sequence(seq).tolist() == [0, 1, 2, 3] * 3
    # tokens as steps, k = 1: each window is the row and the one before it in the same sequence
    assert window_starts(seq, None, 1).tolist() == [0, 0, 1, 2, 4, 4, 5, 6, 8, 8, 9, 10]


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
def test_non_finite_value_reaches_exactly_the_windows_that_hold_it(bad):
    """A NaN or infinity in one valid row shows up in the windows containing it and nowhere else:
    prefix sums must not carry it into later windows (or other sequences)."""
    seq, steps = packed(seed=7)
    N = len(seq)
    values = torch.randn(N, 2, dtype=torch.float64)
    valid = torch.ones(N, dtype=torch.bool)
    r_bad = N // 3
    values[r_bad, 0] = bad
    starts = window_starts(seq, steps, 2)
    want = naive_means(values, valid, seq, steps, 2)
    got = torch.cat([CausalWindowMean(starts, 2).push(values, valid)])
    holds = torch.tensor([bool(r_bad in range(int(starts[r]), r + 1)) for r in range(N)])
    assert holds.sum() >= 1 and (~holds).sum() >= 1
    torch.testing.assert_close(got[~holds], want[~holds])  # finite and exact elsewhere
    assert torch.isfinite(got[~holds]).all()
    torch.testing.assert_close(got[holds, 0], want[holds, 0], equal_nan=True)
    # ignored rows never matter, whatever they hold
    valid[r_bad] = False
    assert torch.isfinite(window_means(values, valid, starts)).all()
