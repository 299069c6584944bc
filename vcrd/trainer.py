"""Deprecated path of the trainer: it moved to :mod:`vcrd.train.trainer` (``VCRDTrainer`` and ``distill_loss``
also import from ``vcrd``). Importing this module warns once and hands every name on."""

import warnings
from importlib import import_module

warnings.warn("vcrd.trainer moved to vcrd.train.trainer: import VCRDTrainer and distill_loss from vcrd.train.trainer "
              "(or from vcrd); vcrd.trainer will be removed", DeprecationWarning, stacklevel=2)

_NEW = import_module("vcrd.train.trainer")
VCRDTrainer = _NEW.VCRDTrainer
distill_loss = _NEW.distill_loss


def __getattr__(name: str):
    """Any other name of :mod:`vcrd.train.trainer`."""
    return getattr(_NEW, name)
