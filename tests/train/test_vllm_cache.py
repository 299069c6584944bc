"""A served teacher's vLLM ``prompt_logprobs`` dump → vcrd's teacher cache → a training step
(vcrd.train.vllm_cache, docs/offline.md): a hand-made dump round-trips into the cache rows and into
a ``distill_loss`` step equal to float64 oracles written here."""

from __future__ import annotations

import json
import math

import pytest
import torch

from vcrd import VCRDConfig
from vcrd.app.tokenizer import build_char_tokenizer
from vcrd.train.data import DistillCollator, read_jsonl
from vcrd.train.teacher_cache import TeacherCache
from vcrd.train.teacher_cache_collator import IndexedExamples, TeacherCacheCollator
from vcrd.train.trainer import distill_loss
from vcrd.train.vllm_cache import cache_from_vllm

TOP = 12  # the dump's entries per position (plus the actual token when it is not among them)
ROWS = [{"prompt": f"What is {a}+{b}?", "response": f"First {a}+{b}. So {a + b}."}
        for a, b in ((1, 2), (13, 4), (7, 7), (20, 5), (3, 9))]


def llama(tok, seed):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                                        max_position_embeddings=256, bos_token_id=tok.bos_token_id,
                                        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)).double()


def vllm_entry(logprobs: torch.Tensor, actual: int, form: int):
    """vLLM's entry for one position: the TOP most probable ids and the actual token, each value as
    a number or a ``Logprob`` dict (the two JSON forms), keys strings of digits."""
    order = sorted(range(logprobs.numel()), key=lambda v: (-logprobs[v].item(), v))
    ids = order[:TOP] + ([actual] if actual not in order[:TOP] else [])
    return {str(v): (logprobs[v].item() if (v + form) % 2 else
                     {"logprob": logprobs[v].item(), "rank": order.index(v) + 1, "decoded_token": "?"})
            for v in ids}


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    root = tmp_path_factory.mktemp("vllm")
    tok = build_char_tokenizer()
    teacher = llama(tok, 2)
    with torch.no_grad():
        teacher.lm_head.weight.mul_(20.0)  # peaked, like a trained model: some actual tokens fall outside the top
    teacher.config.save_pretrained(root / "teacher")  # the served model's folder: config and tokenizer
    tok.save_pretrained(root / "teacher")
    (root / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    collator = DistillCollator(tok, max_length=64)
    examples = read_jsonl(root / "data.jsonl")
    lines, logprobs = [], []
    for n, e in enumerate(examples):
        ids = collator.encode(e)[0]
        with torch.no_grad():
            lp = torch.log_softmax(teacher(torch.tensor([ids])).logits[0], -1)  # row i predicts token i + 1
        logprobs.append(lp)
        lines.append({"token_ids": ids, "prompt_logprobs": [None] + [vllm_entry(lp[i - 1], ids[i], n)
                                                                     for i in range(1, len(ids))]})
    (root / "dump.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    out = cache_from_vllm(root / "dump.jsonl", root / "data.jsonl", root / "teacher", root / "cache",
                          max_length=64, shard_rows=40)
    return root, tok, collator, examples, lines, logprobs, out


def oracle_rows(lp: torch.Tensor, labels, k: int):
    """The loss rows' top-k (ids, log-probs) and tail ``log(1 - Σ top-k q)``, float64, from the teacher."""
    rows = [t for t in range(len(labels) - 1) if labels[t + 1] != -100]
    ids, top, tail = [], [], []
    for t in rows:
        order = sorted(range(lp.shape[1]), key=lambda v: (-lp[t, v].item(), v))[:k]
        ids.append(order)
        top.append([lp[t, v].item() for v in order])
        tail.append(math.log1p(-math.fsum(math.exp(x) for x in top[-1])))
    return torch.tensor(ids), torch.tensor(top, dtype=torch.float64), torch.tensor(tail, dtype=torch.float64)


def test_the_dump_round_trips_into_the_cache_rows(ws):
    root, tok, collator, examples, lines, logprobs, out = ws
    cache = TeacherCache(out)
    cache.verify(examples, collator, vocab_size=len(tok))
    assert cache.k == TOP and cache.vocab == len(tok) and len(cache.shards) >= 2
    assert any(len(p) == TOP + 1 for line in lines for p in line["prompt_logprobs"][1:])  # extra actual tokens
    for i, e in enumerate(examples):
        ids, top, tail = oracle_rows(logprobs[i], collator.encode(e)[1], TOP)
        got = cache.rows_for(i)
        assert torch.equal(got.topk_ids.long(), ids)
        assert torch.equal(got.topk_logprobs, top.float().half())  # stored as float16
        torch.testing.assert_close(got.tail_logprob, tail.float(), rtol=1e-6, atol=1e-7)
        assert (tail > -20).all()  # a real tail: the mass outside the top-12 is kept


def test_a_training_step_from_the_cache_equals_a_float64_oracle(ws):
    root, tok, collator, examples, lines, logprobs, out = ws
    student = llama(tok, 1)
    batch = TeacherCacheCollator(collator, TeacherCache(out))([IndexedExamples(examples)[i] for i in range(4)])
    cfg = VCRDConfig.preset("kd", temperature=2.0)
    loss, _ = distill_loss(student, None, batch, cfg)
    loss.backward()

    oracle = llama(tok, 1)
    V, T = len(tok), 2.0
    s = oracle(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    terms = []
    for b in range(4):
        labels = collator.encode(examples[b])[1]
        ids, top, tail = oracle_rows(logprobs[b], labels, TOP)
        logq = (tail.float().double() - math.log(V - TOP)).unsqueeze(1).repeat(1, V)  # the tail spread uniformly
        logq.scatter_(1, ids, top.float().half().double())  # the stored top-K
        rows = [t for t in range(len(labels) - 1) if labels[t + 1] != -100]
        u = torch.log_softmax(logq / T, -1)
        p = torch.log_softmax(s[b, rows] / T, -1)
        terms.append((u.exp() * (u - p)).sum(-1))
    want = torch.cat(terms).mean()
    want.backward()
    assert loss.item() == pytest.approx(want.item(), rel=1e-9) and want.item() > 1e-2
    for (name, p), q in zip(student.named_parameters(), oracle.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-7, atol=1e-10, msg=name)


def test_a_misaligned_or_foreign_dump_is_refused_naming_the_line(ws, tmp_path):
    root, tok, collator, examples, lines, logprobs, out = ws

    def convert(dump_lines, name):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(x) + "\n" for x in dump_lines))
        return cache_from_vllm(tmp_path / f"{name}.jsonl", root / "data.jsonl", root / "teacher", tmp_path / name,
                               max_length=64)

    shifted = [dict(x, prompt_logprobs=x["prompt_logprobs"][1:] + [x["prompt_logprobs"][-1]]) for x in lines]
    with pytest.raises(ValueError, match=r"shifted\.jsonl:1: prompt_logprobs\[\d+\] does not hold the token"):
        convert(shifted, "shifted")
    other = [dict(x, token_ids=x["token_ids"][:3] + [x["token_ids"][3] + 1] + x["token_ids"][4:]) for x in lines]
    with pytest.raises(ValueError, match=r"other\.jsonl:1: token_ids differ .* at position 3"):
        convert(other, "other")
    with pytest.raises(ValueError, match=r"has fewer lines than the data's 5 examples"):
        convert(lines[:4], "short")
    with pytest.raises(ValueError, match=r"positions\[\d+\]: has 1[23] entries, fewer than k=14"):
        cache_from_vllm(root / "dump.jsonl", root / "data.jsonl", root / "teacher", tmp_path / "k14", 14,
                        max_length=64)
    with pytest.raises(ValueError, match=r"--out: .* is not empty"):
        cache_from_vllm(root / "dump.jsonl", root / "data.jsonl", root / "teacher", out, max_length=64)
    assert not any((tmp_path / name).exists() and any((tmp_path / name).iterdir())
                   for name in ("shifted", "other", "short", "k14"))  # nothing written


def test_the_command_line_writes_the_same_cache(ws, tmp_path):
    from vcrd.app.cli import main

    root, tok, collator, examples, lines, logprobs, out = ws
    args = ["cache-teacher", "--from-vllm", str(root / "dump.jsonl"), "--model", str(root / "teacher"), "--data",
            str(root / "data.jsonl"), "--out", str(tmp_path / "cli"), "--max-length", "64", "--shard-rows", "40"]
    assert main(args) == 0
    by_cli, by_function = TeacherCache(tmp_path / "cli"), TeacherCache(out)
    assert by_cli.k == by_function.k == TOP
    for i, e in enumerate(examples):
        ids, top, _ = oracle_rows(logprobs[i], collator.encode(e)[1], TOP)
        got = by_cli.rows_for(i)
        assert torch.equal(got.topk_ids.long(), ids) and torch.equal(got.topk_logprobs, top.float().half())
    assert main(args) == 2  # --out is no longer empty: refused, nothing overwritten
