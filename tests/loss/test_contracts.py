"""Tier 3: contracts. Bad input raises a clear error naming the argument, before any work."""

from __future__ import annotations

import pytest
import torch

import vcrd
from vcrd import VCRDConfig, VCRDLoss, backends, vcrd_loss
from vcrd.loss import functional

from ..helpers import realistic_logits


@pytest.fixture
def xyz():
    s, u, y = realistic_logits(12, 31, std=10.0)
    return s.requires_grad_(), u, y


@pytest.fixture
def no_work(monkeypatch):
    """Fail the test if the fast path is entered: errors must come before any pass over the logits."""
    def boom(*a, **k):
        raise AssertionError("the loss started working before rejecting the input")
    monkeypatch.setattr(backends.registry, "run_chunks", boom)
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
    # a count of 0 for a batch that has valid rows (an all-ignored batch with 0 is fine: test_torch_path)
    "num-items-zero": (lambda s, u, y: (s, u, y, {"num_items_in_batch": 0}), ValueError, "num_items_in_batch"),
    "num-items-zero-tokens": (lambda s, u, y: (s, u, y, {"num_items_in_batch": 0, "config": "kd"}), ValueError,
                              "num_items_in_batch"),
    "num-items-negative": (lambda s, u, y: (s, u, y, {"num_items_in_batch": -3}), ValueError, "num_items_in_batch"),
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
    """SPEC §6/§9: kd normalises by tokens; the weighted presets (and the defaults) by the weights."""
    kd = VCRDConfig.preset("kd")
    assert kd.validity is None and not kd.correction and kd.normalize == "tokens"
    d = VCRDConfig.preset("discord")
    assert d.validity is None and d.correction and d.window_steps is None and d.normalize == "weights"
    assert VCRDConfig().normalize == "weights" and VCRDConfig.preset("vcrd").normalize == "weights"
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
    assert backends.resolve_impl("auto", xyz[0]) == "torch"


@pytest.mark.parametrize("normalize", ["tokens", "weights"])
def test_nan_in_a_valid_row_gives_nan_and_ignored_rows_never_matter(xyz, normalize):
    """SPEC §6 NaN policy: a NaN in valid row 2 makes the loss NaN and the gradient NaN in row 2 and in
    every row whose window holds row 2 (rows 2..6: 4-token windows, no step ids), the same rows as
    the reference (never a finite gradient beside a NaN loss, never a NaN flushed to 0); an ignored
    NaN row changes nothing."""
    s, u, y = xyz
    s = s.detach().clone()
    s[2, 5] = float("nan")
    cfg = VCRDConfig(normalize=normalize)
    nan_rows = {}
    for impl in ("torch", "reference"):
        x = s.clone().requires_grad_()
        loss = vcrd_loss(x, u, y, config=cfg, impl=impl)
        loss.backward()
        assert torch.isnan(loss), impl
        nan_rows[impl] = torch.isnan(x.grad).any(1)
    assert torch.equal(nan_rows["torch"], nan_rows["reference"]), nan_rows
    assert nan_rows["torch"][2:7].all()
    if normalize == "tokens":  # the other rows keep finite gradients
        assert not nan_rows["torch"][:2].any() and not nan_rows["torch"][7:].any()
    y2 = y.clone()
    y2[2] = -100
    x = s.clone().requires_grad_()
    loss = vcrd_loss(x, u, y2, config=cfg, impl="torch")
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all() and torch.all(x.grad[2] == 0)
    want = vcrd_loss(torch.where(torch.isnan(s), 0.0, s), u, y2, config=cfg, impl="torch")
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


class _FakeLibc:
    """Records ``madvise`` calls instead of making them."""

    def __init__(self, result: int = 0) -> None:
        self.calls, self.result = [], result

    def madvise(self, start: int, length: int, advice: int) -> int:
        self.calls.append((start, length, advice))
        return self.result


@pytest.mark.parametrize("offset", [0, 1, 1000])
def test_huge_page_hint_covers_only_the_buffers_own_pages(offset, monkeypatch):
    """``MADV_HUGEPAGE`` (14) on the page-aligned interior of the tensor, never a byte outside it; small
    buffers are left alone; a refused hint returns False."""
    from vcrd.backends import memory as _memory

    fake = _FakeLibc()
    monkeypatch.setattr(_memory, "_libc", lambda: fake)
    assert _memory.advise_huge_pages(torch.empty(10)) is False and fake.calls == []
    big = torch.empty(2**24 + offset)[offset:]  # 64 MiB, starting off a page boundary when offset > 0
    assert _memory.advise_huge_pages(big) is True
    (start, length, advice), = fake.calls
    lo, hi = big.data_ptr(), big.data_ptr() + big.numel() * big.element_size()
    assert advice == 14 and start % 4096 == 0 and length % 4096 == 0 and length > 0
    assert lo <= start and start + length <= hi and start - lo < 4096 and hi - (start + length) < 4096
    monkeypatch.setattr(_memory, "_libc", lambda: _FakeLibc(result=-1))
    assert _memory.advise_huge_pages(big) is False


def test_huge_page_hint_keeps_the_data():
    """The real call: accepted where Linux has transparent huge pages, and only a hint (a destructive
    advice such as MADV_DONTNEED would zero memory already written)."""
    import os

    from vcrd.backends.memory import advise_huge_pages

    big = torch.empty(2**25)  # 128 MiB
    big.fill_(1.5)
    accepted = advise_huge_pages(big)
    if os.path.exists("/sys/kernel/mm/transparent_hugepage/enabled"):
        assert accepted is True
    assert bool((big == 1.5).all())
