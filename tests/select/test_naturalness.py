"""LALP/GALP scoring (SPEC §8) against one plain forward per window, selection, and `vcrd score`."""

from __future__ import annotations

import importlib.util
import json
import math

import pytest
import torch

from vcrd.app.tokenizer import build_char_tokenizer
from vcrd.select.naturalness import ResponseScore, naive_score, score_responses, split_steps
from vcrd.select.selection import rank_teachers, select_responses

from ..helpers import tiny_model

PROMPTS = ["Q: 12+7*3=?", "Q: a train goes 60 km in 1.5 h; speed?", "Q: 9-4=?"]
RESPONSES = [
    "7*3 = 21.\n\n12 + 21 = 33.\n\nThe answer is 33.",
    ["Speed is distance over time. ", "60 / 1.5 = 40. ", "So 40 km/h.\n\n", "Answer: 40"],
    "9 - 4 = 5. Answer: 5",
]


@pytest.fixture(scope="module")
def lm():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    tok = build_char_tokenizer()
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model = LlamaForCausalLM(cfg).eval()
    return model, tok


def steps_of(response, tok):
    return response if isinstance(response, list) else split_steps(response, tok)


@pytest.mark.parametrize("window,drop_first", [(0, 0), (1, 0), (2, 2), (4, 0)])
def test_equals_one_forward_per_window(lm, window, drop_first):
    model, tok = lm
    got = score_responses(model, tok, PROMPTS, RESPONSES, window=window, drop_first=drop_first, token_budget=200)
    for prompt, response, score in zip(PROMPTS, RESPONSES, got):
        lalp, galp, steps = naive_score(model, tok, prompt, steps_of(response, tok), window, drop_first)
        assert abs(score.lalp - lalp) < 1e-4 and abs(score.galp - galp) < 1e-4
        assert all(abs(a - b) < 1e-4 for a, b in zip(score.step_scores, steps))
        assert score.n_steps == len(steps)


def prompt_of(n_tokens: int, seed: int = 0) -> str:
    """A prompt of exactly ``n_tokens`` ids with the character tokenizer (its BOS included)."""
    text = "".join("Q: what is 12+7*3? Think. " for _ in range(n_tokens // 20 + 1))
    return text[seed % 7:][:n_tokens - 1]


def assert_equal_to_naive(model, tok, prompts, responses, got, window, drop_first, tol=1e-4):
    for prompt, response, score in zip(prompts, responses, got):
        lalp, galp, steps = naive_score(model, tok, prompt, steps_of(response, tok), window, drop_first)
        assert score.n_steps == len(steps)
        assert (math.isnan(lalp) and math.isnan(score.lalp)) or abs(score.lalp - lalp) < tol
        assert (math.isnan(galp) and math.isnan(score.galp)) or abs(score.galp - galp) < tol
        for a, b in zip(score.step_scores, steps):
            assert (math.isnan(a) and math.isnan(b)) or abs(a - b) < tol, (window, drop_first, a, b)


@pytest.mark.parametrize("prompt_tokens", [1, 16, 128, 512])
def test_prompt_lengths_windows_and_drop_first_equal_naive(lm, prompt_tokens):
    """Shared prompt KV caches and step scores read from the GALP forward give the naive scores:
    windows 0/1/2/4/>=P, drop_first 0 and 3 (a step shorter than drop_first is not scored)."""
    model, tok = lm
    prompts = [prompt_of(prompt_tokens, s) for s in range(3)]
    assert all(len(tok(p)["input_ids"]) + 1 == prompt_tokens for p in prompts)
    responses = RESPONSES[:2] + [["ab", "Short. ", "A longer step with more words in it.\n\n", "x", "End."]]
    for window, drop_first in ((0, 0), (1, 3), (2, 0), (4, 0), (4, 3), (99, 0)):
        got = score_responses(model, tok, prompts, responses, window=window, drop_first=drop_first, token_budget=600)
        assert_equal_to_naive(model, tok, prompts, responses, got, window, drop_first)


def test_mixed_and_repeated_prompts_share_caches(lm):
    """Prompts of different lengths in one batch, the same prompt for several responses (one cache),
    every prompt token run through the decoder once, and the last layer run in full only at the rows
    that predict a scored id (elsewhere only its keys and values)."""
    model, tok = lm
    prompts = [prompt_of(1), prompt_of(16), prompt_of(128), prompt_of(16), prompt_of(128), prompt_of(40, 3)]
    responses = [RESPONSES[j % 3] for j in range(len(prompts))]
    rows = {"k_proj": 0, "q_proj": 0}
    last = model.get_decoder().layers[-1].self_attn

    def counter(name):
        def count(module, args, output):
            rows[name] += args[0].shape[0]
        return count

    handles = [getattr(last, name).register_forward_hook(counter(name)) for name in rows]
    try:
        got = score_responses(model, tok, prompts, responses, window=99, token_budget=4096)
    finally:
        for handle in handles:
            handle.remove()
    assert_equal_to_naive(model, tok, prompts, responses, got, 99, 0)
    distinct = {p: len(tok(p)["input_ids"]) + 1 for p in prompts}
    response_ids = sum(len(tok(s, add_special_tokens=False)["input_ids"]) for r in responses for s in steps_of(r, tok))
    # window >= P: one sequence per response (the last prompt id + the response but its last id, which
    # predicts nothing) after its prompt's cache
    assert rows["k_proj"] == sum(n - 1 for n in distinct.values()) + response_ids
    assert rows["q_proj"] == response_ids  # one row per scored id, none for the prompt caches
    for window, drop_first in ((0, 0), (2, 1)):
        got = score_responses(model, tok, prompts, responses, window=window, drop_first=drop_first, token_budget=300)
        assert_equal_to_naive(model, tok, prompts, responses, got, window, drop_first)


@pytest.mark.parametrize("kind,unpadded,shared", [("qwen3", True, True), ("gpt2", False, True),
                                                  ("mistral-sliding", False, False)])
def test_other_architectures_equal_naive(lm, kind, unpadded, shared):
    """The unpadded path on another supported architecture, and the fallbacks (Hugging Face's padded
    forward, with and without shared prompt caches) on architectures it does not support."""
    from vcrd.select.packed_forward import packed_forward_supported
    from vcrd.select.prefix_caches import prompt_sharing_supported

    _, tok = lm
    model = tiny_model(kind, tok)
    assert packed_forward_supported(model) == unpadded and prompt_sharing_supported(model) == shared
    prompts = [prompt_of(1), prompt_of(16), prompt_of(128)]
    for window, drop_first in ((0, 0), (2, 2)):
        got = score_responses(model, tok, prompts, RESPONSES, window=window, drop_first=drop_first, token_budget=500)
        assert_equal_to_naive(model, tok, prompts, RESPONSES, got, window, drop_first)


def test_parity_check_can_fail(lm, monkeypatch):
    """The parity check rejects results off by 2e-4 in one step, a NaN step, LALP and GALP swapped, and
    the scores of a scorer whose RoPE is left out."""
    import dataclasses

    import vcrd.select.packed_forward as packed

    model, tok = lm
    prompts = [prompt_of(16), prompt_of(128), prompt_of(16, 2)]
    got = score_responses(model, tok, prompts, RESPONSES, window=1)
    assert_equal_to_naive(model, tok, prompts, RESPONSES, got, 1, 0)
    steps = got[1].step_scores
    wrong = [dataclasses.replace(got[1], step_scores=steps[:2] + [steps[2] + 2e-4] + steps[3:]),
             dataclasses.replace(got[1], step_scores=steps[:1] + [math.nan] + steps[2:]),
             dataclasses.replace(got[1], lalp=got[1].galp, galp=got[1].lalp)]
    for result in wrong:
        with pytest.raises(AssertionError):
            assert_equal_to_naive(model, tok, prompts[1:2], RESPONSES[1:2], [result], 1, 0)
    monkeypatch.setattr(packed, "_rope", lambda x, cos, sin: x)
    broken = score_responses(model, tok, prompts, RESPONSES, window=1)
    with pytest.raises(AssertionError):
        assert_equal_to_naive(model, tok, prompts, RESPONSES, broken, 1, 0)


@pytest.mark.skipif(not (torch.cuda.is_available() and importlib.util.find_spec("flash_attn")),
                    reason="the varlen (padding-free) path needs CUDA and the flash_attn package; neither can be "
                           "installed on the CPU-only build machines")
def test_varlen_flash_attention_path_equals_naive():  # pragma: no cover - CUDA + flash-attn only
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    tok = build_char_tokenizer()
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, bos_token_id=tok.bos_token_id,
                      pad_token_id=tok.pad_token_id)
    model = LlamaForCausalLM(cfg).to("cuda", torch.bfloat16).eval()
    model.config._attn_implementation = "flash_attention_2"
    from vcrd.select.scoring_forward import varlen_available

    assert varlen_available(model, torch.device("cuda"))
    prompts = [prompt_of(16), prompt_of(128), prompt_of(16, 2)]
    ref = LlamaForCausalLM(cfg).to("cuda", torch.bfloat16).eval()
    ref.load_state_dict(model.state_dict())
    ref.config._attn_implementation = "eager"
    got = score_responses(model, tok, prompts, RESPONSES, window=2)
    assert_equal_to_naive(ref, tok, prompts, RESPONSES, got, 2, 0, tol=3e-2)  # bf16 forwards


def test_full_window_reproduces_galp_token_by_token(lm):
    """window >= P: every token's log-prob in its step window equals its GALP log-prob, so the
    token-weighted mean of the step scores is GALP."""
    model, tok = lm
    for score, response in zip(score_responses(model, tok, PROMPTS, RESPONSES, window=99), RESPONSES):
        sizes = [len(tok(s, add_special_tokens=False)["input_ids"]) for s in steps_of(response, tok)]
        weighted = sum(x * n for x, n in zip(score.step_scores, sizes)) / sum(sizes)
        assert abs(weighted - score.galp) < 1e-5


def test_one_step_empty_and_budget_independence(lm):
    model, tok = lm
    one, empty = score_responses(model, tok, ["Q: 1+1?", "Q: 2+2?"], ["2", ""])
    assert one.n_steps == 1 and abs(one.lalp - one.galp) < 1e-6
    assert empty.n_steps == 0 and math.isnan(empty.lalp) and math.isnan(empty.galp) and empty.n_tokens == 0
    small = score_responses(model, tok, PROMPTS, RESPONSES, token_budget=1)
    large = score_responses(model, tok, PROMPTS, RESPONSES, token_budget=100_000)
    assert all(abs(a.lalp - b.lalp) < 1e-5 for a, b in zip(small, large))


def test_splitter_keeps_separators_and_splits_long_steps(lm):
    _, tok = lm
    text = "First step.\n\nSecond step is long. It has sentences. Many of them! Really?\n\nLast"
    steps = split_steps(text, tok, max_step_tokens=25)
    assert "".join(steps) == text
    assert steps[0] == "First step.\n\n" and steps[-1] == "Last"
    assert all(len(tok(s, add_special_tokens=False)["input_ids"]) <= 25 for s in steps[1:-1])
    assert len(steps) > 3


def test_bad_arguments(lm):
    model, tok = lm
    with pytest.raises(ValueError, match="window"):
        score_responses(model, tok, PROMPTS, RESPONSES, window=-1)
    with pytest.raises(ValueError, match="responses"):
        score_responses(model, tok, PROMPTS, RESPONSES[:2])
    with pytest.raises(TypeError, match="responses"):
        score_responses(model, tok, ["p"], [3])


def test_selection_and_teacher_ranking():
    s = lambda lalp, galp=0.0: ResponseScore(lalp, galp)  # noqa: E731
    prompts = ["a", "a", "b", "b", "c"]
    teachers = ["T1", "T2", "T1", "T2", "T2"]
    scores = [s(-1.0, -3.0), s(-2.0, -1.0), s(-0.5), s(math.nan), s(-4.0)]
    assert select_responses(prompts, scores) == [0, 2, 4]
    assert select_responses(prompts, scores, by="galp") == [1, 2, 4]
    ranks = rank_teachers(prompts, teachers, scores)
    assert [r.teacher for r in ranks] == ["T1", "T2"]
    assert ranks[0].win_rate == 1.0 and abs(ranks[1].win_rate - 1 / 3) < 1e-12
    assert abs(ranks[0].mean_lalp - (-0.75)) < 1e-12 and abs(ranks[1].mean_lalp - (-3.0)) < 1e-12


def test_cli_scores_selects_and_refuses_bad_files(lm, tmp_path, capsys):
    from vcrd.app.cli import main

    model, tok = lm
    model.save_pretrained(tmp_path / "student")
    tok.save_pretrained(tmp_path / "student")
    rows = [{"prompt": p, "response": r if isinstance(r, str) else "".join(r), "teacher": t}
            for p, r in zip(PROMPTS, RESPONSES) for t in ("terse", "verbose")]
    rows[1]["response"] += "\n\nLet me double-check that once more."
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = tmp_path / "selected.jsonl"
    args = ["score", "--model", str(tmp_path / "student"), "--data", str(data), "--out", str(out), "--window", "2"]
    assert main(args) == 0
    selected = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(selected) == 3 and all("lalp" in r and "step_scores" in r for r in selected)
    printed = capsys.readouterr().out
    assert "terse" in printed and "verbose" in printed and "win rate" in printed

    for bad, message in [({"response": "x"}, "missing field 'prompt'"), ({"prompt": "", "response": "x"}, "empty"),
                         ({"prompt": "p", "response": 3}, "'response' must be a string")]:
        data.write_text(json.dumps(rows[0]) + "\n" + json.dumps(bad) + "\n")
        out2 = tmp_path / "never.jsonl"
        assert main(args[:4] + [str(data), "--out", str(out2)]) == 2
        err = capsys.readouterr().err
        assert f"{data}:2" in err and message in err and not out2.exists()
