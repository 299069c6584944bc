"""Vocab-parallel fused-linear loss (SPEC §11) on real process groups: gloo, 2 and 3 CPU processes.

Every worker builds the same hidden states and LM heads (``heads`` of test_fused_linear: correlated,
std-10 logits, ignored rows, step ids), keeps its rows of both heads (V divisible by neither 2 nor 3:
uneven shards, ranks holding rows out of rank order, a padded last shard) and checks
:func:`vcrd.distributed.fused_linear_vocab_parallel_vcrd_loss` with the three-way rule of
tests/helpers.py: the loss, ``grad_hidden`` and this rank's rows of ``grad_weight`` / ``grad_bias``
against the float64 reference (truth) and the single-process ``fused_linear_vcrd_loss`` (base), with
a random upstream gradient. It counts the collectives and checks that bad layouts raise the same
``ValueError`` on every rank and leave the group usable.
"""

from __future__ import annotations

import math

import pytest
import torch

from vcrd import VCRDConfig, fused_linear_vcrd_loss
from vcrd.distributed import fused_linear_vocab_parallel_vcrd_loss

from ..helpers import CollectiveCounter, assert_parity, linear_heads, run_with_grads, shard_layout, spawn, step_ids_for

CONFIGS = {
    "kd": VCRDConfig.preset("kd"),
    "vcrd": VCRDConfig(),
    "jsd-T2-ce-expected": VCRDConfig(divergence="jsd", beta=0.3, temperature=2.0, ce_weight=0.3, validity="expected"),
    "rkl-tokens": VCRDConfig(divergence="rkl", normalize="tokens", window_steps=1),
}
PAD = 7.0  # the value of a padded shard's rows past V (must not matter)


def _rows(t, start: int, width: int):
    """Rows ``[start, start + width)`` of a head or bias, padded with PAD past its end."""
    if t is None:
        return None
    rows = t[start:start + width]
    pad = width - rows.shape[0]
    if pad:
        rows = torch.cat([rows, torch.full((pad, *t.shape[1:]), PAD, dtype=t.dtype)])
    return rows.contiguous()


def _three_way(d, cfg, start: int, width: int, V: int, counter=None, **kw):
    """Loss, grad_hidden and this shard's grad_weight / grad_bias rows: vocab-parallel (fp32) vs the
    float64 reference (truth) and the single-process fused-linear loss in fp32 (base)."""
    common = dict(step_ids=d["steps"], config=cfg, **kw)
    ref_kw = {k: v for k, v in common.items() if k != "chunk_size"}
    f32 = {k: (v.float() if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in d.items()}
    leaves = lambda x: [x["hs"], x["Ws"], x["bs"]]  # noqa: E731

    def single(impl, x):
        return lambda hs, Ws, bs: fused_linear_vcrd_loss(hs, Ws, x["ht"], x["Wt"], x["y"], student_bias=bs,
                                                         impl=impl, **(common if impl == "torch" else ref_kw))

    truth = run_with_grads(single("reference", d), leaves(d), "random")
    base = run_with_grads(single("torch", f32), leaves(f32), "random")
    if counter is not None:
        counter.reset()
    got = run_with_grads(
        lambda hs, Ws, bs: fused_linear_vocab_parallel_vcrd_loss(
            hs, Ws, f32["ht"], _rows(f32["Wt"], start, width), f32["y"], student_bias_shard=bs, vocab_start=start,
            vocab_size=V, **common),
        [f32["hs"], _rows(f32["Ws"], start, width), _rows(f32["bs"], start, width)], "random")
    end = min(start + width, V) - start
    for name, i in (("loss", 0), ("grad_hidden", 1)):
        assert_parity(name, got[i], base[i], truth[i], torch.float32)
    for name, i in (("grad_weight rows", 2), ("grad_bias rows", 3)):
        assert_parity(name, got[i][:end], base[i][start:start + end], truth[i][start:start + end], torch.float32)
        assert not got[i][end:].any(), f"{name}: padding rows got a gradient"
    return got[0]


def _worker(rank: int, world: int) -> None:
    import torch.distributed as dist

    counter = CollectiveCounter(dist)
    try:
        V, N, chunk = 301, 200, 45
        for i, (name, cfg) in enumerate(CONFIGS.items()):
            d = linear_heads(N=N, V=V, seed=i)
            for mode in ("even", "reversed", "padded"):
                start, width = shard_layout(world, V, mode)[rank]
                _three_way(d, cfg, start, width, V, counter, chunk_size=chunk)
                n_chunks = math.ceil(int((d["y"] != -100).sum()) / chunk)
                per_chunk = 2 if cfg.divergence == "jsd" else 1
                # one metadata exchange, one all_reduce per chunk (two for jsd), one for grad_hidden
                assert counter.counts == {"all_reduce": per_chunk * n_chunks + 1, "all_gather_object": 1}, \
                    (name, mode, counter.counts)
        # N >= 1024 rows over 4 sequences given as [B, T, H], V = 1031, default settings (chunk_size="auto")
        B, T, V = 4, 260, 1031
        d = linear_heads(N=B * T, V=V, seed=11)
        d["hs"], d["ht"], d["y"] = d["hs"].view(B, T, -1), d["ht"].view(B, T, -1), d["y"].view(B, T)
        d["steps"] = torch.stack([step_ids_for(T, seed=b) for b in range(B)])
        start, width = shard_layout(world, V, "even")[rank]
        for name in ("kd", "vcrd"):
            loss = _three_way(d, CONFIGS[name], start, width, V)
            seen = [None] * world
            dist.all_gather_object(seen, float(loss))
            assert all(x == seen[0] for x in seen), seen  # the same loss on every rank
        _check_errors(rank, world)
    finally:
        counter.restore()


def _check_errors(rank: int, world: int) -> None:
    V = 301
    d = {k: (v.float() if torch.is_tensor(v) and v.is_floating_point() else v)
         for k, v in linear_heads(N=40, V=V).items()}
    spans = shard_layout(world, V, "even")
    start, width = spans[rank]

    def call(**over):
        st, wd = over.pop("span", (start, width))
        Wt = over.pop("Wt", _rows(d["Wt"], st, wd))
        args = {**dict(vocab_start=st, vocab_size=V, step_ids=d["steps"], config="vcrd", chunk_size=16), **over}
        return fused_linear_vocab_parallel_vcrd_loss(d["hs"], _rows(d["Ws"], st, wd), d["ht"], Wt, d["y"], **args)

    last = rank == world - 1
    bad = {
        "gap": dict(span=(spans[-1][0] + 1, spans[-1][1] - 1) if last else (start, width)),
        "V": dict(vocab_size=V + 1) if rank == 0 else {},
        "config": dict(config="kd") if rank == 1 else {},
        "chunks": dict(chunk_size=17) if rank == 0 else {},
        "local input": dict(Wt=_rows(d["Wt"], start, width)[1:]) if rank == 1 else {},
        "reduction": dict(reduction="none") if last else {},
    }
    expected = {"gap": "do not tile", "V": "disagree on vocab_size", "config": "disagree on config",
                "chunks": "disagree on the row chunks", "local input": "rank 1: teacher_weight_shard",
                "reduction": f"rank {world - 1}: reduction"}
    for name, over in bad.items():
        with pytest.raises(ValueError, match=expected[name]):
            call(**over)
        call()  # the group is still in step after the refusal (a hang would time out)


@pytest.mark.parametrize("world", [2, 3])
def test_fused_linear_vocab_parallel_equals_single_process(world):
    spawn(_worker, world)


def test_fused_linear_vocab_parallel_one_process_is_the_fused_loss(monkeypatch):
    """Without an initialised group: one shard holding every row gives the single-process fused-linear loss."""
    monkeypatch.setenv("VCRD_COMPILE", "0")
    d = {k: (v.float() if torch.is_tensor(v) and v.is_floating_point() else v)
         for k, v in linear_heads(N=90, V=211).items()}
    leaves = [d["hs"], d["Ws"], d["bs"]]
    bt = torch.randn(211, generator=torch.Generator().manual_seed(1))  # a teacher bias too
    for cfg in CONFIGS.values():
        common = dict(step_ids=d["steps"], config=cfg, chunk_size=29)
        want = run_with_grads(lambda hs, Ws, bs, common=common: fused_linear_vcrd_loss(
            hs, Ws, d["ht"], d["Wt"], d["y"], student_bias=bs, teacher_bias=bt, impl="torch", **common), leaves,
            "random")
        got = run_with_grads(lambda hs, Ws, bs, common=common: fused_linear_vocab_parallel_vcrd_loss(
            hs, Ws, d["ht"], d["Wt"], d["y"], student_bias_shard=bs, teacher_bias_shard=bt, vocab_start=0,
            vocab_size=211, **common), leaves, "random")
        for a, b in zip(got, want):  # loss and gradients, within 1e-5 of their scale
            assert (a - b).abs().max() <= 1e-5 * b.abs().max(), float((a - b).abs().max() / b.abs().max())
    with pytest.raises(ValueError, match="do not tile"):
        fused_linear_vocab_parallel_vcrd_loss(d["hs"], d["Ws"][:200], d["ht"], d["Wt"][:200], d["y"].clamp_max(199),
                                              vocab_start=0, vocab_size=211)
