"""Run by tests/test_distributed_ranks.py under ``torchrun``: a DDP step and an ``all_gather_object`` (the
collectives whose gloo worker threads outlive the group), an exit handler, then
``exit_launched_process(0)``."""

import atexit

import torch

from vcrd.distributed.ranks import exit_launched_process, gather, init_from_launcher, launch_info

if __name__ == "__main__":
    init_from_launcher()
    rank = launch_info()[0]
    model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(4, 4))
    model(torch.randn(2, 4)).sum().backward()
    assert gather(rank) == [0, 1]
    atexit.register(print, f"rank {rank}: exit handler ran", flush=True)
    exit_launched_process(0)
    raise AssertionError("exit_launched_process returned")
