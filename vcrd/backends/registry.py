"""One registry of backends, keyed by (implementation, teacher kind), each able to say why it cannot run.

An entry builds the backend's chunk pair (:class:`vcrd.backends.chunk_loop.ChunkPair`) for a checked
batch and lists every reason it cannot run on a given input (empty when it can). The teacher kind is
``"dense"`` (teacher logits, :class:`vcrd.core.checks.RowBatch`) or ``"sparse"`` (a top-K teacher,
:class:`vcrd.core.sparse_teacher.SparseRowBatch`). ``impl="auto"`` picks Triton for CUDA tensors (and
for CPU tensors under ``TRITON_INTERPRET=1``), else the CPU fast path ``"torch"``; a forced ``"triton"``
that cannot run raises ``NotImplementedError`` listing every reason.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch

from ..core import settings
from ..core.checks import RowBatch
from ..core.config import VCRDConfig
from ..core.sparse_teacher import SparseRowBatch
from ..core.weights import Rows
from ..core.windows import CausalWindowMean
from .chunk_loop import ChunkPair, run_chunks
from .torch_dense import TorchDensePair
from .torch_sparse import TorchSparsePair
from .triton_dense import TritonDensePair
from .triton_sparse import TritonSparsePair

IMPLS = ("auto", "triton", "torch", "reference")  # "reference": vcrd.core.reference, in the loss layer
TEACHER_KINDS = ("dense", "sparse")


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


def always_available(student_logits: torch.Tensor) -> List[str]:
    """The CPU fast path runs on any device and float dtype."""
    return []


@dataclass(frozen=True)
class BackendEntry:
    """``make_pair(cfg, batch)`` → the backend's chunk pair; ``unavailable(student_logits)`` → every reason
    it cannot run on that input."""

    make_pair: Callable[[VCRDConfig, RowBatch], ChunkPair]
    unavailable: Callable[[torch.Tensor], List[str]]


BACKENDS: Dict[Tuple[str, str], BackendEntry] = {
    ("torch", "dense"): BackendEntry(
        lambda cfg, batch: TorchDensePair(cfg, batch.vocab, settings.chunk_rows(), settings.compile_enabled()),
        always_available),
    ("torch", "sparse"): BackendEntry(
        lambda cfg, batch: TorchSparsePair(cfg, batch, settings.chunk_rows(), settings.compile_enabled()),
        always_available),
    ("triton", "dense"): BackendEntry(TritonDensePair, triton_unavailable),
    ("triton", "sparse"): BackendEntry(TritonSparsePair, triton_unavailable),
}


def teacher_kind(batch: RowBatch) -> str:
    """``"sparse"`` for a top-K teacher's batch, else ``"dense"``."""
    return "sparse" if isinstance(batch, SparseRowBatch) else "dense"


def resolve_impl(impl: str, student_logits: torch.Tensor, teacher: str = "dense") -> str:
    """``auto`` → ``triton`` when it can run, else ``torch``; a forced ``triton`` that cannot run raises
    ``NotImplementedError`` listing every reason."""
    if impl in ("torch", "reference"):
        return impl
    reasons = BACKENDS[("triton", teacher)].unavailable(student_logits)
    if impl == "triton" and reasons:
        raise NotImplementedError("impl='triton' cannot run: " + "; ".join(reasons))
    return "torch" if reasons else "triton"


def run_backend(impl: str, batch: RowBatch, cfg: VCRDConfig, grad_out: Optional[torch.Tensor], grad_scale: float,
                window: Optional[CausalWindowMean] = None) -> Rows:
    """Run the backend ``(impl, teacher kind of batch)`` on a checked batch: ``[N]`` rows, and
    ``grad_scale · ∂(Σ_r loss_r)/∂s`` written into ``grad_out`` (:func:`vcrd.backends.chunk_loop.run_chunks`)."""
    entry = BACKENDS.get((impl, teacher_kind(batch)))
    if entry is None:
        raise ValueError(f"impl: expected 'torch' or 'triton' for a backend, got {impl!r}")
    return run_chunks(entry.make_pair(cfg, batch), batch, cfg, grad_out, grad_scale, window)


__all__ = ["BACKENDS", "IMPLS", "TEACHER_KINDS", "BackendEntry", "resolve_impl", "run_backend", "teacher_kind",
           "triton_unavailable"]
