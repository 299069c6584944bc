"""vcrd: fused, validity-calibrated and distribution-corrected reasoning distillation losses."""

from .config import VCRDConfig
from .functional import vcrd_loss
from .fused_linear import FusedLinearVCRDLoss, fused_linear_vcrd_loss
from .losses import VCRDLoss
from .naturalness import ResponseScore, score_responses
from .select import TeacherRank, rank_teachers, select_responses
from .stats import VCRDStats

__all__ = ["FusedLinearVCRDLoss", "ResponseScore", "TeacherRank", "VCRDConfig", "VCRDLoss", "VCRDStats",
           "fused_linear_vcrd_loss", "rank_teachers", "score_responses", "select_responses", "vcrd_loss"]
__version__ = "0.1.0"
