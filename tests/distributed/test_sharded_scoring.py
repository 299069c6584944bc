"""``score_responses(..., shard=(rank, world))``: each response scored by exactly one rank, bitwise as
unsharded (the unit of work, a group of responses, is formed from the whole input); the deal; the checks.
The multi-process run (``vcrd score`` under ``torchrun``) is tests/distributed/test_score_torchrun.py."""

from __future__ import annotations

import struct

import pytest

from vcrd.app.synthetic import make_dataset
from vcrd.app.tokenizer import build_char_tokenizer
from vcrd.select.naturalness import ResponseScore, score_responses
from vcrd.select.scoring_plan import deal_groups

from ..helpers import tiny_llama, tiny_model

TOKEN_BUDGET = 512  # batches of up to 512 tokens, groups of up to 2048 suffix tokens: 20 responses form 3 groups


@pytest.fixture(scope="module")
def setup():
    tok = build_char_tokenizer()
    problems = make_dataset(10, seed=3)
    prompts = [p.question for p in problems for _ in range(2)]
    responses = [p.solution(style) for p in problems for style in ("terse", "verbose")]
    responses[4] = ""  # nothing to score: NaN scores, still dealt to exactly one rank
    return tiny_llama(tok, 32, 4).eval(), tok, prompts, responses


def bits(score: ResponseScore):
    """Every field, floats as their 8 bytes (NaN equal to NaN, 0.0 unequal to -0.0)."""
    return (tuple(struct.pack("<d", x) for x in (score.lalp, score.galp, *score.step_scores)), score.n_steps,
            score.n_tokens)


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("kind", ["llama", "gpt2"])  # packed_forward; padded Hugging Face forwards
def test_shards_together_are_bitwise_the_unsharded_scores(setup, world, kind):
    model, tok, prompts, responses = setup
    if kind == "gpt2":
        model = tiny_model(kind, tok)
    options = dict(window=2, max_step_tokens=64, token_budget=TOKEN_BUDGET)
    full = score_responses(model, tok, prompts, responses, **options)
    parts = [score_responses(model, tok, prompts, responses, shard=(rank, world), **options) for rank in range(world)]
    assert all(any(s is not None for s in part) for part in parts)  # every rank got work
    for i, score in enumerate(full):
        mine = [part[i] for part in parts if part[i] is not None]
        assert len(mine) == 1, f"response {i} scored by {len(mine)} ranks"
        assert bits(mine[0]) == bits(score), (i, mine[0], score)


def test_the_deal_is_largest_first_to_the_least_loaded_rank():
    sizes = [5, 40, 5, 3, 0, 20, 7]
    for world in (1, 2, 3, 8):
        owner = deal_groups(sizes, world)
        assert len(owner) == len(sizes) and all(0 <= r < world for r in owner)
        assert owner == deal_groups(sizes, world)  # the inputs alone decide it: the same on every rank
    # 40 -> 0; then 20, 7, 5 (index 0), 5 (index 2), 3 -> 1 (still lighter: 20 ... 37); 0 -> 0 (40 = 40: lowest)
    assert deal_groups(sizes, 2) == [1, 0, 1, 1, 0, 1, 1]
    assert deal_groups([1, 1, 1], 8) == [0, 1, 2]
    assert deal_groups([], 3) == []


@pytest.mark.parametrize("shard", [(2, 2), (-1, 2), (0, 0), (0.0, 1), (True, 2), [0, 1], (0, 1, 2)])
def test_a_bad_shard_is_refused_naming_it(setup, shard):
    model, tok, prompts, responses = setup
    with pytest.raises(ValueError, match=r"shard: expected a tuple \(rank, world\)"):
        score_responses(model, tok, prompts, responses, shard=shard)


def test_sharded_scoring_without_a_process_group_is_refused(setup, monkeypatch):
    from vcrd.distributed.scoring import score_responses_sharded

    model, tok, prompts, responses = setup
    monkeypatch.setenv("WORLD_SIZE", "2")  # a launcher's environment, but no init_from_launcher()
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(RuntimeError, match="WORLD_SIZE is 2 but no process group is initialised"):
        score_responses_sharded(model, tok, prompts, responses)
