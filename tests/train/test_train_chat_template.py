"""`vcrd train --config` with ``"chat_template": true``: prompts rendered by the student tokenizer's chat template,
recorded with the run, refused for a tokenizer without one."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from vcrd.app.cli import main
from vcrd.train.data import read_jsonl
from vcrd.train.run import check_run, load_config

from ..helpers import make_workspace, train_config
from ..tiny_gguf import build_tokenizer

ROWS = [{"prompt": "add 2 and 3", "response": "2 + 3 = 5\n\nAnswer: 5"},
        {"prompt": "add 4 and 1", "response": "4 + 1 = 5\n\nAnswer: 5"}] * 4


@pytest.fixture(scope="module")
def chat_workspace(tmp_path_factory):
    """A teacher and a student with the BPE tokenizer that has SmolLM2's chat template, and ``ROWS``."""
    root = tmp_path_factory.mktemp("chat")
    tok = build_tokenizer()
    for name, hidden, seed in (("teacher", 48, 1), ("student", 32, 2)):
        torch.manual_seed(seed)
        LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=64,
                                     num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                                     max_position_embeddings=512, bos_token_id=tok.bos_token_id,
                                     eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
                         ).save_pretrained(root / name)
        tok.save_pretrained(root / name)
    (root / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return root, tok


def test_prompts_are_the_chat_template_s_user_turn(chat_workspace):
    root, tok = chat_workspace
    cfg = load_config(train_config(root, "chat", chat_template=True))
    examples = read_jsonl(cfg["data"])
    _, collator = check_run(cfg, examples, say=lambda message: None)
    ids, labels, _ = collator.encode(examples[0])
    # the oracle: transformers renders the user turn with the generation prompt (the assistant header)
    prompt = tok.apply_chat_template([{"role": "user", "content": "add 2 and 3"}], tokenize=False,
                                     add_generation_prompt=True)
    want = tok(prompt, add_special_tokens=False)["input_ids"]
    if want[0] != tok.bos_token_id:
        want = [tok.bos_token_id] + want
    assert ids[:len(want)] == want and all(v == -100 for v in labels[:len(want)])
    assert labels[len(want)] != -100 and ids[-1] == tok.eos_token_id == labels[-1]
    plain = load_config(train_config(root, "plain"))
    _, plain_collator = check_run(plain, examples, say=lambda message: None)
    assert len(plain_collator.encode(examples[0])[0]) < len(ids)  # the default renders the bare prompt


def test_a_run_records_it_and_resume_refuses_a_change(chat_workspace, capsys):
    root, _ = chat_workspace
    assert main(["train", "--config", train_config(root, "run", chat_template=True, max_steps=2, save_steps=2)]) == 0
    recorded = json.loads((root / "run" / "checkpoint-2" / "vcrd_checkpoint.json").read_text())["run"]
    assert recorded["chat_template"] is True
    capsys.readouterr()
    assert main(["train", "--config", train_config(root, "run", chat_template=False, max_steps=4), "--resume"]) == 2
    assert "chat_template" in capsys.readouterr().err


@pytest.mark.parametrize("value", ["yes", 1, None])
def test_a_value_that_is_not_a_bool_is_refused(chat_workspace, capsys, value):
    root, _ = chat_workspace
    assert main(["train", "--config", train_config(root, "bad", chat_template=value)]) == 2
    assert "'chat_template' must be true or false" in capsys.readouterr().err and not (root / "bad").exists()


def test_a_tokenizer_without_a_template_is_refused(tmp_path, capsys):
    root, _ = make_workspace(tmp_path, 4)  # the char tokenizer has no chat template
    assert main(["train", "--config", train_config(root, "nochat", chat_template=True)]) == 2
    err = capsys.readouterr().err
    assert "chat_template" in err and not (root / "nochat").exists()
