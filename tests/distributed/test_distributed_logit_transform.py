"""The vocab-parallel loss applies each model's logit scale and soft-cap (SPEC §1) exactly as one
process does: 2 gloo ranks (``spawn``, tests/helpers.py), float64, N = 1040 rows over 4 sequences with
ignored rows, V = 37 split unevenly and padded, the default chunking.

Two oracles: the float64 reference (``vcrd.core.reference``, which applies the transform itself)
and the reference without the transform on logits this test transforms by hand
(``c·tanh(a·z/c)``, autograd through the tanh). Each shard's gradient and the loss equal both within
1e-10 (relative to the largest gradient / the loss); a zeroed or halved shard gradient is shown to fail.
"""

from __future__ import annotations

import torch

from vcrd import VCRDConfig
from vcrd.core.reference import vcrd_loss as reference_loss
from vcrd.distributed import vocab_parallel_vcrd_loss

from ..helpers import ignore_some, realistic_logits, shard_layout, spawn, step_ids_for

B, T, V = 4, 260, 37
TRANSFORM = dict(student_logit_scale=1.5, student_softcap=30.0, teacher_logit_scale=0.5, teacher_softcap=20.0)
CONFIGS = {
    "kd": VCRDConfig.preset("kd", **TRANSFORM),
    "vcrd": VCRDConfig.preset("vcrd", temperature=2.0, **TRANSFORM),
    "jsd_scale_only": VCRDConfig.preset("vcrd", divergence="jsd", beta=0.3, student_logit_scale=0.25,
                                        teacher_logit_scale=3.0),
}
TOL = 1e-10


def by_hand(z: torch.Tensor, scale: float, cap) -> torch.Tensor:
    """SPEC §1 written here: ``c·tanh(a·z/c)``, ``a·z`` without a cap."""
    return scale * z if cap is None else cap * torch.tanh(scale * z / cap)


def shard(x: torch.Tensor, start: int, width: int) -> torch.Tensor:
    """Columns ``[start, start + width)``, padded with 7.0 past V (the padding must not matter)."""
    cols = x[..., start:start + width]
    pad = width - cols.shape[-1]
    return torch.cat([cols, torch.full((*x.shape[:-1], pad), 7.0, dtype=x.dtype)], -1) if pad else cols.contiguous()


def check(rank: int, world: int, name: str, cfg: VCRDConfig, mode: str) -> None:
    s, u, y = realistic_logits(B * T, V, seed=3, std=25.0, dtype=torch.float64)  # |a·z| reaches the caps
    s, u, y = s.view(B, T, V), u.view(B, T, V), ignore_some(y, seed=3).view(B, T)
    steps = torch.stack([step_ids_for(T, seed=b) for b in range(B)])
    start, width = shard_layout(world, V, mode)[rank]

    s_ref = s.clone().requires_grad_(True)
    loss_ref = reference_loss(s_ref, u, y, step_ids=steps, config=cfg)
    loss_ref.backward()
    plain = cfg.replace(student_logit_scale=1.0, teacher_logit_scale=1.0, student_softcap=None, teacher_softcap=None)
    s_hand = s.clone().requires_grad_(True)
    loss_hand = reference_loss(by_hand(s_hand, cfg.student_logit_scale, cfg.student_softcap),
                               by_hand(u, cfg.teacher_logit_scale, cfg.teacher_softcap), y, step_ids=steps,
                               config=plain)
    loss_hand.backward()
    s_mine = shard(s, start, width).requires_grad_(True)
    loss = vocab_parallel_vcrd_loss(s_mine, shard(u, start, width), y, vocab_start=start, vocab_size=V,
                                    step_ids=steps, config=cfg)
    loss.backward()

    assert loss.dtype == torch.float64
    mine = s_mine.grad[..., :min(width, V - start)]
    assert not s_mine.grad[..., V - start:].any()  # padding columns get 0
    for truth_loss, truth in ((loss_ref, s_ref.grad), (loss_hand, s_hand.grad)):
        assert abs(loss.item() - truth_loss.item()) <= TOL * abs(truth_loss.item()), (name, mode, loss, truth_loss)
        expected, scale = truth[..., start:start + width], truth.abs().max()
        assert (mine - expected).abs().max() <= TOL * scale, (name, mode, rank)
        for wrong in (mine * 0, mine * 0.5):  # the check sees a zeroed and a halved gradient
            assert (wrong - expected).abs().max() > TOL * scale
    # the transform matters here: the same loss without it is another number
    untransformed = reference_loss(s, u, y, step_ids=steps, config=plain)
    assert abs(untransformed.item() - loss.item()) > 1e-3 * abs(loss.item()), name


def worker(rank: int, world: int) -> None:
    for name, cfg in CONFIGS.items():
        for mode in ("even", "reversed", "padded"):
            check(rank, world, name, cfg, mode)


def test_vocab_parallel_applies_the_logit_transform_like_one_process():
    spawn(worker, 2)
