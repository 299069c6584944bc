"""Count the bytes Triton kernels load and store, under the interpreter (TRITON_INTERPRET=1).

Every load and store of the interpreter goes through ``InterpreterBuilder.create_masked_load`` /
``create_masked_store`` (the unmasked forms call them), so wrapping those two and summing
mask-true elements × item size gives exact counts, attributed to named tensors by address.
"""

from __future__ import annotations

from collections import Counter
from typing import Dict

import numpy as np
import torch


class TrafficCounter:
    """``with TrafficCounter(s=s, u=u, grad=g) as t: ...`` then ``t.read["s"]``, ``t.written["grad"]`` (bytes)."""

    def __init__(self, **tensors: torch.Tensor) -> None:
        self.regions: Dict[str, tuple] = {
            name: (t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()) for name, t in tensors.items()
        }
        self.read: Counter = Counter()
        self.written: Counter = Counter()

    def _count(self, counter: Counter, ptrs, mask, itemsize: int) -> None:
        addr = np.asarray(ptrs.data).astype(np.uint64)
        live = np.broadcast_to(np.asarray(mask.data, dtype=bool), addr.shape)
        counter["total"] += int(live.sum()) * itemsize
        for name, (lo, hi) in self.regions.items():
            counter[name] += int((live & (addr >= lo) & (addr < hi)).sum()) * itemsize

    def __enter__(self) -> TrafficCounter:
        from triton.runtime import interpreter

        builder = interpreter.InterpreterBuilder
        self._saved = builder.create_masked_load, builder.create_masked_store
        load, store = self._saved
        counter = self

        def itemsize(ptrs) -> int:
            return np.dtype(interpreter._get_np_dtype(ptrs.get_element_ty())).itemsize

        def masked_load(b, ptrs, mask, other, cache_policy, is_volatile):
            counter._count(counter.read, ptrs, mask, itemsize(ptrs))
            return load(b, ptrs, mask, other, cache_policy, is_volatile)

        def masked_store(b, ptrs, value, mask, cache_policy):
            counter._count(counter.written, ptrs, mask, itemsize(ptrs))
            return store(b, ptrs, value, mask, cache_policy)

        builder.create_masked_load, builder.create_masked_store = masked_load, masked_store
        return self

    def __exit__(self, *exc) -> None:
        from triton.runtime import interpreter

        builder = interpreter.InterpreterBuilder
        builder.create_masked_load, builder.create_masked_store = self._saved
