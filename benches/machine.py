"""The machine a benchmark ran on, for the lines printed with its numbers."""

from __future__ import annotations

import platform
from pathlib import Path


def cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo (elsewhere: ``platform.processor()``, or ``"?"``)."""
    info = Path("/proc/cpuinfo")
    if not info.exists():
        return platform.processor() or "?"
    return next((line.split(":", 1)[1].strip() for line in info.read_text().splitlines()
                 if line.startswith("model name")), platform.processor() or "?")
