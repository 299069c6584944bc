"""vcrd: fused, validity-calibrated and distribution-corrected reasoning distillation losses.

Every name the README shows imports from here. ``VCRDTrainer`` and ``distill_loss`` (``vcrd.train.trainer``)
and ``VCRDDistillationTrainer`` (``vcrd.train.trl_distillation``, needs TRL) are loaded on first use, so
``import vcrd`` never imports transformers.
"""

from importlib import import_module

from .core import reference
from .core.config import VCRDConfig
from .core.loss_options import LossOptions
from .core.sparse_teacher import SparseTeacher
from .core.stats import VCRDStats
from .distributed import fused_linear_vocab_parallel_vcrd_loss, vocab_parallel_vcrd_loss
from .loss.functional import vcrd_loss
from .loss.fused_linear import FusedLinearVCRDLoss, fused_linear_vcrd_loss
from .loss.modules import VCRDLoss
from .loss.sparse import fused_linear_sparse_vcrd_loss, sparse_vcrd_loss
from .select.naturalness import ResponseScore, score_responses
from .select.selection import TeacherRank, rank_teachers, select_responses

LAZY = {"VCRDTrainer": "vcrd.train.trainer", "distill_loss": "vcrd.train.trainer",
        "VCRDDistillationTrainer": "vcrd.train.trl_distillation"}


def __getattr__(name: str):
    """The names of :data:`LAZY`, imported on first use (they need transformers)."""
    if name in LAZY:
        return getattr(import_module(LAZY[name]), name)
    raise AttributeError(f"module 'vcrd' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(LAZY))


__all__ = ["FusedLinearVCRDLoss", "LossOptions", "ResponseScore", "SparseTeacher", "TeacherRank", "VCRDConfig",
           "VCRDLoss", "VCRDStats", "VCRDDistillationTrainer", "VCRDTrainer", "distill_loss",
           "fused_linear_sparse_vcrd_loss", "fused_linear_vcrd_loss", "fused_linear_vocab_parallel_vcrd_loss",
           "rank_teachers", "reference", "score_responses", "select_responses", "sparse_vcrd_loss", "vcrd_loss",
           "vocab_parallel_vcrd_loss"]
__version__ = "0.1.0"
