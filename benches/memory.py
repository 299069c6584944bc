"""Memory of a call on CPU: peak resident memory sampled from /proc while it runs, and the size of
every tensor allocation it makes (torch's profiler)."""

from __future__ import annotations

import threading
import time
from typing import Callable, List, Tuple

import psutil


def peak_rss_delta(fn: Callable[[], object], interval: float = 0.0005) -> Tuple[int, int]:
    """Run ``fn`` once; return ``(peak RSS during the call - RSS before it, absolute peak RSS)`` in bytes."""
    proc = psutil.Process()
    before = proc.memory_info().rss
    peak = [before]
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(interval)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        fn()
    finally:
        done.set()
        thread.join()
    peak[0] = max(peak[0], proc.memory_info().rss)
    return peak[0] - before, peak[0]


def allocations(fn: Callable[[], object]) -> List[int]:
    """Run ``fn`` once; return the size in bytes of every CPU tensor allocation it made (torch's
    profiler with ``profile_memory=True``: each allocation is charged to the op that made it, or to a
    ``[memory]`` event when no op is recorded, e.g. inside compiled code)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return [e.self_cpu_memory_usage for e in prof.events() if e.self_cpu_memory_usage > 0]
