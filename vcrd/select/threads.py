"""Independent CPU batches side by side: ``workers`` Python threads, each running whole batches with ONE
intra-op thread.

A small model's forward over a few hundred tokens uses several intra-op threads poorly: between its
matrix products the elementwise work, the attention and the indexing run on short tensors, and every
operator pays a fork/join across the threads. Giving each thread its own batch and one intra-op thread
keeps every core busy on whole batches instead (torch releases the GIL inside its operators). A batch's
result is what a one-thread run gives, whatever the scheduling, so the results do not depend on the
number of workers.
"""

from __future__ import annotations

from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Deque, Iterable, Iterator, TypeVar

import torch

B = TypeVar("B")
R = TypeVar("R")


def _one_intra_op_thread() -> None:
    torch.set_num_threads(1)  # this thread's own setting: the caller's thread keeps its count


def _run(fn: Callable[[B], R], batch: B) -> R:
    with torch.inference_mode():  # grad and inference mode are per thread
        return fn(batch)


def map_batches(fn: Callable[[B], R], batches: Iterable[B], workers: int) -> Iterator[R]:
    """``fn(batch)`` for each batch, in order, under ``torch.inference_mode``. With ``workers > 1`` the
    batches run in ``workers`` threads of one intra-op thread each, at most ``2 * workers`` submitted
    ahead of the one being yielded; an error in ``fn`` is raised here and the batches not yet started
    are dropped. With ``workers == 1``: a plain loop in the caller's thread."""
    if workers < 1:
        raise ValueError(f"workers: expected an int >= 1, got {workers!r}")
    if workers == 1:
        for batch in batches:
            yield _run(fn, batch)
        return
    pending: Deque[Future] = deque()
    with ThreadPoolExecutor(max_workers=workers, initializer=_one_intra_op_thread,
                            thread_name_prefix="vcrd-batch") as pool:
        try:
            for batch in batches:
                pending.append(pool.submit(_run, fn, batch))
                if len(pending) >= 2 * workers:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for future in pending:
                future.cancel()


__all__ = ["map_batches"]
