"""The real-tokenizer path of the collator and the scorer: a byte-level BPE tokenizer built here in memory
(the vocabulary and merges of tests/tiny_gguf.py, SmolLM2's special tokens and chat template), against ids
written out by hand: chat template, prompt masking, right padding, EOS, and the step ids of a response
with known ``\\n\\n`` steps.

Ids by hand: 0 <|endoftext|>, 1 <|im_start|> (BOS), 2 <|im_end|> (EOS, pad); a byte b is 3 + b
("\\n" 13, " " 35, "4" 55, "a" 100); merges: 259 "\\n\\n", 260 "th", 261 "the", 262 " the"."""

from __future__ import annotations

import pytest
import torch

from vcrd.select.model_io import chat_prompt
from vcrd.select.naturalness import split_steps
from vcrd.train.data import DistillCollator, Example

from ..tiny_gguf import build_tokenizer


def b(text: str):
    """Ids of text with no merge in it: one id per byte."""
    return [3 + x for x in text.encode("utf-8")]


SYSTEM = "system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
PROMPT_IDS = [1] + b(SYSTEM) + [2, 13, 1] + b("user\n2+2?") + [2, 13, 1] + b("assistant\n")
RESPONSE = "the sum\n\nis 4"  # two steps: "the sum\n\n" and "is 4"
STEP_1 = [261] + b(" sum") + [259]  # the | Ġ s u m | ĊĊ
STEP_2 = b("is 4") + [2]  # i s | Ġ 4 | EOS


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def test_tokenizer_is_the_hand_written_one(tok):
    assert tok("the sum\n\n", add_special_tokens=False)["input_ids"] == STEP_1
    assert tok("the the", add_special_tokens=False)["input_ids"] == [261, 262]


def test_chat_prompt_ids_are_the_templates(tok):
    text = chat_prompt(tok, "2+2?")
    assert not text.startswith("<|im_start|>system") and text.startswith("system\n")  # the BOS copy dropped
    assert [tok.bos_token_id] + tok(text, add_special_tokens=False)["input_ids"] == PROMPT_IDS
    template = tok.apply_chat_template([{"role": "user", "content": "2+2?"}], add_generation_prompt=True,
                                       tokenize=False)
    assert tok(template, add_special_tokens=False)["input_ids"] == PROMPT_IDS


def test_collator_ids_labels_steps_padding_eos(tok):
    tok.padding_side = "left"  # ignored: the collator pads on the right
    collate = DistillCollator(tok, max_length=256, chat_template=True)
    assert split_steps(RESPONSE, tok) == ["the sum\n\n", "is 4"]
    short = Example("2+2?", "4")
    batch = collate([Example("2+2?", RESPONSE), short])
    n_p, n = len(PROMPT_IDS), len(PROMPT_IDS) + len(STEP_1) + len(STEP_2)
    assert batch["input_ids"][0].tolist() == PROMPT_IDS + STEP_1 + STEP_2
    assert batch["labels"][0].tolist() == [-100] * n_p + STEP_1 + STEP_2  # -100 on the whole prompt
    assert batch["step_ids"][0].tolist() == [0] * n_p + [1] * len(STEP_1) + [2] * len(STEP_2)
    assert batch["attention_mask"][0].tolist() == [1] * n
    m = n_p + 2  # the short example: "4" and the EOS, then right padding to n
    assert batch["input_ids"][1].tolist() == PROMPT_IDS + [55, 2] + [2] * (n - m)  # pad id 2 (= EOS, as SmolLM2)
    assert batch["labels"][1].tolist() == [-100] * n_p + [55, 2] + [-100] * (n - m)
    assert batch["attention_mask"][1].tolist() == [1] * m + [0] * (n - m)
    assert batch["step_ids"][1].tolist() == [0] * n_p + [1, 1] + [1] * (n - m)  # padding repeats the last step
    tok.padding_side = "right"


def test_collator_without_template_and_with_given_steps(tok):
    collate = DistillCollator(tok, max_length=256)
    batch = collate([Example("2+2?", "ignored", steps=["the sum\n\n", "is 4"])])
    assert batch["input_ids"][0].tolist() == [1] + b("2+2?") + STEP_1 + STEP_2  # BOS, the raw prompt
    assert batch["step_ids"][0].tolist() == [0] * 5 + [1] * len(STEP_1) + [2] * len(STEP_2)


def test_refusals(tok):
    from transformers import PreTrainedTokenizerFast

    bare = PreTrainedTokenizerFast(tokenizer_object=tok.backend_tokenizer, bos_token="<|im_start|>")
    with pytest.raises(ValueError, match="chat_template: expected a tokenizer with a chat template"):
        DistillCollator(bare, chat_template=True)
    with pytest.raises(ValueError, match="tokenizer: expected a chat template"):
        chat_prompt(bare, "hi")


def test_scorer_reads_the_same_ids(tok):
    """The scorer's sequence for a chat prompt is the collator's: its GALP equals the mean log-prob of the
    collator's labels (EOS aside) under a plain forward."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from vcrd.select.naturalness import score_responses

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=263, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2)).eval()
    got = score_responses(model, tok, [chat_prompt(tok, "2+2?")], [RESPONSE], window=4)[0]
    ids = torch.tensor([PROMPT_IDS + STEP_1 + STEP_2[:-1]])
    with torch.inference_mode():
        logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)
    n_p = len(PROMPT_IDS)
    want = [float(logp[t - 1, ids[0, t]]) for t in range(n_p, ids.shape[1])]
    assert abs(got.galp - sum(want) / len(want)) < 1e-5
    assert abs(got.step_scores[0] - sum(want[:len(STEP_1)]) / len(STEP_1)) < 1e-5
