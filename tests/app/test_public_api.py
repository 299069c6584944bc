"""The public API: every name the README shows imports from ``vcrd``; ``import vcrd`` stays light; the old
``vcrd.trainer`` path still works and says where the trainer went."""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
README_NAMES = ("vcrd_loss", "LossOptions", "VCRDLoss", "fused_linear_vcrd_loss", "FusedLinearVCRDLoss",
                "SparseTeacher", "sparse_vcrd_loss", "fused_linear_sparse_vcrd_loss", "vocab_parallel_vcrd_loss",
                "fused_linear_vocab_parallel_vcrd_loss", "VCRDConfig", "VCRDStats", "reference", "score_responses",
                "select_responses", "rank_teachers", "distill_loss", "VCRDTrainer", "VCRDDistillationTrainer")


def run(code: str) -> str:
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True,
                          timeout=300).stdout


def test_every_readme_name_imports_from_vcrd():
    import vcrd
    from vcrd.train import trainer

    for name in README_NAMES:
        assert name in vcrd.__all__ and getattr(vcrd, name) is not None, name
    assert vcrd.VCRDTrainer is trainer.VCRDTrainer and vcrd.distill_loss is trainer.distill_loss
    from vcrd.train import trl_distillation

    assert vcrd.VCRDDistillationTrainer is trl_distillation.VCRDDistillationTrainer


def test_import_vcrd_does_not_import_transformers():
    out = run("import sys, vcrd; print('transformers' in sys.modules); vcrd.distill_loss; "
              "print('transformers' in sys.modules)")
    assert out.split() == ["False", "True"]


def test_the_old_trainer_path_warns_and_still_works():
    sys.modules.pop("vcrd.trainer", None)
    with pytest.warns(DeprecationWarning, match=r"vcrd\.train\.trainer"):
        old = importlib.import_module("vcrd.trainer")
    from vcrd.train import trainer

    assert old.VCRDTrainer is trainer.VCRDTrainer and old.distill_loss is trainer.distill_loss
    assert old.unwrap_model is trainer.unwrap_model  # every other name is handed on
