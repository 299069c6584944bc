"""vcrd: fused, validity-calibrated and distribution-corrected reasoning distillation losses."""

from .core import reference
from .core.config import VCRDConfig
from .core.stats import VCRDStats
from .loss.functional import vcrd_loss
from .loss.fused_linear import FusedLinearVCRDLoss, fused_linear_vcrd_loss
from .loss.modules import VCRDLoss
from .core.sparse_teacher import SparseTeacher
from .loss.sparse import fused_linear_sparse_vcrd_loss, sparse_vcrd_loss
from .select.naturalness import ResponseScore, score_responses
from .select.selection import TeacherRank, rank_teachers, select_responses

__all__ = ["FusedLinearVCRDLoss", "ResponseScore", "SparseTeacher", "TeacherRank", "VCRDConfig", "VCRDLoss",
           "VCRDStats", "fused_linear_sparse_vcrd_loss", "fused_linear_vcrd_loss", "rank_teachers", "reference",
           "score_responses", "select_responses", "sparse_vcrd_loss", "vcrd_loss"]
__version__ = "0.1.0"
