"""``vcrd bench-real lalp``: its statistics on numbers worked out here, and an end-to-end run on a tiny model
with a chat template over 2 CHAMP problems (skipped without champ-dataset)."""

from __future__ import annotations

import importlib.util
import json
import math

import pytest

from vcrd.app.bench_real import bootstrap_ci, pick


def test_pick_highest_nan_lowest_first_tie():
    assert pick([-2.0, -1.0, -1.0]) == 1 and pick([math.nan, -5.0]) == 1 and pick([math.nan, math.nan]) == 0


def test_bootstrap_ci():
    assert bootstrap_ci([1.0] * 10, 200, 0) == (1.0, 1.0)
    lo, hi = bootstrap_ci([0.0] * 50 + [1.0] * 50, 2000, 0)
    assert 0.38 < lo < 0.42 and 0.58 < hi < 0.62  # mean 0.5, sd of the mean 0.05: about ±0.098


def test_end_to_end_on_a_tiny_student(tmp_path):
    if importlib.util.find_spec("champ_dataset") is None:
        pytest.skip("champ-dataset (make real) is not installed")
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from vcrd.app.cli import main

    from ..tiny_gguf import build_tokenizer

    tok = build_tokenizer()
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=263, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                                 bos_token_id=1, eos_token_id=2, pad_token_id=2)).save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    out = tmp_path / "out"
    args = ["bench-real", "lalp", "--model", str(tmp_path / "m"), "--out", str(out), "--problems", "2",
            "--bootstrap", "200", "--dtype", "float32", "--threads", "1"]
    assert main(args) == 0
    r = json.loads((out / "results.json").read_text())
    assert r["n_problems"] == 2 and r["n_responses"] == 8 and len(r["teachers"]) == 4
    acc = {m["method"]: m["accuracy"] for m in r["selection"]}
    assert acc["oracle (any right)"] >= max(acc["LALP"], acc["GALP"], acc["random (expected)"])
    assert all(sum(m["chosen"].values()) == 2 for m in r["selection"] if m["chosen"])
    assert "| LALP |" in (out / "results.md").read_text()
    assert main(args + ["--problems", "0"]) == 2  # refused before the model loads
    with pytest.raises(SystemExit) as e:
        main(args[:-2] + ["--threads", "-1"])
    assert e.value.code == 2
