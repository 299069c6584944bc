"""The loss implementations compared on logits: each maps (student, teacher, labels, step_ids) to a loss."""

from __future__ import annotations

import torch

from vcrd import vcrd_loss


def naive_fkl(s, u, y, step_ids):
    """Plain PyTorch forward KL(q‖p) with autograd: two full log-softmaxes."""
    logp, logq = torch.log_softmax(s, -1), torch.log_softmax(u, -1)
    per_row = (logq.exp() * (logq - logp)).sum(-1)
    mask = y != -100
    return (per_row * mask).sum() / mask.sum()


def trl_jsd(s, u, y, step_ids):
    """TRL's ``generalized_jsd_loss`` with beta=0 (forward KL), its own masking and batchmean."""
    from trl.experimental.gkd.gkd_trainer import GKDTrainer

    return GKDTrainer.generalized_jsd_loss(s[None], u[None], labels=y[None], beta=0.0)


def vcrd_kd(s, u, y, step_ids):
    return vcrd_loss(s, u, y, step_ids=step_ids, config="kd", impl="torch")


def vcrd_vcrd(s, u, y, step_ids):
    return vcrd_loss(s, u, y, step_ids=step_ids, config="vcrd", impl="torch")


PROVIDERS = {"naive-fkl": naive_fkl, "trl-gjsd-beta0": trl_jsd, "vcrd-kd": vcrd_kd, "vcrd-vcrd": vcrd_vcrd}
# the vcrd preset each provider computes (forward KL averaged over the non-ignored rows is ``kd``):
# its float64 reference is what the provider's timed gradient is checked against (benches/gradcheck.py)
REFERENCE_PRESET = {"naive-fkl": "kd", "trl-gjsd-beta0": "kd", "vcrd-kd": "kd", "vcrd-vcrd": "vcrd"}


def make_inputs(N: int, V: int, seed: int = 0):
    """Realistic fp32 logits (std 10, correlated models), trace labels with 10 % ignored, 30-token steps."""
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(N, V, generator=g) * 10
    s = 0.8 * u + torch.randn(N, V, generator=g) * 6
    y = u.argmax(-1)
    y[torch.rand(N, generator=g) < 0.1] = -100
    return s, u, y, torch.arange(N) // 30
