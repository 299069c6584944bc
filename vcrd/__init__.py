"""vcrd: fused, validity-calibrated and distribution-corrected reasoning distillation losses."""

from .config import VCRDConfig
from .functional import vcrd_loss
from .fused_linear import FusedLinearVCRDLoss, fused_linear_vcrd_loss
from .losses import VCRDLoss
from .stats import VCRDStats

__all__ = ["FusedLinearVCRDLoss", "VCRDConfig", "VCRDLoss", "VCRDStats", "fused_linear_vcrd_loss", "vcrd_loss"]
__version__ = "0.1.0"
