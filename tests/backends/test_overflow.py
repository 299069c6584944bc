"""Logits anywhere in fp32's range (docs/numerics.md, "Logits near fp32's maximum").

Rows with logits around ±1e38..3e38, rows mixing huge and ordinary values, near-equal huge models:
on every path (CPU compiled and eager, fused-linear, Triton under the interpreter) every row whose
float64 reference loss is representable in fp32 gets a finite loss and gradient that agree with the
reference; a row whose true loss is beyond fp32's range gets ``inf`` with a NaN gradient row (never
a finite gradient beside a non-finite loss).
"""

from __future__ import annotations

import os

import pytest
import torch

from vcrd import VCRDConfig, fused_linear_vcrd_loss, vcrd_loss

from ..helpers import realistic_logits, upstream_gradient

FMAX = torch.finfo(torch.float32).max
RTOL = 1e-5  # relative to the row's reference (loss) or to the row's largest reference entry (gradient)
CONFIGS = [VCRDConfig(divergence=d, temperature=T, ce_weight=ce, beta=0.4, validity=v)
           for d in ("fkl", "rkl", "jsd") for T in (1.0, 2.0) for ce, v in ((0.0, "argmax"), (0.3, "expected"))]
IDS = [f"{c.divergence}-T{c.temperature:g}-{'ce' if c.ce_weight else 'noce'}" for c in CONFIGS]


def huge_logits(overflowing: bool, seed: int = 0, V: int = 211):
    """``s, u [14, V]`` fp32 and labels: ordinary rows, rows uniform in ±3e38 and ±1e38, ordinary rows
    with a few entries at ±3e38 (in the student, the teacher or both), near-equal huge models, an
    ignored huge row; with ``overflowing`` also rows whose true loss is beyond fp32's range (the
    student puts -3.3e38 where the teacher puts 3.3e38 and has a maximum at 1e38; the student's label
    at -3e38 beside 3e38)."""
    g = torch.Generator().manual_seed(seed)
    s, u, y = realistic_logits(14, V, std=10.0, seed=seed)
    uniform = lambda scale: (torch.rand(V, generator=g, dtype=torch.float64) * 2 - 1) * scale  # noqa: E731
    s[1], u[1] = uniform(3e38), uniform(3e38)
    s[2], u[2] = uniform(1e38), uniform(1e38)
    s[3, [3, 50, 100]] = torch.tensor([3e38, -3e38, 2.5e38], dtype=s.dtype)  # huge student entries
    u[4, [7, 60]] = torch.tensor([-3e38, 3e38], dtype=u.dtype)  # huge teacher entries
    s[5, [9, 90]], u[5, [9, 91]] = 3e38, -3e38
    s[6] = uniform(3e38)
    u[6] = s[6] + uniform(1e37)  # near-equal huge models
    s[7], u[7] = uniform(1e38) + 2e38, uniform(1e38) - 2e38  # all huge, opposite signs
    s[8] = uniform(3e38)  # a huge student beside an ordinary teacher
    u[9] = uniform(3e38)  # and the other way round
    s[10], u[10], y[10] = uniform(3e38), uniform(3e38), -100  # ignored: never matters
    if overflowing:  # D beyond fp32's range at T = 1 (fkl, rkl); CE beyond it at any T
        top_s, top_u = int(s[11].argmax()), int(u[11].argmax())
        s[11, top_s], s[11, top_u], u[11, top_s], u[11, top_u] = 1e38, -3.3e38, -3.3e38, 3.3e38
        s[12, [0, 1]], y[12] = torch.tensor([3e38, -3e38], dtype=s.dtype), 1
    return s.float(), u.float(), y


def reference_rows(s, u, y, cfg):
    """The float64 reference, per row: ``(loss, logit gradient, beyond, tol)`` with a random ``[N]``
    upstream gradient. ``beyond``: rows whose loss, D or CE is beyond fp32's range (their documented
    outcome is an ``inf`` loss and a NaN gradient row). ``tol [N, V]``: the gradient's fp32
    conditioning, ``RTOL·(|c|/T·(p + q)·(1 + |D|·[rkl]) + |e|·(softmax(s) + onehot(y)))`` with
    ``c = upstream·kd·w`` and ``e = upstream·ce_weight`` (rkl's gradient ``p·(log p - log q - D)``
    is a difference of terms as large as D)."""
    x, upstream = s.double().requires_grad_(), upstream_gradient(y.shape)
    loss, stats = vcrd_loss(x, u.double(), y, config=cfg, reduction="none", impl="reference", return_stats=True)
    loss.backward(upstream)
    T, yy = cfg.temperature, y.clamp_min(0)[:, None]
    ce = torch.logsumexp(s.double(), -1) - s.double().gather(1, yy).squeeze(1)
    beyond = (loss.abs() > FMAX) | (stats.D.abs() > FMAX) | ((ce > FMAX) & (cfg.ce_weight > 0))
    p, q = torch.softmax(s.double() / T, -1), torch.softmax(u.double() / T, -1)
    c = (upstream * cfg.kd_weight * stats.w_val * stats.w_dc).abs()[:, None]
    conditioning = 1 + stats.D.abs()[:, None] if cfg.divergence == "rkl" else 1.0
    onehot = torch.zeros_like(p).scatter_(1, yy, 1.0)
    e = (upstream * cfg.ce_weight).abs()[:, None]
    tol = RTOL * (c / T * (p + q) * conditioning + e * (torch.softmax(s.double(), -1) + onehot)) + 1e-37
    return loss.detach(), x.grad, beyond, tol


def check_rows(loss, grad, truth_loss, truth_grad, beyond, tol, valid):
    """Rows within fp32's range: finite, the loss within RTOL of the reference, the gradient within
    ``tol``; rows beyond it: ``inf`` loss and an all-NaN gradient row; ignored rows: 0, zero gradient."""
    loss, grad = loss.double(), grad.double()
    assert torch.all(beyond | (truth_loss.abs() < 0.999 * FMAX)), "a test row sits at fp32's edge"
    rows = valid & ~beyond
    assert torch.isfinite(loss[rows]).all() and torch.isfinite(grad[rows]).all(), \
        f"non-finite loss or gradient in rows {torch.nonzero(rows & ~torch.isfinite(grad).all(1)).tolist()}"
    err = (loss - truth_loss).abs()[rows]
    assert torch.all(err <= RTOL * truth_loss.abs()[rows] + 1e-6), f"loss errors {err.tolist()}"
    bad = ((grad - truth_grad).abs() > tol).any(1) & rows
    assert not bad.any(), f"gradient rows {torch.nonzero(bad).flatten().tolist()} differ beyond their conditioning"
    assert torch.all(loss[valid & beyond] == torch.inf) and torch.isnan(grad[valid & beyond]).all(), "rows beyond"
    assert torch.all(loss[~valid] == 0) and torch.all(grad[~valid] == 0)
    return int((valid & beyond).sum())


def logits_rows(s, u, y, cfg, impl):
    x = s.clone().requires_grad_()
    loss = vcrd_loss(x, u, y, config=cfg, reduction="none", impl=impl)
    loss.backward(upstream_gradient(loss.shape).float())
    return loss.detach(), x.grad


@pytest.mark.parametrize("cfg", CONFIGS, ids=IDS)
@pytest.mark.parametrize("compiled", [True, False], ids=["compiled", "eager"])
def test_cpu_path_rows(cfg, compiled, monkeypatch):
    if not compiled:
        monkeypatch.setenv("VCRD_COMPILE", "0")
    s, u, y = huge_logits(overflowing=True)
    beyond = check_rows(*logits_rows(s, u, y, cfg, "torch"), *reference_rows(s, u, y, cfg), y != -100)
    # the outcome beyond fp32's range is exercised: row 11's D at T = 1 (JSD is bounded), row 12's CE
    assert beyond >= int(cfg.temperature == 1.0 and cfg.divergence != "jsd") + int(cfg.ce_weight > 0)


def within_range(s, u, y, cfg):
    """The labels with every row beyond fp32's range ignored (so each row's loss is representable)."""
    return torch.where(reference_rows(s, u, y, cfg)[2], -100, y)


@pytest.mark.parametrize("reduction,normalize", [("mean", "weights"), ("mean", "tokens"), ("sum", "tokens")])
def test_mean_of_rows_near_the_maximum_is_finite(reduction, normalize):
    """Rows of up to ~3e38 each: their sum is beyond fp32's range, their mean is not (summed in float64)."""
    cfg = VCRDConfig(ce_weight=0.3, normalize=normalize)
    s, u, y = huge_logits(overflowing=False)
    s, u, y = torch.cat([s, s]), torch.cat([u, u]), torch.cat([y, y])  # Σ beyond fp32's range
    y = within_range(s, u, y, cfg)
    x, xr = s.clone().requires_grad_(), s.double().requires_grad_()
    loss = vcrd_loss(x, u, y, config=cfg, reduction=reduction)
    truth = vcrd_loss(xr, u.double(), y, config=cfg, reduction=reduction, impl="reference")
    loss.backward()
    truth.backward()
    assert torch.isfinite(x.grad).all()  # every row is within range
    if reduction == "sum":
        assert truth > FMAX and loss == torch.inf
        return
    assert torch.isfinite(loss) and abs(loss.double() - truth) <= RTOL * truth
    torch.testing.assert_close(x.grad.double(), xr.grad, rtol=0, atol=RTOL * xr.grad.abs().max().item())


@pytest.mark.parametrize("cfg", [CONFIGS[i] for i in (0, 3, 5, 9, 11)], ids=[IDS[i] for i in (0, 3, 5, 9, 11)])
def test_fused_linear(cfg):
    """Identity hidden states make the logits the LM heads themselves (``I @ W^T = W^T`` exactly),
    so ``grad_weight`` is the logit gradient transposed; chunks of 4 rows."""
    s, u, y = huge_logits(overflowing=True)
    eye = torch.eye(s.shape[0])
    Ws, Wt = s.T.contiguous().requires_grad_(), u.T.contiguous()
    loss = fused_linear_vcrd_loss(eye, Ws, eye, Wt, y, config=cfg, reduction="sum", chunk_size=4)
    loss.backward()
    beyond = reference_rows(s, u, y, cfg)[2] & (y != -100)
    # grad_weight = g^T @ h mixes every row: a NaN gradient row reaches all of it (never a finite one)
    assert loss == torch.inf and beyond.any() and torch.isnan(Ws.grad.T[beyond]).all()
    # the rows within range alone: their mean matches the reference, and so do their gradient rows
    keep = within_range(s, u, y, cfg)
    Ws.grad = None
    loss = fused_linear_vcrd_loss(eye, Ws, eye, Wt, keep, config=cfg, chunk_size=4)
    loss.backward()
    x = s.double().requires_grad_()
    truth = vcrd_loss(x, u.double(), keep, config=cfg, impl="reference")
    truth.backward()
    assert torch.isfinite(loss) and abs(loss.double() - truth) <= RTOL * truth.abs() + 1e-6
    torch.testing.assert_close(Ws.grad.T.double(), x.grad, rtol=0, atol=RTOL * x.grad.abs().max().item())


@pytest.mark.triton
@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
                    reason="needs TRITON_INTERPRET=1 (set before Python starts) or a CUDA device")
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("cfg", CONFIGS, ids=IDS)
def test_triton_rows(cfg):
    s, u, y = huge_logits(overflowing=True)
    check_rows(*logits_rows(s, u, y, cfg, "triton"), *reference_rows(s, u, y, cfg), y != -100)


@pytest.mark.triton
@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
                    reason="needs TRITON_INTERPRET=1 (set before Python starts) or a CUDA device")
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_triton_label_logprob_kernel():
    from vcrd.kernels.label_logprob import label_logprob

    s, _, y = huge_logits(overflowing=False)
    y = y.clamp_min(0)
    lse, lp = label_logprob(s, y, temperature=2.0)
    want = torch.log_softmax(s.double() / 2.0, -1).gather(1, y[:, None]).squeeze(1)
    torch.testing.assert_close(lse.double(), torch.logsumexp(s.double() / 2.0, -1), rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(lp.double(), want, rtol=1e-6, atol=1e-5)
