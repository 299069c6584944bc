"""Peak resident memory of a call, sampled from /proc while it runs (CPU benchmarks)."""

from __future__ import annotations

import threading
import time
from typing import Callable, Tuple

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
