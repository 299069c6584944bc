"""vcrd.select.threads.map_batches: results in input order, each batch under inference mode with one
intra-op thread in the workers, the caller's thread count untouched, errors raised in the caller."""

from __future__ import annotations

import threading

import pytest
import torch

from vcrd.select.threads import map_batches


def _probe(x: int):
    return (x * x, torch.is_inference_mode_enabled(), torch.get_num_threads(), threading.current_thread().name)


@pytest.mark.parametrize("workers", [1, 2, 3])
def test_results_in_order_one_intra_op_thread_each(workers):
    before = torch.get_num_threads()
    out = list(map_batches(_probe, range(20), workers))
    assert [o[0] for o in out] == [x * x for x in range(20)]
    assert all(o[1] for o in out)  # inference mode inside every batch
    if workers > 1:
        assert {o[2] for o in out} == {1} and all(o[3].startswith("vcrd-batch") for o in out)
    else:
        assert {o[3] for o in out} == {threading.current_thread().name}
    assert torch.get_num_threads() == before


def test_two_batches_run_at_the_same_time():
    meet = threading.Barrier(2, timeout=10)  # broken (an error) unless two batches wait here together

    def rendezvous(x):
        meet.wait()
        return x

    assert list(map_batches(rendezvous, range(4), 2)) == [0, 1, 2, 3]


def test_same_tensors_as_a_plain_loop():
    torch.manual_seed(0)
    layer = torch.nn.Linear(64, 48)
    batches = [torch.randn(n, 64) for n in (5, 300, 17, 129)]
    with torch.inference_mode():
        want = [layer(b) for b in batches]
    got = list(map_batches(layer, batches, 2))
    assert all(torch.allclose(g, w, rtol=1e-6, atol=1e-6) for g, w in zip(got, want))
    assert not got[0].requires_grad


def test_an_error_in_a_batch_is_raised_in_the_caller():
    def fail_on_7(x):
        if x == 7:
            raise ValueError("batch 7 is bad")
        return x

    for workers in (1, 2):
        seen = []
        with pytest.raises(ValueError, match="batch 7 is bad"):
            for r in map_batches(fail_on_7, range(100), workers):
                seen.append(r)
        assert seen == list(range(7))


def test_stopping_early_and_bad_workers():
    assert next(iter(map_batches(_probe, range(1000), 2)))[0] == 0  # abandoned generator: no hang
    with pytest.raises(ValueError, match="workers: expected an int >= 1, got 0"):
        list(map_batches(_probe, range(3), 0))
