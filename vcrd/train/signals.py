"""SIGTERM and SIGHUP as ``SystemExit`` within a block, so that ``finally`` blocks remove temporary files and
locks when a run is stopped (``vcrd train``, ``vcrd score``, ``vcrd cache-teacher``)."""

from __future__ import annotations

import contextlib
import signal
from typing import Iterator


@contextlib.contextmanager
def signals_exit() -> Iterator[None]:
    """Within the block, SIGTERM and SIGHUP raise ``SystemExit(128 + signal)`` (SIGINT already raises
    ``KeyboardInterrupt``), so cleanup code runs; the previous handlers are restored afterwards. A
    no-op outside the main thread."""
    previous = {}

    def handler(signum, frame):
        raise SystemExit(128 + signum)

    try:
        for sig in (signal.SIGTERM, signal.SIGHUP):
            previous[sig] = signal.signal(sig, handler)
    except ValueError:  # not the main thread
        pass
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


__all__ = ["signals_exit"]
