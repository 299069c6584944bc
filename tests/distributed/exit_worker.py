"""Run by tests/distributed/test_distributed_ranks.py under ``torchrun``, as a user's script would be: its own gloo
group, a DDP step and an ``all_gather_object`` (the collectives whose gloo worker threads outlive the group), an
exit handler, then ``exit_without_teardown(0)``."""

import atexit

import torch
import torch.distributed as dist

from vcrd.distributed.ranks import exit_without_teardown

if __name__ == "__main__":
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(4, 4))
    model(torch.randn(2, 4)).sum().backward()
    ranks = [None, None]
    dist.all_gather_object(ranks, rank)
    assert ranks == [0, 1]
    atexit.register(print, f"rank {rank}: exit handler ran", flush=True)
    exit_without_teardown(0)
    raise AssertionError("exit_without_teardown returned")
