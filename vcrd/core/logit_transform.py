"""Each model's logit post-processing (SPEC §1) as the fast paths apply it: one chunk at a time.

The softmax of a model with scale ``a`` and soft-cap ``c`` sees ``z' = c·tanh(a·z/c)`` (``a·z`` when
``c`` is None). The chunk loop (:func:`vcrd.backends.chunk_loop.run_chunks`) is the one place the fast
paths apply it: each chunk's logits are processed into a chunk-sized buffer (fp32, fp64 for fp64
logits) before the backend's statistics sweep, and the backend's gradient with respect to the
processed student logits is multiplied by ``∂z'/∂z = a·(1 − tanh²(a·z/c)) = a / cosh²(a·z/c)``, read
from the raw chunk, before it is written where the caller asked (over the raw logits, in place).
With the options at their defaults :func:`chunk_transform` returns None and nothing of this runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .config import VCRDConfig

TEACHER_FIELDS = ("teacher_logit_scale", "teacher_softcap")


@dataclass(frozen=True)
class ModelTransform:
    """``z' = cap·tanh(scale·z/cap)`` (``scale·z`` when ``cap`` is None) of one model."""

    scale: float = 1.0
    cap: Optional[float] = None

    @property
    def is_identity(self) -> bool:
        return self.scale == 1.0 and self.cap is None

    def apply(self, z: torch.Tensor) -> torch.Tensor:
        """The processed logits of ``z`` in a new buffer, fp32 (fp64 for fp64 ``z``)."""
        x = z.to(torch.promote_types(z.dtype, torch.float32), copy=True)
        x.mul_(self.scale)
        if self.cap is not None:
            x.div_(self.cap).tanh_().mul_(self.cap)
        return x

    def chain_(self, grad: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """``grad *= ∂z'/∂z`` element-wise (``grad`` the gradient with respect to ``z'``, ``z`` the raw logits)."""
        if self.cap is None:
            return grad.mul_(self.scale)
        d = z.to(grad.dtype, copy=True).mul_(self.scale).div_(self.cap).cosh_()  # inf beyond ~89: derivative 0
        return grad.div_(d.square_()).mul_(self.scale)


@dataclass(frozen=True)
class ChunkTransform:
    """Both models' transforms (the teacher's is the identity for a sparse teacher, which is stored after its own)."""

    student: ModelTransform
    teacher: ModelTransform


def model_transforms(cfg: VCRDConfig) -> ChunkTransform:
    return ChunkTransform(ModelTransform(cfg.student_logit_scale, cfg.student_softcap),
                          ModelTransform(cfg.teacher_logit_scale, cfg.teacher_softcap))


def check_sparse_teacher(cfg: VCRDConfig) -> None:
    """A sparse (top-K) teacher is stored after its own transform (its log-probs are those of ``u'``): a
    teacher scale or soft-cap would apply it twice, so only the defaults are accepted."""
    given = [f"{name}={getattr(cfg, name)!r}" for name, default in zip(TEACHER_FIELDS, (1.0, None))
             if getattr(cfg, name) != default]
    if given:
        raise ValueError(f"{', '.join(given)}: a sparse (top-K) teacher is stored after its own logit "
                         "post-processing (its log-probs are those of the processed logits); leave "
                         "teacher_logit_scale=1.0 and teacher_softcap=None (the student_* options apply)")


def chunk_transform(cfg: VCRDConfig, sparse: bool = False) -> Optional[ChunkTransform]:
    """None when both models' logits are used as given (the defaults); else both transforms (a sparse
    teacher's options checked by :func:`check_sparse_teacher`)."""
    if sparse:
        check_sparse_teacher(cfg)
    t = model_transforms(cfg)
    return None if t.student.is_identity and t.teacher.is_identity else t


__all__ = ["ChunkTransform", "ModelTransform", "TEACHER_FIELDS", "check_sparse_teacher", "chunk_transform",
           "model_transforms"]
