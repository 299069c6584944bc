"""``vcrd bench-real distill``: the pruned student, the batches, the held-out metrics and the float64 oracle on
values worked out here, and an end-to-end run on a tiny Llama with a chat template (skipped without
champ-dataset)."""

from __future__ import annotations

import importlib.util
import json
import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from vcrd.app.bench_real_distill import (
    DistillBenchSettings,
    check_settings,
    forward_kl_float64,
    held_out_metrics,
    paired_summary,
    prune_layers,
    training_batches,
)

from ..tiny_gguf import build_tokenizer


def tiny_llama(layers: int = 4, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=263, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                                        bos_token_id=1, eos_token_id=2, pad_token_id=2))


def test_prune_layers_keeps_every_kth_layer_and_shares_the_rest():
    teacher = tiny_llama(5)
    student = prune_layers(teacher, 2)
    assert student.config.num_hidden_layers == 3 and teacher.config.num_hidden_layers == 5
    for new, old in enumerate((0, 2, 4)):
        a, b = student.model.layers[new].mlp.up_proj.weight, teacher.model.layers[old].mlp.up_proj.weight
        assert torch.equal(a, b) and a.data_ptr() != b.data_ptr()
    assert torch.equal(student.model.embed_tokens.weight, teacher.model.embed_tokens.weight)
    # the pruned model's forward is the teacher's with layers 1 and 3 skipped: run the kept layers by hand
    ids = torch.tensor([[1, 40, 41, 42, 7]])
    skipped = tiny_llama(5)
    skipped.load_state_dict(teacher.state_dict())
    skipped.model.layers = torch.nn.ModuleList([skipped.model.layers[i] for i in (0, 2, 4)])
    skipped.config.num_hidden_layers = 3
    assert torch.allclose(student(ids, use_cache=False).logits, skipped(ids, use_cache=False).logits, atol=1e-6)
    assert not torch.allclose(student(ids, use_cache=False).logits, teacher(ids, use_cache=False).logits, atol=1e-3)


def test_training_batches_are_seeded_epochs():
    b = training_batches(10, 7, 4, seed=3)
    assert len(b) == 7 and all(len(x) == 4 for x in b)
    flat = [i for x in b for i in x]
    assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:20]) == list(range(10))
    assert b == training_batches(10, 7, 4, seed=3) and b != training_batches(10, 7, 4, seed=4)


def test_forward_kl_float64_on_a_worked_example():
    h, w = torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # student logits (1, 0)
    ht, wt = torch.tensor([[0.0, 0.0]]), w  # teacher logits (0, 0): uniform
    p1 = math.e / (math.e + 1)
    want = 0.5 * math.log(0.5 / p1) + 0.5 * math.log(0.5 / (1 - p1))
    got = forward_kl_float64(h, w, ht, wt, torch.tensor([True]))
    assert got.dtype == torch.float64 and got.item() == pytest.approx(want, rel=1e-12)


def test_held_out_metrics_against_hand_formulas():
    tok = build_tokenizer()
    teacher, student = tiny_llama(2, seed=0), tiny_llama(2, seed=1)
    ids = torch.tensor([[1, 40, 41, 42, 43, 2], [1, 50, 51, 52, 2, 2]])
    labels = torch.tensor([[-100, -100, 41, 42, 43, 2], [-100, -100, 51, 52, 2, -100]])
    batch = {"input_ids": ids, "attention_mask": (labels != -100) | (torch.arange(6) < 2), "labels": labels}
    got = held_out_metrics(student, teacher, [batch])
    same = held_out_metrics(teacher, teacher, [batch])
    assert same["kl"] == pytest.approx([0.0, 0.0], abs=1e-6) and same["agree"] == [1.0, 1.0]
    with torch.no_grad():
        for i in range(2):
            ys = labels[i, 1:]
            v = ys != -100
            kw = {"input_ids": ids[i:i + 1], "attention_mask": batch["attention_mask"][i:i + 1]}
            s = student(**kw).logits[0, :-1][v].double()
            u = teacher(**kw).logits[0, :-1][v].double()
            p, q = torch.softmax(s, -1), torch.softmax(u, -1)
            assert got["kl"][i] == pytest.approx(float((q * (q / p).log()).sum(-1).mean()), rel=1e-4)
            assert got["nll"][i] == pytest.approx(float(-p.log()[torch.arange(int(v.sum())), ys[v]].mean()), rel=1e-5)
            assert got["agree"][i] == pytest.approx(float((s.argmax(-1) == u.argmax(-1)).double().mean()))
    assert tok is not None


def test_paired_summary_on_known_numbers():
    per_seed = {"0": {"kd": {"kl": [1.0, 2.0], "nll": [1.0, 1.0], "agree": [0.5, 0.5]},
                      "vcrd": {"kl": [0.5, 1.0], "nll": [2.0, 2.0], "agree": [0.5, 0.7]}},
                "1": {"kd": {"kl": [3.0, 2.0], "nll": [1.0, 1.0], "agree": [0.5, 0.5]},
                      "vcrd": {"kl": [1.5, 1.0], "nll": [2.0, 2.0], "agree": [0.7, 0.5]}}}
    rows = {r["preset"]: r for r in paired_summary(per_seed, ["kd", "vcrd"], 200)}
    assert rows["kd"]["kl"][0] == pytest.approx(2.0) and rows["vcrd"]["kl"][0] == pytest.approx(1.0)
    assert rows["vcrd"]["kl_vs_kd"][0] == pytest.approx(-1.0) and rows["vcrd"]["nll_vs_kd"][:3] == (1.0, 1.0, 1.0)
    assert rows["vcrd"]["agree_vs_kd"][0] == pytest.approx(0.1) and "kl_vs_kd" not in rows["kd"]


@pytest.mark.parametrize("field,value", [("steps", 0), ("keep_every", 1), ("lr", 2.0), ("dtype", "float16"),
                                         ("presets", ("vcrd",)), ("presets", ("kd", "nope")), ("batch_size", True)])
def test_bad_settings_refused_naming_the_setting(tmp_path, field, value):
    s = DistillBenchSettings(model=str(tmp_path))
    setattr(s, field, value)
    with pytest.raises(ValueError, match=field):
        check_settings(s)


def test_end_to_end_on_a_tiny_teacher(tmp_path):
    if importlib.util.find_spec("champ_dataset") is None:
        pytest.skip("champ-dataset (make real) is not installed")
    from vcrd.app.cli import main

    tiny_llama(4).save_pretrained(tmp_path / "m")
    build_tokenizer().save_pretrained(tmp_path / "m")
    args = ["bench-real", "distill", "--model", str(tmp_path / "m"), "--out", str(tmp_path / "out"), "--seeds", "2",
            "--steps", "3", "--batch-size", "2", "--n-eval", "4", "--dtype", "float32", "--threads", "1",
            "--timing-repeats", "1", "--bootstrap", "200"]
    assert main(args) == 0
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    # layers 0 and 2 of 4: embeddings and head 2·263·32, per layer q,o 32·32, k,v 32·16, MLP 3·32·64, 2 norms 32
    assert saved["student_parameters"] == 2 * 263 * 32 + 2 * (2 * 32 * 32 + 2 * 32 * 16 + 3 * 32 * 64 + 2 * 32) + 32
    assert set(saved["per_seed"]) == {"0", "1"}
    assert [row["preset"] for row in saved["summary"]] == ["before", "kd", "discord", "vcrd"]
    assert all(row["rows"] > 0 for row in saved["timing"])
    # every timed gradient equals its float64 oracle (fp32 here): forward KL for kd-like losses, the reference for vcrd
    assert {row["provider"]: row["objective"] for row in saved["timing"]} == {
        "vcrd kd": "kd", "vcrd vcrd": "vcrd", "TRL chunked (beta 0)": "kd", "Liger fused JSD (beta 0)": "kd"}
    for row in saved["timing"]:
        assert row["grad_rel_err_h"] < 1e-4 and row["grad_rel_err_w"] < 1e-4, row
    assert len(saved["curves"]["1"]["vcrd"]["loss"]) == 3
    assert "| vcrd |" in (tmp_path / "out" / "results.md").read_text()
    assert (tmp_path / "out" / "results.png").stat().st_size > 1000
    assert main(args + ["--steps", "0"]) == 2  # refused before any model loads
