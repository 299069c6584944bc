"""The options every loss shares (``**options: Unpack[LossOptions]``, :mod:`vcrd.core.loss_options`): a
keyword a loss does not take raises ``TypeError`` naming it, as Python does, before any work; a misspelt
option is never silently ignored; a correctly spelt one takes effect (``reduction="sum"`` against a float64
sum written here)."""

from __future__ import annotations

import pytest
import torch

from vcrd import SparseTeacher, fused_linear_sparse_vcrd_loss, fused_linear_vcrd_loss, sparse_vcrd_loss, vcrd_loss
from vcrd.core import reference
from vcrd.core.config import VCRDConfig

N, V, H = 37, 53, 12
JUNK = object()  # not a tensor: any check or pass over the inputs would fail on it


def case():
    """Float64 hidden states and heads of both models, their logits, labels with ignored rows."""
    g = torch.Generator().manual_seed(0)
    h_s, h_t = torch.randn(N, H, generator=g, dtype=torch.float64), torch.randn(N, H, generator=g, dtype=torch.float64)
    w_s, w_t = torch.randn(V, H, generator=g, dtype=torch.float64), torch.randn(V, H, generator=g, dtype=torch.float64)
    y = torch.randint(0, V, (N,), generator=g)
    y[::5] = -100
    return h_s, w_s, h_t, w_t, y


def calls():
    """Each loss as ``(name, call(**options), call with junk inputs(**options), teacher logits its formula sees)``."""
    h_s, w_s, h_t, w_t, y = case()
    s, u = h_s @ w_s.T, h_t @ w_t.T
    sparse = SparseTeacher.from_logits(u, V)  # K = V: the completed teacher is the teacher itself (fp32 log-probs)
    logq = torch.log_softmax(u.float(), -1).double()
    return [
        ("vcrd_loss", lambda **o: vcrd_loss(s, u, y, **o), lambda **o: vcrd_loss(JUNK, JUNK, JUNK, **o), u),
        ("reference", lambda **o: reference.vcrd_loss(s, u, y, **o),
         lambda **o: reference.vcrd_loss(JUNK, JUNK, JUNK, **o), u),
        ("fused_linear_vcrd_loss", lambda **o: fused_linear_vcrd_loss(h_s, w_s, h_t, w_t, y, **o),
         lambda **o: fused_linear_vcrd_loss(JUNK, JUNK, JUNK, JUNK, JUNK, **o), u),
        ("sparse_vcrd_loss", lambda **o: sparse_vcrd_loss(s, sparse, y, **o),
         lambda **o: sparse_vcrd_loss(JUNK, JUNK, JUNK, **o), logq),
        ("fused_linear_sparse_vcrd_loss", lambda **o: fused_linear_sparse_vcrd_loss(h_s, w_s, sparse, y, **o),
         lambda **o: fused_linear_sparse_vcrd_loss(JUNK, JUNK, JUNK, JUNK, **o), logq),
    ]


NAMES = [name for name, *_ in calls()]


def kd_sum(s: torch.Tensor, teacher: torch.Tensor, y: torch.Tensor) -> float:
    """Preset ``kd`` with ``reduction="sum"`` in float64 from its formula: ``Σ_valid kd_weight·KL(q_T ‖ p_T)``."""
    cfg = VCRDConfig.preset("kd")
    assert cfg.divergence == "fkl" and cfg.validity is None and not cfg.correction and cfg.ce_weight == 0
    logp = torch.log_softmax(s / cfg.temperature, -1)
    logq = torch.log_softmax(teacher / cfg.temperature, -1)
    kl = (logq.exp() * (logq - logp)).sum(-1)
    return float(cfg.kd_weight * kl[y != cfg.ignore_index].sum())


@pytest.mark.parametrize("index", range(len(NAMES)), ids=NAMES)
def test_unknown_keyword_raises_type_error_before_any_work(index):
    name, _, junk_call, _ = calls()[index]
    caller = "vcrd_loss" if name == "reference" else name
    for bad in ("reducton", "chunk_rows", "vocab_start"):
        with pytest.raises(TypeError) as info:
            junk_call(reducton="sum") if bad == "reducton" else junk_call(**{bad: 1})
        assert str(info.value) == f"{caller}() got an unexpected keyword argument '{bad}'"
    with pytest.raises(Exception) as info:  # the junk inputs do fail the checks once the keywords are right
        junk_call(reduction="sum")
    assert "unexpected keyword" not in str(info.value)


@pytest.mark.parametrize("index", range(len(NAMES)), ids=NAMES)
def test_misspelt_option_is_not_ignored_and_a_spelt_one_takes_effect(index):
    name, call, _, teacher = calls()[index]
    h_s, w_s, _, _, y = case()
    with pytest.raises(TypeError, match="'reducton'"):
        call(config="kd", reducton="sum")
    total = call(config="kd", reduction="sum")
    want = kd_sum(h_s @ w_s.T, teacher, y)
    assert float(total) == pytest.approx(want, rel=1e-6)
    mean = call(config="kd")  # the default reduction: "mean" over the valid rows
    assert float(mean) == pytest.approx(want / int((y != -100).sum()), rel=1e-6)


def test_the_reference_takes_no_impl():
    h_s, w_s, h_t, w_t, y = case()
    with pytest.raises(TypeError, match="unexpected keyword argument 'impl'"):
        reference.vcrd_loss(h_s @ w_s.T, h_t @ w_t.T, y, impl="torch")
