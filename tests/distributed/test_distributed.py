"""Vocab-parallel loss (SPEC §11) on real process groups: gloo, 2 and 3 CPU processes.

Each worker builds the same full logits, keeps its own columns (V=37: divisible by neither 2 nor 3,
uneven shards, ranks holding columns out of rank order, a padded last shard), and checks
:func:`vcrd.distributed.vocab_parallel_vcrd_loss` against the single-process loss (the CPU path and
the float64 reference): the loss on every rank and each rank's gradient of its columns. It counts
the collectives (``dist.all_reduce`` / ``dist.all_gather_object`` wrapped) and checks that bad
layouts raise the same ``ValueError`` on every rank and leave the group usable (no hang: the
group's timeout is 120 s). Workers start through ``spawn`` (tests/helpers.py).
"""

from __future__ import annotations

import pytest
import torch

from vcrd import VCRDConfig
from vcrd.core.reference import vcrd_loss as reference_loss
from vcrd.distributed import vocab_parallel_vcrd_loss
from vcrd.loss.functional import vcrd_loss

from ..helpers import CollectiveCounter, ignore_some, realistic_logits, shard_layout, spawn, step_ids_for

V = 37
N = 24
CHUNK = 8  # 3 chunks of rows
CONFIGS = {
    "kd": VCRDConfig.preset("kd"),
    "vcrd": VCRDConfig.preset("vcrd"),
    "jsd": VCRDConfig.preset("vcrd", divergence="jsd", beta=0.3, temperature=2.0),
    "rkl_ce": VCRDConfig.preset("vcrd", divergence="rkl", ce_weight=0.5, temperature=1.5, validity="expected"),
}


def _inputs(seed: int, shape3d: bool = False):
    s, u, y = realistic_logits(N, V, seed=seed, std=4.0)
    y = ignore_some(y, seed=seed)
    steps = step_ids_for(N, seed=seed)
    if shape3d:  # [B, T, V]
        return s.view(2, N // 2, V), u.view(2, N // 2, V), y.view(2, N // 2), steps.view(2, N // 2)
    return s, u, y, steps


def _shard(x: torch.Tensor, start: int, width: int) -> torch.Tensor:
    """Columns [start, start + width), zero-padded past V (the padding must not matter)."""
    cols = x[..., start:start + width]
    pad = width - cols.shape[-1]
    if pad:
        cols = torch.cat([cols, torch.full((*x.shape[:-1], pad), 7.0, dtype=x.dtype)], -1)
    return cols.contiguous()


def _check_case(rank, world, cfg, mode, shape3d, seed, counter=None, dtype=torch.float32):
    s, u, y, steps = _inputs(seed, shape3d)
    s, u = s.to(dtype), u.to(dtype)
    start, width = shard_layout(world, V, mode)[rank]
    # single process: the CPU path (eager) and the float64 reference
    s_one = s.clone().requires_grad_(True)
    loss_one = vcrd_loss(s_one, u, y, step_ids=steps, config=cfg, impl="torch")
    loss_one.backward()
    s_ref = s.double().requires_grad_(True)
    loss_ref = reference_loss(s_ref, u.double(), y, step_ids=steps, config=cfg)
    loss_ref.backward()
    # vocab parallel
    s_mine = _shard(s, start, width).requires_grad_(True)
    if counter is not None:
        counter.reset()
    loss = vocab_parallel_vcrd_loss(s_mine, _shard(u, start, width), y, vocab_start=start, vocab_size=V,
                                    step_ids=steps, config=cfg, chunk_rows=CHUNK)
    loss.backward()
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    scale = loss_ref.abs().item()
    assert abs(loss.item() - loss_one.item()) <= tol * scale, (loss.item(), loss_one.item())
    assert abs(loss.item() - loss_ref.item()) <= tol * scale, (loss.item(), loss_ref.item())
    mine = s_mine.grad[..., :min(width, V - start)].double()
    for full in (s_one.grad, s_ref.grad):
        expected = full[..., start:start + width].double()
        err = (mine - expected).abs().max() / full.double().abs().max()
        assert err <= tol, (cfg, mode, float(err))
    assert not s_mine.grad[..., V - start:].any()  # padding columns get 0
    return loss.detach()


def _worker(rank: int, world: int) -> None:
    import torch.distributed as dist

    counter = CollectiveCounter(dist)
    try:
        losses = []
        for i, (name, cfg) in enumerate(CONFIGS.items()):
            for mode in ("even", "reversed", "padded"):
                loss = _check_case(rank, world, cfg, mode, shape3d=False, seed=i, counter=counter)
                # collectives: one metadata all_gather_object, one all_reduce per chunk (two for jsd)
                per_chunk = 2 if cfg.divergence == "jsd" else 1
                assert counter.counts == {"all_reduce": per_chunk * (N // CHUNK), "all_gather_object": 1}, \
                    (name, counter.counts)
                losses.append(loss)
        # [B, T, V] logits with step ids (chunks per sequence: 2 sequences of 12 rows → 4 chunks)
        _check_case(rank, world, CONFIGS["vcrd"], "even", shape3d=True, seed=7, counter=counter)
        assert counter.counts["all_reduce"] == 2 * -(-(N // 2) // CHUNK)
        # bf16 logits (fp32 math inside)
        _check_case(rank, world, CONFIGS["vcrd"], "even", shape3d=False, seed=8, dtype=torch.bfloat16)
        _check_edges(rank, world)
        for name in ("kd", "vcrd"):
            _check_large(rank, world, CONFIGS[name])
        # the loss is the same on every rank
        gathered = [None] * world
        dist.all_gather_object(gathered, [float(x) for x in losses])
        assert all(g == gathered[0] for g in gathered)
        _check_errors(rank, world)
    finally:
        counter.restore()


def _check_large(rank: int, world: int, cfg) -> None:
    """N >= 1024 rows over several sequences, V = 1031 split unevenly, the default chunking: each shard's
    gradient and the loss equal the float64 reference within 1e-5 of the largest gradient (so a
    zeroed or halved shard gradient fails)."""
    B, T, Vl = 4, 260, 1031
    s, u, y = realistic_logits(B * T, Vl, seed=21, std=10.0)
    s, u, y = s.view(B, T, Vl), u.view(B, T, Vl), ignore_some(y, seed=21).view(B, T)
    steps = torch.stack([step_ids_for(T, seed=b) for b in range(B)])
    start, width = shard_layout(world, Vl, "even")[rank]
    s_ref = s.double().requires_grad_(True)
    loss_ref = reference_loss(s_ref, u.double(), y, step_ids=steps, config=cfg)
    loss_ref.backward()
    s_mine = _shard(s, start, width).requires_grad_(True)
    loss = vocab_parallel_vcrd_loss(s_mine, _shard(u, start, width), y, vocab_start=start, vocab_size=Vl,
                                    step_ids=steps, config=cfg)
    loss.backward()
    assert abs(loss.item() - loss_ref.item()) <= 1e-5 * abs(loss_ref.item()), (loss.item(), loss_ref.item())
    err = (s_mine.grad.double() - s_ref.grad[..., start:start + width]).abs().max() / s_ref.grad.abs().max()
    assert err <= 1e-5, float(err)


def _check_edges(rank: int, world: int) -> None:
    """A shard whose columns are all -inf in some rows (masked vocabulary), and a NaN in one rank's
    columns: the same loss and gradient (NaN where one process has NaN) as one process."""
    s, u, y, steps = _inputs(9)
    start, width = shard_layout(world, V, "even")[rank]
    masked = shard_layout(world, V, "even")[0][1]
    s, u = s.clone(), u.clone()
    s[:6, :masked], u[:6, :masked] = -torch.inf, -torch.inf  # rank 0's columns, in rows 0-5
    y = torch.where((torch.arange(N) < 6) & (y >= 0) & (y < masked), masked, y)
    for nan in (False, True):
        if nan:
            s[10, V - 1] = torch.nan  # the last rank's columns
        s_one = s.clone().requires_grad_(True)
        expected = vcrd_loss(s_one, u, y, step_ids=steps, config="vcrd", impl="torch")
        expected.backward()
        s_mine = _shard(s, start, width).requires_grad_(True)
        loss = vocab_parallel_vcrd_loss(s_mine, _shard(u, start, width), y, vocab_start=start, vocab_size=V,
                                        step_ids=steps, config="vcrd", chunk_rows=CHUNK)
        loss.backward()
        torch.testing.assert_close(loss, expected, rtol=1e-5, atol=0, equal_nan=True)
        torch.testing.assert_close(s_mine.grad, s_one.grad[:, start:start + width], rtol=1e-5, atol=1e-7,
                                   equal_nan=True)
        assert loss.isnan().item() == nan


def _check_errors(rank: int, world: int) -> None:
    s, u, y, steps = _inputs(3)
    spans = shard_layout(world, V, "even")
    start, width = spans[rank]

    def call(**over):
        args = dict(vocab_start=start, vocab_size=V, step_ids=steps, config="vcrd", chunk_rows=CHUNK)
        st, wd = over.pop("span", (start, width))
        args.update(over, vocab_start=over.get("vocab_start", st))
        return vocab_parallel_vcrd_loss(_shard(s, st, wd), _shard(u, st, wd), y, **args)

    bad = {
        "gap": dict(span=(spans[-1][0] + 1, spans[-1][1] - 1) if rank == world - 1 else (start, width)),
        "overlap": dict(span=(max(start - 1, 0), width + (start > 0)) if rank == 1 else (start, width)),
        "V": dict(vocab_size=V + 1 if rank == 0 else V),
        "config": dict(config="kd" if rank == 1 else "vcrd"),
        "local input": dict(step_ids=steps.flip(0) if rank == 1 else steps),
        "chunks": dict(chunk_rows=CHUNK + (rank == 0)),
        "bad config": dict(config="no-such-preset" if rank == world - 1 else "vcrd"),
    }
    expected = {"gap": "do not tile", "overlap": "do not tile", "V": "disagree on vocab_size",
                "config": "disagree on config", "local input": "rank 1: step_ids",
                "chunks": "disagree on the row chunks", "bad config": f"rank {world - 1}: preset"}
    for name, over in bad.items():
        with pytest.raises(ValueError, match=expected[name]):
            call(**over)
        call()  # the group is still in step after the refusal (a hang would time out)


@pytest.mark.parametrize("world", [2, 3])
def test_vocab_parallel_equals_single_process(world):
    spawn(_worker, world)


def test_vocab_parallel_one_process_is_the_loss(monkeypatch):
    """Without an initialised group the call is the plain loss (one shard holding every column)."""
    monkeypatch.setenv("VCRD_COMPILE", "0")
    for cfg in CONFIGS.values():
        s, u, y, steps = _inputs(5)
        s1, s2 = s.clone().requires_grad_(True), s.clone().requires_grad_(True)
        expected = vcrd_loss(s1, u, y, step_ids=steps, config=cfg, impl="torch")
        expected.backward()
        loss, stats = vocab_parallel_vcrd_loss(s2, u, y, vocab_start=0, vocab_size=V, step_ids=steps, config=cfg,
                                               chunk_rows=CHUNK, return_stats=True)
        loss.backward()
        torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-7)
        err = (s2.grad - s1.grad).abs().max() / s1.grad.abs().max()  # relative to the gradient's scale
        assert err <= 1e-5, float(err)
        assert stats.D.shape == y.shape


def test_vocab_parallel_refuses_bad_layout_in_one_process():
    s, u, y, steps = _inputs(5)
    with pytest.raises(ValueError, match="do not tile"):
        vocab_parallel_vcrd_loss(s[:, :30], u[:, :30], y.clamp_max(29), vocab_start=0, vocab_size=V)
    with pytest.raises(ValueError, match="reduction"):
        vocab_parallel_vcrd_loss(s, u, y, vocab_start=0, vocab_size=V, reduction="batchmean")
    with pytest.raises(ValueError, match="teacher must not require grad"):
        vocab_parallel_vcrd_loss(s, u.requires_grad_(True), y, vocab_start=0, vocab_size=V)
