"""TRL's and Liger's conventions, as their users call them: labels=None, batchmean, keyword options."""

from __future__ import annotations

import pytest
import torch

from vcrd import FusedLinearVCRDLoss, VCRDConfig, VCRDLoss, fused_linear_vcrd_loss, vcrd_loss

from ..helpers import realistic_logits


def trl_jsd(s, u, labels=None, beta=0.5, temperature=1.0, reduction="batchmean"):
    from trl.experimental.gkd.gkd_trainer import GKDTrainer

    return GKDTrainer.generalized_jsd_loss(s, u, labels=labels, beta=beta, temperature=temperature,
                                           reduction=reduction)


def peer_config(beta: float, temperature: float = 1.0) -> VCRDConfig:
    """TRL's generalized JSD: no weights, no CE, plain token mean."""
    return VCRDConfig(divergence="jsd", beta=beta, temperature=temperature, validity=None, correction=False,
                      normalize="tokens")


@pytest.mark.parametrize("beta", [0.0, 0.3, 0.5, 1.0])
@pytest.mark.parametrize("with_labels", [False, True], ids=["labels=None", "labels"])
@pytest.mark.parametrize("impl", ["torch", "reference"])
def test_trl_generalized_jsd_batchmean(beta, with_labels, impl):
    B, T, V = 3, 17, 211
    s, u, y = realistic_logits(B * T, V, std=3.0, seed=4)
    s, u, y = s.reshape(B, T, V).double(), u.reshape(B, T, V).double(), y.reshape(B, T)
    y[0, :5] = -100
    labels = y if with_labels else None
    grads = []
    for fn in ("trl", "vcrd"):
        x = s.clone().requires_grad_()
        if fn == "trl":
            loss = trl_jsd(x, u, labels=labels, beta=beta, temperature=2.0)
        else:
            loss = vcrd_loss(x, u, labels, config=peer_config(beta, 2.0), reduction="batchmean", impl=impl)
        loss.backward()
        grads.append((loss.detach(), x.grad))
    torch.testing.assert_close(grads[1][0], grads[0][0], rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(grads[1][1], grads[0][1], rtol=1e-9, atol=1e-12)


def test_without_labels_every_row_counts_and_label_statistics_are_undefined():
    s, u, _ = realistic_logits(40, 97, seed=2)
    x = s.clone().requires_grad_()
    loss, stats = vcrd_loss(x, u, None, config="kd", return_stats=True)
    torch.testing.assert_close(loss, vcrd_loss(s, u, torch.randint(0, 97, (40,)), config="kd"))
    assert bool(stats.valid.all()) and torch.isnan(stats.lp_s).all() and torch.isfinite(stats.D).all()


@pytest.mark.parametrize("config", ["vcrd", "discord", VCRDConfig(validity=None, correction=False, ce_weight=0.5)],
                         ids=["vcrd", "discord", "ce"])
def test_labels_required_where_the_trace_token_is_used(config):
    s, u, _ = realistic_logits(8, 31)
    with pytest.raises(ValueError, match="labels: required"):
        vcrd_loss(s, u, None, config=config)


def test_modules_take_config_fields_as_keywords():
    loss = VCRDLoss(divergence="jsd", beta=0.3, temperature=2.0, reduction="sum")
    assert loss.config == VCRDConfig(divergence="jsd", beta=0.3, temperature=2.0) and loss.reduction == "sum"
    assert VCRDLoss("kd", temperature=2.0).config == VCRDConfig.preset("kd", temperature=2.0)
    assert FusedLinearVCRDLoss("kd", ignore_index=-1).config.ignore_index == -1
    with pytest.raises(TypeError, match="tempurature"):
        VCRDLoss(tempurature=2.0)
    with pytest.raises(ValueError, match="temperature"):
        VCRDLoss(temperature=-1.0)


def test_fused_linear_output_dtype_is_the_same_for_every_impl():
    g = torch.Generator().manual_seed(0)
    h, w = torch.randn(12, 8, generator=g), torch.randn(31, 8, generator=g)
    y = torch.randint(0, 31, (12,), generator=g)
    out = {impl: fused_linear_vcrd_loss(h, w, h, w, y, impl=impl) for impl in ("torch", "reference")}
    assert {v.dtype for v in out.values()} == {torch.float32}
    torch.testing.assert_close(out["torch"], out["reference"])
    assert fused_linear_vcrd_loss(h.double(), w.double(), h.double(), w.double(), y, impl="reference").dtype \
        == torch.float64


def test_fused_linear_batchmean_without_labels_matches_logits_loss():
    g = torch.Generator().manual_seed(1)
    B, T, H, V = 2, 9, 8, 53
    h, w = torch.randn(B, T, H, generator=g), torch.randn(V, H, generator=g) * 2
    ht, wt = torch.randn(B, T, H, generator=g), torch.randn(V, H, generator=g) * 2
    cfg = peer_config(0.5)
    fused = fused_linear_vcrd_loss(h, w, ht, wt, None, config=cfg, reduction="batchmean")
    logits = vcrd_loss(h @ w.T, ht @ wt.T, None, config=cfg, reduction="batchmean")
    torch.testing.assert_close(fused, logits, rtol=1e-5, atol=1e-6)
