"""Every ``VCRD_*`` environment variable, read in this one place (listed in docs/api.md).

- ``VCRD_COMPILE`` (``1``): ``torch.compile`` the CPU fast path's per-chunk math; ``0`` runs it eagerly.
- ``VCRD_CHUNK_ROWS`` (``64``): rows per chunk of the CPU fast path.
- ``VCRD_FUSED_BUDGET_MB`` (``256``): memory for one fused-linear chunk's two ``[C, V]`` fp32 buffers
  (chunks keep 256–1024 rows whatever the budget).

Read at call time, not import time, so tests and scripts can change them.
"""

from __future__ import annotations

import os


def _int(name: str, default: int, minimum: int) -> int:
    raw = os.environ.get(name, "")
    if raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{name}: expected an integer, got {raw!r}") from None
    if value < minimum:
        raise ValueError(f"{name}: expected an integer >= {minimum}, got {value}")
    return value


def compile_enabled() -> bool:
    """``VCRD_COMPILE``: 1 (default) or 0."""
    return bool(_int("VCRD_COMPILE", 1, 0))


def chunk_rows() -> int:
    """``VCRD_CHUNK_ROWS``: rows per chunk of the CPU fast path (default 64)."""
    return _int("VCRD_CHUNK_ROWS", 64, 1)


def fused_budget_bytes() -> int:
    """``VCRD_FUSED_BUDGET_MB``: memory for one fused-linear chunk's ``[C, V]`` buffers (default 256 MB)."""
    return _int("VCRD_FUSED_BUDGET_MB", 256, 1) * 2**20


def triton_interpreter() -> bool:
    """``TRITON_INTERPRET=1`` (Triton's own variable): Triton kernels run on CPU tensors."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"
