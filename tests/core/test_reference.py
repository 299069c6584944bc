"""Tier 1: the reference (vcrd/core/reference.py) against per-element formulas written out in float64,
and against the JSD conventions of TRL and Liger."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from vcrd import VCRDConfig
from vcrd.core.reference import vcrd_loss as reference_loss

from ..helpers import ignore_some, realistic_logits, step_ids_for


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def log_ratio(lp_s: float, lp_u: float) -> float:
    """SPEC §5: ``clamp(lp_s - lp_u, -50, 50)``, 0 when both are -inf."""
    if lp_s == lp_u == -math.inf:
        return 0.0
    return min(50.0, max(-50.0, lp_s - lp_u))


def naive(s, u, y, seq, steps, cfg: VCRDConfig, num_items=None):
    """SPEC §2–6 one row and one window member at a time, float64. Returns (per_row, w, D, n, loss_mean)."""
    N = len(y)
    T, beta = cfg.temperature, cfg.beta
    div = cfg.divergence
    if div == "jsd" and beta in (0.0, 1.0):
        div = "fkl" if beta == 0 else "rkl"
    valid = [int(y[r]) != cfg.ignore_index for r in range(N)]
    stats = []
    for r in range(N):
        p = torch.softmax(s[r] / T, 0)
        q = torch.softmax(u[r] / T, 0)
        kl = lambda a, b: sum(float(a[v]) * math.log(float(a[v]) / float(b[v])) for v in range(len(a)) if a[v] > 0)  # noqa: E731
        if div == "fkl":
            D = kl(q, p)
        elif div == "rkl":
            D = kl(p, q)
        else:
            m = beta * q + (1 - beta) * p
            D = beta * kl(q, m) + (1 - beta) * kl(p, m)
        yr = int(y[r]) if valid[r] else 0
        lp_s, lp_u = math.log(float(p[yr])), math.log(float(q[yr]))
        a_s, a_u = int(torch.argmax(s[r])), int(torch.argmax(u[r]))
        if cfg.validity == "argmax":
            g = math.log(float(q[a_u])) - math.log(float(q[a_s]))
        elif cfg.validity == "expected":
            H = -sum(float(q[v]) * math.log(float(q[v])) for v in range(len(q)) if q[v] > 0)
            CEsu = -sum(float(p[v]) * math.log(float(q[v])) for v in range(len(q)) if p[v] > 0)
            g = CEsu - H
        else:
            g = 0.0
        w_val = 1.0 if cfg.validity is None else \
            cfg.validity_floor + (1 - cfg.validity_floor) * sigmoid((g - cfg.validity_margin) / cfg.validity_tau)
        ce = -math.log(float(torch.softmax(s[r], 0)[yr]))
        stats.append(dict(D=D, lp_s=lp_s, lp_u=lp_u, w_val=w_val, ce=ce))
    per_row, ws, ns = [], [], []
    for r in range(N):
        members = [j for j in range(r + 1) if valid[j] and seq[j] == seq[r] and
                   (j == r if cfg.window_steps is None else steps[j] >= steps[r] - cfg.window_steps)]
        k = max(len(members), 1)
        n = sum(stats[j]["lp_s"] for j in members) / k
        lbar = sum(log_ratio(stats[j]["lp_s"], stats[j]["lp_u"]) for j in members) / k
        w_dc = sigmoid((lbar - cfg.correction_bias) / cfg.correction_tau) if cfg.correction else 1.0
        w = stats[r]["w_val"] * w_dc
        ws.append(w if valid[r] else 0.0)
        ns.append(n)
        per_row.append(valid[r] * (cfg.kd_weight * w * stats[r]["D"] + cfg.ce_weight * stats[r]["ce"]))
    n_valid = sum(valid)
    Z = num_items if num_items is not None else max(n_valid, 1)
    if cfg.normalize == "weights":
        Z = max(sum(ws), 1e-6 * n_valid) * (1.0 if num_items is None else num_items / n_valid)
    return (torch.tensor(per_row, dtype=torch.float64), torch.tensor(ws, dtype=torch.float64),
            torch.tensor([st["D"] for st in stats], dtype=torch.float64), torch.tensor(ns, dtype=torch.float64),
            sum(per_row) / Z)


def layout(kind: str, N: int, with_steps: bool):
    """(seq [N], steps [N], step_ids or None, cu_seqlens or None) for a packed or batched layout."""
    if kind == "batched":
        B = 2
        seq = [r // (N // B) for r in range(N)]
        step_ids = torch.stack([step_ids_for(N // B, seed=b) for b in range(B)]) if with_steps else None
        pos = [r % (N // B) for r in range(N)]
        return seq, (step_ids.reshape(-1).tolist() if with_steps else pos), step_ids, None
    cut = [0, 13, 13, 29, N]  # includes an empty sequence
    seq, pos = [], []
    for i, (a, b) in enumerate(zip(cut[:-1], cut[1:])):
        seq += [i] * (b - a)
        pos += list(range(b - a))
    step_ids = torch.cat([step_ids_for(b - a, seed=i) for i, (a, b) in enumerate(zip(cut[:-1], cut[1:]))]) \
        if with_steps else None
    return seq, (step_ids.tolist() if with_steps else pos), step_ids, torch.tensor(cut)


def run_case(cfg, kind="packed", with_steps=True, N=40, V=97, std=3.0, num_items=None, vocab_pad=0):
    s, u, y = realistic_logits(N, V, std=std, agreement=0.7, dtype=torch.float64)
    y = ignore_some(y)
    seq, steps, step_ids, cu = layout(kind, N, with_steps)
    want_per_row, want_w, want_D, want_n, want_loss = naive(s, u, y, seq, steps, cfg, num_items)
    if vocab_pad:  # padded teacher/student vocabularies: the extra columns must not matter
        s = torch.cat([s, torch.randn(N, vocab_pad, dtype=s.dtype) * 50], 1)
        u = torch.cat([u, torch.randn(N, vocab_pad + 3, dtype=u.dtype) * 50], 1)
    shape = (2, N // 2) if kind == "batched" else (N,)
    args = (s.reshape(*shape, -1), u.reshape(*shape, -1), y.reshape(shape))
    kw = dict(step_ids=step_ids, cu_seqlens=cu, config=cfg, vocab_size=V if vocab_pad else None)
    per_row, stats = reference_loss(*args, reduction="none", return_stats=True, **kw)
    torch.testing.assert_close(per_row.reshape(-1), want_per_row, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(stats.D.reshape(-1)[y != -100], want_D[y != -100], rtol=1e-9, atol=1e-9)
    torch.testing.assert_close((stats.w_val * stats.w_dc).reshape(-1)[y != -100], want_w[y != -100],
                               rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(stats.n.reshape(-1)[y != -100], want_n[y != -100], rtol=1e-9, atol=1e-9)
    loss = reference_loss(*args, reduction="mean", num_items_in_batch=num_items, **kw)
    assert abs(float(loss) - want_loss) <= 1e-9 * max(1.0, abs(want_loss))
    total = reference_loss(*args, reduction="sum", **kw)
    assert abs(float(total) - float(want_per_row.sum())) <= 1e-9 * max(1.0, float(want_per_row.abs().sum()))


DIVERGENCES = [("fkl", 0.5), ("rkl", 0.5), ("jsd", 0.3), ("jsd", 0.0), ("jsd", 1.0)]


@pytest.mark.parametrize("validity", ["argmax", "expected", None])
@pytest.mark.parametrize("T", [1.0, 2.0])
@pytest.mark.parametrize("div,beta", DIVERGENCES, ids=[f"{d}-b{b}" for d, b in DIVERGENCES])
def test_divergence_validity_temperature(div, beta, T, validity):
    run_case(VCRDConfig(divergence=div, beta=beta, temperature=T, validity=validity, ce_weight=0.3))


@pytest.mark.parametrize("kind", ["packed", "batched"])
@pytest.mark.parametrize("with_steps", [True, False], ids=["steps", "tokens"])
@pytest.mark.parametrize("window", [0, 1, 4, None], ids=["w0", "w1", "w4", "per-token"])
def test_windows_and_layouts(window, with_steps, kind):
    run_case(VCRDConfig(window_steps=window), kind=kind, with_steps=with_steps)


@pytest.mark.parametrize("preset", ["kd", "discord", "vcrd"])
def test_presets_normalize_weights(preset):
    run_case(VCRDConfig.preset(preset, normalize="weights"))


def test_num_items_in_batch_and_vocab_truncation():
    run_case(VCRDConfig(), num_items=57)
    run_case(VCRDConfig(divergence="jsd", beta=0.4), vocab_pad=11)


@pytest.mark.parametrize("beta", [0.0, 0.3, 0.5, 1.0])
@pytest.mark.parametrize("T", [1.0, 2.0])
def test_divergence_equals_trl_generalized_jsd(beta, T):
    gkd = pytest.importorskip("trl.experimental.gkd.gkd_trainer", reason="trl is not installed")
    s, u, y = realistic_logits(24, 301, std=10.0, agreement=0.8, dtype=torch.float64)
    cfg = VCRDConfig.preset("kd", divergence="jsd", beta=beta, temperature=T)
    ours = reference_loss(s, u, y, config=cfg, reduction="none")
    trl = gkd.GKDTrainer.generalized_jsd_loss(s[None], u[None], beta=beta, temperature=T, reduction="none")
    torch.testing.assert_close(ours, trl[0].sum(-1), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("beta", [0.0, 0.3, 1.0])
def test_divergence_equals_liger_chunked_jsd(beta):
    jsd = pytest.importorskip("liger_kernel.chunked_loss.jsd_loss", reason="liger-kernel is not installed")
    s, u, y = realistic_logits(24, 301, std=10.0, agreement=0.8, dtype=torch.float64)
    y = ignore_some(y)
    cfg = VCRDConfig.preset("kd", divergence="jsd", beta=beta)
    ours = reference_loss(s, u, y, config=cfg, reduction="sum")
    liger = jsd.LigerFusedLinearJSDFunction.distillation_loss_fn(s, u, beta=beta, target=y)
    torch.testing.assert_close(ours, liger, rtol=1e-9, atol=1e-9)


def test_gradient_matches_spec_formula():
    """∂L/∂s of the reference (autograd) equals SPEC §6's closed form for every divergence."""
    s, u, y = realistic_logits(16, 53, std=3.0, dtype=torch.float64)
    y = ignore_some(y)
    m = (y != -100).double()[:, None]
    for (div, beta), normalize in itertools.product([("fkl", 0.5), ("rkl", 0.5), ("jsd", 0.3)], ("tokens", "weights")):
        cfg = VCRDConfig(divergence=div, beta=beta, temperature=1.5, ce_weight=0.2, normalize=normalize)
        x = s.clone().requires_grad_()
        loss, st = reference_loss(x, u, y, config=cfg, return_stats=True)
        loss.backward()
        T = cfg.temperature
        p, q = torch.softmax(s / T, -1), torch.softmax(u / T, -1)
        if div == "fkl":
            dD = (p - q) / T
        elif div == "rkl":
            dD = p * (p.log() - q.log() - st.D[:, None]) / T
        else:
            mix = beta * q + (1 - beta) * p
            kl_pm = (p * (p.log() - mix.log())).sum(-1, keepdim=True)
            dD = (1 - beta) * p * (p.log() - mix.log() - kl_pm) / T
        onehot = torch.nn.functional.one_hot(torch.where(y < 0, 0, y), 53).double()
        w = (st.w_val * st.w_dc)[:, None]
        Z = m.sum() if normalize == "tokens" else (m * w).sum()
        want = m / Z * (cfg.kd_weight * w * dD + cfg.ce_weight * (torch.softmax(s, -1) - onehot))
        torch.testing.assert_close(x.grad, want, rtol=1e-9, atol=1e-12)
