"""vcrd.distributed.ranks on 2 gloo processes: a failure on one rank raises on every rank (same type, the
failing rank named), the group stays usable, and the small collectives return every rank's value."""

from __future__ import annotations

import re

import pytest
import torch

from vcrd.distributed.ranks import agreed, from_rank0, gather, launch_info, parameter_checksum, raised_together

from ..helpers import spawn, torchrun


def _worker(rank: int, world: int) -> None:
    assert launch_info()[:2] == (rank, world)

    def fail_on_last():
        if rank == world - 1:
            raise ValueError("bad input here")
        return rank

    with pytest.raises(ValueError) as caught:
        agreed(fail_on_last)
    want = "bad input here" if rank == world - 1 else f"rank {world - 1}: bad input here"
    assert str(caught.value) == want and raised_together(caught.value)
    assert agreed(lambda: rank * 10) == rank * 10  # still in step after the failure
    assert gather(rank + 1) == list(range(1, world + 1))
    assert from_rank0(f"from {rank}") == "from 0"
    torch.manual_seed(rank)  # different parameters on each rank: different checksums
    model = torch.nn.Linear(3, 2)
    sums = gather(parameter_checksum(model))
    assert len(set(sums)) == world
    torch.manual_seed(0)
    assert len(set(gather(parameter_checksum(torch.nn.Linear(3, 2))))) == 1


def test_failures_are_raised_on_every_rank():
    spawn(_worker, 2)


def test_one_process_is_plain():
    with pytest.raises(KeyError):
        agreed(lambda: {}["missing"])
    assert gather(3) == [3] and from_rank0(4) == 4
    a, b = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    b.load_state_dict(a.state_dict())
    assert parameter_checksum(a) == parameter_checksum(b)
    with torch.no_grad():
        b.bias[0] = torch.nextafter(b.bias[0], torch.tensor(1.0))  # one ulp
    assert parameter_checksum(a) != parameter_checksum(b)


def test_a_launched_process_exits_cleanly_after_its_exit_handlers():
    # a gloo group used by DDP and all_gather_object, ended by exit_without_teardown(0) on 2 torchrun ranks,
    # 5 times: every rank runs its exit handlers and exits with 0. Ending with destroy_process_group and
    # sys.exit instead aborted (-6, at interpreter teardown) in 5 of 15 runs here, so this fails ~87 % of
    # the time if the abort comes back.
    for _ in range(5):
        run = torchrun(2, "tests.distributed.exit_worker", [])
        text = run.stdout + run.stderr
        assert run.returncode == 0, text[-3000:]
        assert sorted(re.findall(r"rank (\d): exit handler ran", text)) == ["0", "1"], text[-3000:]
