"""Processes started by a launcher (``torchrun``, ``accelerate launch``): who they are, and failing together.

A rank that raises alone leaves the others waiting in their next collective until the group's timeout
(30 minutes by default). Code that can fail on one rank (a check, a file write) therefore runs as
``result = agreed(action)``: every rank runs ``action``, then ONE ``all_gather_object`` of the ranks'
errors acts as a barrier that carries failures, and if any rank failed, every rank raises (its own
error, else the first failing rank's, with the same type and a ``"rank r: "`` prefix).

Without a launcher (``WORLD_SIZE`` unset or 1) every function here is the plain single-process
behaviour: :func:`agreed` runs the action and lets its error propagate unchanged.
"""

from __future__ import annotations

import datetime
import hashlib
import os
from typing import Any, Callable, List, Optional, Tuple, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


def launch_info() -> Tuple[int, int, int]:
    """``(rank, world_size, local_rank)`` of this process: from the initialised default group, else from
    the launcher's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``), else ``(0, 1, 0)``."""
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), local
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")), local


_OWN_GROUP = []  # non-empty while init_from_launcher's group is alive (close_launcher_group ends it)


def init_from_launcher(timeout_s: Optional[float] = None) -> int:
    """Initialise the default process group from the launcher's environment (``env://``) when
    ``WORLD_SIZE > 1`` and it is not initialised yet; returns the world size. Backend: ``gloo`` on CPU,
    ``cuda:nccl,cpu:gloo`` with CUDA (each process on ``cuda:LOCAL_RANK``), as accelerate would choose;
    the Hugging Face Trainer adopts the group. :func:`close_launcher_group` destroys it."""
    _, world, local = launch_info()
    if world > 1 and not dist.is_initialized():
        backend = "gloo"
        if torch.cuda.is_available():
            torch.cuda.set_device(local)
            backend = "cuda:nccl,cpu:gloo"
        kwargs = {} if timeout_s is None else {"timeout": datetime.timedelta(seconds=timeout_s)}
        dist.init_process_group(backend, **kwargs)
        _OWN_GROUP.append(True)
    return world


def close_launcher_group() -> bool:
    """Destroy the default process group if :func:`init_from_launcher` created it (what torch asks of
    a process before it exits); returns whether it did. A no-op (False) otherwise."""
    own = bool(_OWN_GROUP) and dist.is_initialized()
    if own:
        dist.destroy_process_group()
    _OWN_GROUP.clear()
    return own


def exit_without_teardown(code: int) -> None:
    """End this process now with exit status ``code``: destroy the default process group (if any), run
    the exit handlers (``atexit``: logging, progress bars), flush the standard streams, then
    ``os._exit(code)``, skipping only the interpreter's teardown. Never returns. The CLI ends every
    torchrun worker this way; end your own torchrun script that used DDP on gloo the same way.

    Why: a gloo group that DDP has used stays referenced after ``destroy_process_group``, so its worker
    threads outlive it, and one of them may still be releasing the tensors of the last collective (an
    ``all_gather_object``) while the interpreter tears down; taking the GIL then kills the thread and
    aborts the process ("terminate called without an active exception", SIGABRT, after a complete run:
    about 1 run in 4 of ``vcrd train`` under ``torchrun --nproc_per_node 2`` here, core dump in
    ``ProcessGroupGloo::runLoop`` → ``~AsyncAllgatherWork`` → ``THPVariable_clear`` → ``take_gil``).
    Torch's own fix (an exit handler destroying groups, pytorch/pytorch#179291) was abandoned."""
    import atexit
    import sys

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _OWN_GROUP.clear()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed or broken stream: nothing more can be written to it
            pass
    os._exit(code)


def _exchange(value: Any) -> List[Any]:
    """Every rank's ``value`` (one ``all_gather_object``, through the CPU side of the group)."""
    out: List[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _rebuild(kind: type, message: str) -> BaseException:
    try:
        return kind(message)
    except Exception:  # an exception class with a different constructor
        return RuntimeError(message)


def raise_together(error: Optional[BaseException]) -> None:
    """A barrier that carries failures: if any rank passes an error, every rank raises (see the module
    docstring). Single process: raises ``error`` if given."""
    if not _distributed():
        if error is not None:
            raise error
        return
    errors = _exchange(None if error is None else (type(error), str(error)))
    if error is not None:
        error.on_every_rank = True  # type: ignore[attr-defined]
        raise error
    failed = [(r, e) for r, e in enumerate(errors) if e is not None]
    if failed:
        r, (kind, message) = failed[0]
        other = _rebuild(kind, f"rank {r}: {message}")
        other.on_every_rank = True  # type: ignore[attr-defined]
        raise other from None


def raised_together(error: BaseException) -> bool:
    """Whether ``error`` came out of :func:`raise_together` (every rank of the group is raising too)."""
    return bool(getattr(error, "on_every_rank", False))


def settle(error: BaseException) -> None:
    """After an error every rank raised together: wait until every rank has got here (one
    ``all_gather_object``), so that each can report it before a launcher that saw one rank exit stops
    the others. A no-op for any other error (a lone rank must not wait for ranks that never come)."""
    if _distributed() and raised_together(error):
        _exchange(None)


def agreed(action: Callable[[], T], catch: Tuple[type, ...] = (Exception,)) -> T:
    """``action()`` on every rank, then :func:`raise_together` on the ``catch`` errors it raised."""
    try:
        result = action()
    except catch as e:
        raise_together(e)
        raise  # unreachable: raise_together raised
    raise_together(None)
    return result


def from_rank0(value: T) -> T:
    """Rank 0's ``value`` on every rank (single process: ``value``)."""
    return _exchange(value)[0] if _distributed() else value


def gather(value: T) -> List[T]:
    """Every rank's ``value``, in rank order, on every rank (single process: ``[value]``)."""
    return _exchange(value) if _distributed() else [value]


def parameter_checksum(model: torch.nn.Module) -> str:
    """SHA-256 of a model's parameters (name, dtype, shape and bytes, in ``named_parameters`` order): equal
    on two ranks exactly when their parameters are bitwise equal."""
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        t = p.detach()
        t = t.full_tensor() if hasattr(t, "full_tensor") else t  # a DTensor (FSDP2): the whole parameter
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


__all__ = ["agreed", "close_launcher_group", "exit_without_teardown", "from_rank0", "gather", "init_from_launcher",
           "launch_info", "parameter_checksum", "raise_together", "raised_together", "settle"]
