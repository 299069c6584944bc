"""``score_responses(dtype=...)`` and ``vcrd score --dtype/--threads``: float32 exact (the default), bfloat16
through a cast copy that leaves the caller's model alone and equals a model loaded in bf16."""

from __future__ import annotations

import json
import math

import pytest
import torch

from vcrd.app.tokenizer import build_char_tokenizer
from vcrd.select.naturalness import naive_score, score_responses, split_steps

PROMPTS = ["Q: 12+7*3=?", "Q: 9-4=?", "Q: 12+7*3=?"]
RESPONSES = ["7*3 = 21.\n\n12 + 21 = 33.\n\nThe answer is 33.", "9 - 4 = 5.\n\nAnswer: 5",
             "12 + 7 = 19.\n\n19 * 3 = 57.\n\nSo 57.\n\nThe answer is 57."]


@pytest.fixture(scope="module")
def lm():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(1)
    tok = build_char_tokenizer()
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # logits of a realistic size (std ~5), so bf16 rounding shows in the log-probs
        model.lm_head.weight.mul_(20)
    return model, tok


def flat(scores):
    return [x for s in scores for x in [s.lalp, s.galp, *s.step_scores]]


def test_float32_is_the_exact_default(lm):
    model, tok = lm
    default = score_responses(model, tok, PROMPTS, RESPONSES, window=1)
    assert flat(score_responses(model, tok, PROMPTS, RESPONSES, window=1, dtype="float32")) == flat(default)
    assert flat(score_responses(model, tok, PROMPTS, RESPONSES, window=1, dtype=torch.float32)) == flat(default)
    for prompt, response, score in zip(PROMPTS, RESPONSES, default):
        lalp, galp, _ = naive_score(model, tok, prompt, split_steps(response, tok), window=1)
        assert abs(score.lalp - lalp) < 1e-4 and abs(score.galp - galp) < 1e-4


def test_bfloat16_runs_in_bf16_leaves_the_model_and_equals_a_bf16_model(lm):
    model, tok = lm
    before = {k: v.clone() for k, v in model.state_dict().items()}
    got = score_responses(model, tok, PROMPTS, RESPONSES, window=1, dtype="bfloat16")
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the caller's model untouched
    bf16 = type(model)(model.config).eval()
    bf16.load_state_dict(before)
    bf16 = bf16.to(torch.bfloat16)
    assert flat(score_responses(bf16, tok, PROMPTS, RESPONSES, window=1)) == flat(got)  # a bf16-loaded model
    exact = flat(score_responses(model, tok, PROMPTS, RESPONSES, window=1))
    diffs = [abs(a - b) for a, b in zip(flat(got), exact) if not math.isnan(a)]
    assert max(diffs) > 1e-6  # bf16 did run (ignoring dtype would give the fp32 scores bitwise)
    assert max(diffs) < 0.1 * max(abs(x) for x in exact if not math.isnan(x))  # ... and stays close to them


@pytest.mark.parametrize("bad", ["float16", "bf16", torch.float64, 16])
def test_bad_dtype_is_refused_before_work(lm, bad):
    model, tok = lm
    with pytest.raises(ValueError, match=r"dtype: expected one of \['bfloat16', 'float32'\].*got"):
        score_responses(model, tok, PROMPTS, RESPONSES, dtype=bad)


def test_cli_dtype_and_threads(lm, tmp_path, capsys):
    from vcrd.app.cli import main

    model, tok = lm
    model.save_pretrained(tmp_path / "student")
    tok.save_pretrained(tmp_path / "student")
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": p, "response": r, "teacher": t})
                              for p, r, t in zip(PROMPTS, RESPONSES, ["a", "a", "b"])) + "\n")
    args = ["score", "--model", str(tmp_path / "student"), "--data", str(data), "--window", "1"]
    out = {}
    for dtype in ("float32", "bfloat16"):
        out[dtype] = tmp_path / f"{dtype}.jsonl"
        assert main(args + ["--out", str(out[dtype]), "--dtype", dtype, "--threads", "1"]) == 0
    rows = {k: [json.loads(line) for line in v.read_text().splitlines()] for k, v in out.items()}
    want = score_responses(model, tok, PROMPTS, RESPONSES, window=1)
    assert [r["lalp"] for r in rows["float32"]] == [max(want[0].lalp, want[2].lalp), want[1].lalp]
    assert rows["bfloat16"][0]["lalp"] != rows["float32"][0]["lalp"]
    capsys.readouterr()
    for bad in (["--dtype", "float16"], ["--threads", "-1"]):
        with pytest.raises(SystemExit) as e:
            main(args + ["--out", str(tmp_path / "x.jsonl"), *bad])
        assert e.value.code == 2
    assert "invalid choice" in capsys.readouterr().err
