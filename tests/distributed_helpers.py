"""Starting multi-process tests in one place, without a port race.

- :func:`spawn`: ``worker(rank, world, *args)`` in ``world`` spawned processes whose gloo process group is
  already initialised through a rendezvous FILE in a fresh temporary folder (``init_method="file://..."``):
  no port is picked in one process and bound later in another (the race a free-port helper has). The
  torchrun environment variables (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``) are set,
  so the Hugging Face Trainer / accelerate adopt the group as they would under torchrun.
- :func:`torchrun`: ``torchrun --standalone --nproc_per_node N -m MODULE ARGS`` as a subprocess (the
  standalone rendezvous binds port 0 itself, and the workers reuse its store: race-free too).
"""

from __future__ import annotations

import datetime
import os
import subprocess
import sys
import tempfile
from typing import Callable, Dict, Optional, Sequence

import torch

from vcrd.distributed.ranks import exit_without_teardown

TIMEOUT_S = 120  # a collective waiting longer than this fails the test instead of hanging it


def _entry(rank: int, worker: Callable, world: int, init_method: str, args: tuple) -> None:
    import torch.distributed as dist

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      VCRD_COMPILE="0")  # the eager CPU path: no torch.compile in every worker
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=TIMEOUT_S))
    try:
        worker(rank, world, *args)
    except BaseException:
        dist.destroy_process_group()
        raise
    # a gloo group that DDP used can abort the interpreter's teardown (SIGABRT after a complete run:
    # vcrd.distributed.ranks.exit_without_teardown says why); end the worker as the CLI does
    exit_without_teardown(0)


def spawn(worker: Callable, world: int, *args) -> None:
    """Run ``worker(rank, world, *args)`` (a module-level function) on ``world`` gloo ranks; raises if any
    rank fails."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory(prefix="vcrd-rdzv-") as folder:
        init = f"file://{os.path.join(folder, 'rendezvous')}"
        mp.start_processes(_entry, args=(worker, world, init, args), nprocs=world, join=True, start_method="spawn")


def torchrun(nproc: int, module: str, args: Sequence[str], *, env: Optional[Dict[str, str]] = None,
             timeout: float = 300, cwd: Optional[str] = None) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node nproc -m module *args`` with this interpreter; its output
    captured (text). One torch thread per worker; ``env`` adds variables."""
    full = {**os.environ, "OMP_NUM_THREADS": "1", "VCRD_COMPILE": "0", "PYTHONUNBUFFERED": "1", **(env or {})}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", module, *args]
    return subprocess.run(command, env=full, capture_output=True, text=True, timeout=timeout, cwd=cwd)
