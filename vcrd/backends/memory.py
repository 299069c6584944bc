"""Ask Linux to back a large, fresh CPU buffer with transparent huge pages.

The gradient buffer the CPU path fills is new memory: touching it page by page costs ~0.2 s per
GB in page faults on this machine's default THP setting (``madvise``), more than computing into it.
``madvise(MADV_HUGEPAGE)`` on the buffer before the first write cuts that cost (docs/numerics.md
has the measurement). A hint only: where it is unavailable nothing changes.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys

import torch

MADV_HUGEPAGE = 14
PAGE = 4096


@functools.cache
def _libc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    except OSError:
        return None
    libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    return libc


def advise_huge_pages(t: torch.Tensor, min_bytes: int = 64 * 2**20) -> bool:
    """``MADV_HUGEPAGE`` on the page-aligned interior of a CPU tensor of at least ``min_bytes``;
    True if the kernel accepted the hint."""
    nbytes = t.numel() * t.element_size()
    libc = _libc()
    if libc is None or t.device.type != "cpu" or nbytes < min_bytes:
        return False
    start = (t.data_ptr() + PAGE - 1) // PAGE * PAGE
    end = (t.data_ptr() + nbytes) // PAGE * PAGE
    return libc.madvise(start, end - start, MADV_HUGEPAGE) == 0
