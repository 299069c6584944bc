"""Backends: one interface, several implementations of the loss's sweeps over the logits.

Every backend has the same contract, ``loss_and_grad(batch, cfg, grad_out, grad_scale, window)``:
per-row outputs (:data:`vcrd.core.weights.OUTPUT_ROWS`) for a checked :class:`~vcrd.core.checks.RowBatch`,
with ``grad_scale · ∂(Σ_r loss_r)/∂s`` written into ``grad_out``. :func:`run_backend` is the one
dispatch every loss uses (logits, fused-linear). ``impl="auto"`` picks Triton for CUDA tensors (and
for CPU tensors under ``TRITON_INTERPRET=1``), else the CPU fast path ``"torch"``.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Optional

import torch

from ..core import settings
from ..core.checks import RowBatch
from ..core.config import VCRDConfig
from ..core.windows import CausalWindowMean
from . import torch_chunks, triton_kernels

IMPLS = ("auto", "triton", "torch", "reference")  # "reference": vcrd.core.reference, in the loss layer


def triton_unavailable(student_logits: torch.Tensor) -> List[str]:
    """Every reason the Triton kernels cannot run on this input (empty when they can)."""
    reasons = []
    try:
        import triton  # noqa: F401
    except ImportError:
        reasons.append("triton is not installed (pip install triton)")
    if student_logits.device.type != "cuda" and not settings.triton_interpreter():
        reasons.append(f"tensors are on {student_logits.device.type}, not CUDA, and TRITON_INTERPRET=1 is not set")
    if student_logits.dtype == torch.float64:
        reasons.append("float64 logits (the kernels take float32, bfloat16 or float16)")
    return reasons


def resolve_impl(impl: str, student_logits: torch.Tensor) -> str:
    """``auto`` → ``triton`` when it can run, else ``torch``; a forced ``triton`` that cannot run raises."""
    if impl in ("torch", "reference"):
        return impl
    reasons = triton_unavailable(student_logits)
    if impl == "triton" and reasons:
        raise NotImplementedError("impl='triton' cannot run: " + "; ".join(reasons))
    return "torch" if reasons else "triton"


# ``backend(impl, batch, cfg, grad_out, grad_scale, window=None) -> rows``: :func:`run_backend`, or the
# sparse teacher's (vcrd.loss.sparse.sparse_backend)
Backend = Callable[..., Dict[str, torch.Tensor]]


def run_backend(impl: str, batch: RowBatch, cfg: VCRDConfig, grad_out: Optional[torch.Tensor], grad_scale: float,
                  window: Optional[CausalWindowMean] = None) -> Dict[str, torch.Tensor]:
    """Run the backend ``impl`` (``"torch"`` or ``"triton"``) on a checked batch: ``[N]`` rows, and
    ``grad_scale · ∂(Σ_r loss_r)/∂s`` written into ``grad_out`` (the contract of
    :func:`vcrd.backends.torch_chunks.loss_and_grad`)."""
    if impl == "triton":
        return triton_kernels.loss_and_grad(batch, cfg, grad_out, grad_scale, window=window)
    if impl == "torch":
        return torch_chunks.loss_and_grad(batch, cfg, grad_out, grad_scale, settings.chunk_rows(),
                                          settings.compile_enabled(), window=window)
    raise ValueError(f"impl: expected 'torch' or 'triton' for a backend, got {impl!r}")
