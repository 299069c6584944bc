"""Tier 3: contracts. Bad input raises a clear error naming the argument, before any work."""

from __future__ import annotations

import pytest
import torch

import vcrd
from vcrd import VCRDConfig, VCRDLoss, functional, vcrd_loss

from .conftest import realistic_logits


@pytest.fixture
def xyz():
    s, u, y = realistic_logits(12, 31, std=10.0)
    return s.requires_grad_(), u, y


@pytest.fixture
def no_work(monkeypatch):
    """Fail the test if the fast path is entered: errors must come before any pass over the logits."""
    def boom(*a, **k):
        raise AssertionError("the loss started working before rejecting the input")
    monkeypatch.setattr(functional._torch, "loss_and_grad", boom)
    monkeypatch.setattr(functional.reference, "vcrd_loss", boom)


BAD_CALLS = {
    "student-not-tensor": (lambda s, u, y: ([1.0], u, y, {}), TypeError, "student_logits"),
    "student-int": (lambda s, u, y: (s.long(), u, y, {}), TypeError, "student_logits"),
    "student-1d": (lambda s, u, y: (s[0], u[0], y[:1], {}), ValueError, "student_logits"),
    "teacher-rows": (lambda s, u, y: (s, u[:5], y, {}), ValueError, "teacher_logits"),
    "teacher-grad": (lambda s, u, y: (s, u.clone().requires_grad_(), y, {}), ValueError, "teacher_logits"),
    "vocab-mismatch": (lambda s, u, y: (s, torch.cat([u, u[:, :2]], 1), y, {}), ValueError, "vocab_size"),
    "vocab-too-big": (lambda s, u, y: (s, u, y, {"vocab_size": 32}), ValueError, "vocab_size"),
    "vocab-float": (lambda s, u, y: (s, u, y, {"vocab_size": 3.0}), TypeError, "vocab_size"),
    "labels-shape": (lambda s, u, y: (s, u, y[:-1], {}), ValueError, "labels"),
    "labels-float": (lambda s, u, y: (s, u, y.float(), {}), TypeError, "labels"),
    "labels-range": (lambda s, u, y: (s, u, torch.where(y == y[3], 31, y), {}), ValueError, "labels"),
    "labels-negative": (lambda s, u, y: (s, u, torch.where(y == y[3], -5, y), {}), ValueError, "labels"),
    "steps-shape": (lambda s, u, y: (s, u, y, {"step_ids": torch.zeros(11, dtype=torch.long)}), ValueError,
                    "step_ids"),
    "steps-float": (lambda s, u, y: (s, u, y, {"step_ids": torch.zeros(12)}), TypeError, "step_ids"),
    "steps-decrease": (lambda s, u, y: (s, u, y, {"step_ids": torch.tensor([0, 0, 1, 1, 2, 1, 2, 2, 3, 3, 3, 3])}),
                       ValueError, "step_ids"),
    "cu-not-ending-at-N": (lambda s, u, y: (s, u, y, {"cu_seqlens": torch.tensor([0, 5, 11])}), ValueError,
                           "cu_seqlens"),
    "cu-decreasing": (lambda s, u, y: (s, u, y, {"cu_seqlens": torch.tensor([0, 7, 5, 12])}), ValueError,
                      "cu_seqlens"),
    "cu-on-batched": (lambda s, u, y: (s.reshape(3, 4, 31), u.reshape(3, 4, 31), y.reshape(3, 4),
                                       {"cu_seqlens": torch.tensor([0, 12])}), ValueError, "cu_seqlens"),
    "reduction": (lambda s, u, y: (s, u, y, {"reduction": "avg"}), ValueError, "reduction"),
    "impl": (lambda s, u, y: (s, u, y, {"impl": "cuda"}), ValueError, "impl"),
    "num-items-zero": (lambda s, u, y: (s, u, y, {"num_items_in_batch": 0}), ValueError, "num_items_in_batch"),
    "num-items-with-sum": (lambda s, u, y: (s, u, y, {"num_items_in_batch": 5, "reduction": "sum"}), ValueError,
                           "num_items_in_batch"),
    "config-type": (lambda s, u, y: (s, u, y, {"config": {"divergence": "fkl"}}), TypeError, "config"),
    "config-preset": (lambda s, u, y: (s, u, y, {"config": "gkd"}), ValueError, "preset"),
}


@pytest.mark.parametrize("case", list(BAD_CALLS))
def test_bad_input_is_rejected_before_work(case, xyz, no_work):
    make, error, name = BAD_CALLS[case]
    s, u, y, kw = make(*xyz)
    with pytest.raises(error, match=name):
        vcrd_loss(s, u, y, **{"impl": "torch", **kw})


@pytest.mark.parametrize("field,value", [
    ("temperature", 0.0), ("temperature", -1.0), ("beta", 1.5), ("beta", -0.1), ("divergence", "kl"),
    ("validity", "max"), ("validity_floor", 1.2), ("validity_tau", 0.0), ("correction_tau", -1.0),
    ("window_steps", -1), ("window_steps", 2.5), ("normalize", "rows"), ("kd_weight", -1.0),
    ("temperature", float("nan")), ("correction", "yes"), ("ignore_index", 1.0),
])
def test_bad_config_values(field, value):
    with pytest.raises(ValueError, match=field):
        VCRDConfig(**{field: value})


def test_presets():
    assert VCRDConfig.preset("kd").validity is None and not VCRDConfig.preset("kd").correction
    d = VCRDConfig.preset("discord")
    assert d.validity is None and d.correction and d.window_steps is None
    assert VCRDConfig.preset("vcrd") == VCRDConfig()
    assert VCRDConfig.preset("kd", temperature=2.0).temperature == 2.0
    assert VCRDConfig(divergence="jsd", beta=0.0).effective_divergence == "fkl"
    assert VCRDConfig(divergence="jsd", beta=1.0).effective_divergence == "rkl"


def test_triton_forced_on_cpu_lists_reasons(xyz, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(NotImplementedError, match="CUDA"):
        vcrd_loss(*xyz, impl="triton")


def test_auto_picks_torch_on_cpu(xyz, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert functional.resolve_impl("auto", xyz[0]) == "torch"


def test_nan_in_a_valid_row_gives_nan_and_ignored_rows_never_matter(xyz):
    s, u, y = xyz
    s = s.detach().clone()
    s[2, 5] = float("nan")
    assert torch.isnan(vcrd_loss(s, u, y, impl="torch"))
    y2 = y.clone()
    y2[2] = -100
    x = s.clone().requires_grad_()
    loss = vcrd_loss(x, u, y2, impl="torch")
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all() and torch.all(x.grad[2] == 0)
    want = vcrd_loss(torch.where(torch.isnan(s), 0.0, s), u, y2, impl="torch")
    torch.testing.assert_close(loss.detach(), want)


def test_double_backward_is_refused(xyz):
    loss = vcrd_loss(*xyz, impl="torch")
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward was already run"):
        loss.backward()


def test_teacher_is_never_touched_and_module_matches_functional(xyz):
    s, u, y = xyz
    u_before = u.clone()
    module = VCRDLoss("discord", impl="torch")
    assert "discord" not in repr(module) and "window_steps=None" in repr(module)
    a = module(s, u, y)
    b = vcrd_loss(s, u, y, config="discord", impl="torch")
    assert torch.equal(a, b) and torch.equal(u, u_before)
    assert set(vcrd.__all__) >= {"VCRDConfig", "VCRDLoss", "vcrd_loss", "VCRDStats"}


def test_env_settings_are_checked(xyz, monkeypatch):
    monkeypatch.setenv("VCRD_CHUNK_ROWS", "zero")
    with pytest.raises(ValueError, match="VCRD_CHUNK_ROWS"):
        vcrd_loss(*xyz, impl="torch")


def test_huge_page_hint_is_only_a_hint():
    from vcrd._memory import advise_huge_pages

    assert advise_huge_pages(torch.empty(10)) is False  # small buffers are left alone
    big = torch.empty(2**25)  # 128 MiB
    assert advise_huge_pages(big) in (True, False)
    big.fill_(1.5)
    assert float(big[-1]) == 1.5
