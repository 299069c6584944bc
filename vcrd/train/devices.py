"""``--device`` checked before any work: a device this machine has, else a ``ValueError`` saying so (not an
``AssertionError`` traceback from deep inside torch after files were written)."""

from __future__ import annotations

import torch


def check_device(device: object, what: str = "--device") -> torch.device:
    """``torch.device(device)`` if this process can use it: ``cpu``, ``meta``, or ``cuda[:i]`` / ``xpu``/
    ``mps`` with such a device present; else ``ValueError`` naming ``what``, the expected and the actual."""
    try:
        dev = torch.device(device)  # type: ignore[arg-type]
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"{what}: expected a device such as 'cpu', 'cuda' or 'cuda:0', got {device!r} ({e})") from None
    if dev.type in ("cpu", "meta"):
        return dev
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"{what}: {device!r} asked for a CUDA GPU, but this machine has none that torch can use "
                             f"(torch {torch.__version__}, CUDA build: {torch.version.cuda or 'no'}); use --device cpu")
        if dev.index is not None and dev.index >= count:
            raise ValueError(f"{what}: {device!r}: this machine has {count} CUDA device(s), 0..{count - 1}")
        return dev
    backend = getattr(torch, dev.type, None)
    available = getattr(backend, "is_available", None)
    if available is None or not available():
        raise ValueError(f"{what}: {device!r}: no {dev.type} device is available here; use --device cpu")
    return dev


__all__ = ["check_device"]
