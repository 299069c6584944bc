"""The four logit post-processing options of ``VCRDConfig`` (SPEC §1, §9): validation, and the
transform the chunk loop applies (the losses' parity is in tests/loss/test_logit_transform.py)."""

from __future__ import annotations

import math

import pytest
import torch

from vcrd import VCRDConfig
from vcrd.core.logit_transform import ModelTransform, chunk_transform


def test_defaults_are_the_identity():
    cfg = VCRDConfig()
    assert (cfg.student_logit_scale, cfg.teacher_logit_scale, cfg.student_softcap, cfg.teacher_softcap) == \
        (1.0, 1.0, None, None)
    for preset in ("kd", "discord", "vcrd"):
        assert chunk_transform(VCRDConfig.preset(preset)) is None  # the chunk loop runs its old code
    assert chunk_transform(VCRDConfig(teacher_softcap=30.0)).student.is_identity


@pytest.mark.parametrize("name", ["student_logit_scale", "teacher_logit_scale"])
@pytest.mark.parametrize("value", [0.0, -0.5, math.inf, math.nan, True, "2", None])
def test_bad_scales_are_refused_naming_the_field(name, value):
    with pytest.raises(ValueError, match=f"VCRDConfig.{name}: expected a finite number > 0"):
        VCRDConfig(**{name: value})


@pytest.mark.parametrize("name", ["student_softcap", "teacher_softcap"])
@pytest.mark.parametrize("value", [0.0, -30.0, math.inf, math.nan, False, "30"])
def test_bad_softcaps_are_refused_naming_the_field(name, value):
    with pytest.raises(ValueError, match=f"VCRDConfig.{name}: expected None or a finite number > 0"):
        VCRDConfig(**{name: value})


def test_good_values_and_overrides():
    cfg = VCRDConfig.preset("kd", student_logit_scale=0.0625, teacher_softcap=30, student_softcap=50.0)
    assert cfg.student_logit_scale == 0.0625 and cfg.teacher_softcap == 30 and cfg.normalize == "tokens"
    with pytest.raises(ValueError, match="teacher_logit_scale"):
        cfg.replace(teacher_logit_scale=0)


def test_model_transform_and_its_derivative():
    z = torch.linspace(-200, 200, 4001, dtype=torch.float64)
    t = ModelTransform(0.5, 30.0)
    want = 30.0 * torch.tanh(0.5 * z / 30.0)
    assert torch.allclose(t.apply(z), want, rtol=0, atol=1e-12)
    zz = z.clone().requires_grad_()
    (30.0 * torch.tanh(0.5 * zz / 30.0)).sum().backward()
    g = t.chain_(torch.ones_like(z), z)
    assert torch.allclose(g, zz.grad, rtol=1e-12, atol=0)
    assert torch.equal(ModelTransform(0.5, 1.0).chain_(torch.ones(2), torch.tensor([1e4, -1e4])), torch.zeros(2))
    assert torch.equal(ModelTransform(0.125).chain_(torch.ones(3), torch.zeros(3)), torch.full((3,), 0.125))
    assert t.apply(z.float()).dtype == torch.float32 and t.apply(z.bfloat16()).dtype == torch.float32
