"""Backends: one chunk loop (:mod:`.chunk_loop`), several pairs of sweeps over the logits, one registry.

A backend is its pair ``stats(chunk)`` / ``grad(chunk, rows, out)``: the CPU fast path for a dense
(:mod:`.torch_dense`) or a top-K teacher (:mod:`.torch_sparse`), the Triton kernels for either
(:mod:`.triton_dense`, :mod:`.triton_sparse`). :func:`run_backend` finds the pair in the registry
(:mod:`.registry`, keyed by implementation and teacher kind) and runs the chunk loop; every loss uses
it (logits, fused-linear, sparse). Each divergence's CPU formulas live in :mod:`.divergences`.
"""

from __future__ import annotations

from typing import Callable, Dict

import torch

from .registry import BACKENDS, IMPLS, TEACHER_KINDS, resolve_impl, run_backend, teacher_kind, triton_unavailable

# ``backend(impl, batch, cfg, grad_out, grad_scale, window=None) -> rows``: :func:`run_backend`, or a
# caller's own (the vocab-parallel fused-linear loss runs its shard pair through the same chunk loop)
Backend = Callable[..., Dict[str, torch.Tensor]]

__all__ = ["BACKENDS", "IMPLS", "TEACHER_KINDS", "Backend", "resolve_impl", "run_backend", "teacher_kind",
           "triton_unavailable"]
