"""`vcrd score` under `torchrun --standalone --nproc_per_node 2`: each rank scores the groups of responses
dealt to it (``score_responses(..., shard=(rank, world))``), rank 0 writes ONE output file BYTE-IDENTICAL
to the single-process run's, with 1 or 2 threads (on CPU every group of responses runs on one thread)."""

from __future__ import annotations

import json

import pytest
import torch

from vcrd.app.cli import main
from vcrd.app.synthetic import make_dataset
from vcrd.app.tokenizer import build_char_tokenizer
from vcrd.select.naturalness import score_responses
from vcrd.train.data import read_jsonl

from ..helpers import tiny_llama, torchrun

WORLD = 2
TEACHERS = {"terse": "T-terse", "verbose": "T-verbose"}
OPTIONS = dict(window=2, max_step_tokens=64, token_budget=512)  # groups of <= 2048 suffix tokens: 3 here


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """A student model folder and 10 prompts with 2 responses each."""
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
            "--window", str(OPTIONS["window"]), "--max-step-tokens", str(OPTIONS["max_step_tokens"]),
            "--token-budget", str(OPTIONS["token_budget"])]


def _single_process(ws, out: str, threads: int) -> bytes:
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        assert main(_args(ws, out)) == 0
    finally:
        torch.set_num_threads(before)
    return (ws / out).read_bytes()


def test_every_rank_gets_work(ws):
    """The deal the 2 ranks make (it depends on the inputs only, so it is computed here in one process):
    both ranks score some responses, each response exactly one rank."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(ws / "student").eval()
    tok = AutoTokenizer.from_pretrained(ws / "student")
    examples = read_jsonl(ws / "data.jsonl")
    prompts, responses = [e.prompt for e in examples], [e.response for e in examples]
    scored = [[s is not None for s in score_responses(model, tok, prompts, responses, shard=(r, WORLD), **OPTIONS)]
              for r in range(WORLD)]
    assert all(any(mine) for mine in scored)
    assert all(sum(by_rank) == 1 for by_rank in zip(*scored))


def test_score_under_torchrun_writes_the_single_process_output_byte_for_byte(ws):
    run = torchrun(WORLD, "vcrd.app.cli", _args(ws, "sharded.jsonl"))
    assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]
    assert run.stdout.count("responses to") == 1  # the summary once, from rank 0
    sharded = (ws / "sharded.jsonl").read_bytes()
    assert len(sharded.splitlines()) == 10
    single = _single_process(ws, "single.jsonl", threads=1)  # as each torchrun worker (distributed_helpers)
    assert sharded == single
    # 2 threads: the groups run side by side, each on one thread (vcrd/select/threads.py): the same bits
    assert _single_process(ws, "single_two_threads.jsonl", threads=2) == sharded
