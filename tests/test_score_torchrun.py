"""`vcrd score` under `torchrun --standalone --nproc_per_node 2`: each rank scores its share of the responses
(:func:`vcrd.distributed.scoring.score_shares`), rank 0 writes ONE output equal to the single-process run:
the same selected lines in the same order with the same text, and the same scores within 1e-6 relative
(padded batches of another composition round differently in the last bits: docs/distributed.md)."""

from __future__ import annotations

import json
import math

import pytest

from vcrd.app.cli import main
from vcrd.app.synthetic import make_dataset
from vcrd.app.tokenizer import build_char_tokenizer
from vcrd.distributed.scoring import score_shares

from .distributed_helpers import torchrun
from .test_trainer import tiny_llama

WORLD = 2
TEACHERS = {"terse": "T-terse", "verbose": "T-verbose"}


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """A student model folder and 10 prompts with 2 responses each (odd shares over 2 ranks)."""
    root = tmp_path_factory.mktemp("score")
    tok = build_char_tokenizer()
    tiny_llama(tok, 32, 4).save_pretrained(root / "student")
    tok.save_pretrained(root / "student")
    rows = [{"prompt": p.question, "response": p.solution(style), "teacher": teacher}
            for p in make_dataset(10, seed=3) for style, teacher in TEACHERS.items()]
    rows[3]["response"] += "\n\nLet me double-check that once more."
    (root / "data.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return root


def _args(ws, out: str):
    return ["score", "--model", str(ws / "student"), "--data", str(ws / "data.jsonl"), "--out", str(ws / out),
            "--window", "2", "--max-step-tokens", "64"]


def _close(a, b, rel=1e-6) -> bool:
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(_close(x, y, rel) for x, y in zip(a, b))
    if a is None or b is None:
        return a is b
    return math.isclose(a, b, rel_tol=rel, abs_tol=0.0)


def test_score_under_torchrun_writes_the_single_process_output(ws):
    assert main(_args(ws, "single.jsonl")) == 0
    run = torchrun(WORLD, "vcrd.app.cli", _args(ws, "sharded.jsonl"))
    assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]
    assert run.stdout.count("responses to") == 1  # the summary once, from rank 0
    single = [json.loads(line) for line in (ws / "single.jsonl").read_text().splitlines()]
    sharded = [json.loads(line) for line in (ws / "sharded.jsonl").read_text().splitlines()]
    assert len(single) == len(sharded) == 10
    scores = []
    for a, b in zip(single, sharded):
        assert {k: v for k, v in a.items() if k not in ("lalp", "galp", "step_scores")} == \
            {k: v for k, v in b.items() if k not in ("lalp", "galp", "step_scores")}
        for key in ("lalp", "galp", "step_scores"):
            assert _close(a[key], b[key]), (key, a[key], b[key])
            scores += zip(a[key], b[key]) if key == "step_scores" else [(a[key], b[key])]
    equal = sum(x == y for x, y in scores)
    worst = max(abs(x - y) / abs(x) for x, y in scores if x is not None)
    same_bytes = (ws / "single.jsonl").read_bytes() == (ws / "sharded.jsonl").read_bytes()
    print(f"\nsharded vs single-process scores: {equal} of {len(scores)} bitwise equal, largest relative "
          f"difference {worst:.1e}; the files are {'' if same_bytes else 'not '}byte-identical")


def test_score_shares_keep_prompts_together_and_cover_every_response():
    prompts = ["a", "b", "a", "c", "b", "d", "a"]
    responses = ["x" * n for n in (5, 40, 5, 3, 1, 20, 7)]
    for world in (1, 2, 3, 8):
        shares = score_shares(prompts, responses, world)
        assert len(shares) == world
        assert sorted(i for s in shares for i in s) == list(range(len(prompts)))
        for s in shares:  # a prompt's responses on one rank
            assert all(not set(i for i in range(len(prompts)) if prompts[i] == prompts[j]) - set(s) for j in s)
        assert shares == score_shares(prompts, responses, world)  # deterministic
    two = score_shares(prompts, responses, 2)
    assert two == [[1, 4], [0, 2, 3, 5, 6]]  # b (41 chars + 2) first, then a (17 + 3), d, c on the lighter rank
