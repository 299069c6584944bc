"""The sparse teacher cache on disk (SPEC §10): written as from_logits says, resumable, verified, collated."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from vcrd.app.cli import main
from vcrd.app.tokenizer import build_char_tokenizer
from vcrd.loss.sparse import SparseTeacher, fused_linear_sparse_vcrd_loss
from vcrd.train import teacher_cache_writer as writer
from vcrd.train.data import DistillCollator, read_jsonl
from vcrd.train.teacher_cache import TeacherCache
from vcrd.train.teacher_cache_collator import IndexedExamples, TeacherCacheCollator, sparse_teacher_of
from vcrd.train.teacher_cache_format import CacheError, loss_rows
from vcrd.train.teacher_cache_writer import build_cache
from vcrd.train.trainer import distill_loss

from ..helpers import CACHE_K, CACHE_ROWS, tiny_family, tiny_llama


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    root = tmp_path_factory.mktemp("cache")
    tok = build_char_tokenizer()
    teacher = tiny_llama(tok, 32, 1)
    with torch.no_grad():
        teacher.lm_head.weight.mul_(20.0)  # peaked distributions, like a trained model's
    teacher.save_pretrained(root / "teacher")
    tok.save_pretrained(root / "teacher")
    (root / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in CACHE_ROWS))
    built = build_cache(root / "teacher", root / "data.jsonl", root / "full", CACHE_K, batch_size=2, shard_rows=40,
                           max_length=64, progress=False, say=lambda _: None)
    return root, tok, teacher.eval(), built


def collator(tok):
    return DistillCollator(tok, max_length=64)


def test_rows_equal_from_logits_of_the_teacher(ws):
    root, tok, teacher, out = ws
    cache = TeacherCache(out)
    assert len(cache.shards) >= 3 and cache.k == CACHE_K and cache.vocab == len(tok)
    examples = read_jsonl(root / "data.jsonl")
    cache.verify(examples, collator(tok), vocab_size=len(tok))
    for i, e in enumerate(examples):
        ids, labels, _ = collator(tok).encode(e)
        with torch.no_grad():  # one example alone, no padding: the teacher's own logits
            logits = teacher(torch.tensor([ids])).logits[0]
        want = SparseTeacher.from_logits(logits[loss_rows(labels)], CACHE_K)
        got = cache.rows_for(i)
        assert got.topk_ids.shape == (len(loss_rows(labels)), CACHE_K) and got.topk_ids.dtype == torch.int32
        assert torch.equal(got.topk_ids.long(), want.topk_ids)
        torch.testing.assert_close(got.topk_logprobs.float(), want.topk_logprobs, atol=2e-3, rtol=1e-3)
        torch.testing.assert_close(got.tail_logprob, want.tail_logprob, atol=1e-4, rtol=1e-4)


def test_killed_run_resumes_to_the_same_files(ws, monkeypatch):
    root, _, _, full = ws
    real, calls = writer.write_shard, []

    def dying(path, rows, k, fill):
        if calls:  # killed while writing the second shard, half-way through its records

            def fill_and_die(array):
                array["tail_logprob"][: rows // 2] = -1.0
                raise KeyboardInterrupt

            return real(path, rows, k, fill_and_die)
        calls.append(1)
        return real(path, rows, k, fill)

    monkeypatch.setattr(writer, "write_shard", dying)
    with pytest.raises(KeyboardInterrupt):
        build_cache(root / "teacher", root / "data.jsonl", root / "cut", CACHE_K, batch_size=2, shard_rows=40,
                       max_length=64, progress=False, say=lambda _: None)
    first = (root / "cut" / "shard-00000.npy").read_bytes()
    assert not (root / "cut" / "shard-00001.npy").exists() and not list((root / "cut").glob(".shard-*"))
    with pytest.raises(CacheError, match="unfinished"):
        TeacherCache(root / "cut")
    monkeypatch.setattr(writer, "write_shard", real)
    said = []
    build_cache(root / "teacher", root / "data.jsonl", root / "cut", CACHE_K, batch_size=2, shard_rows=40,
                   max_length=64, progress=False, say=said.append)
    assert any("continuing" in s for s in said)
    assert (root / "cut" / "shard-00000.npy").read_bytes() == first  # finished shard kept, not rewritten
    names = sorted(p.name for p in full.glob("shard-*"))
    assert names == sorted(p.name for p in (root / "cut").glob("shard-*"))
    for name in names:
        assert (root / "cut" / name).read_bytes() == (full / name).read_bytes(), name
    assert json.loads((root / "cut" / "manifest.json").read_text()) == json.loads((full / "manifest.json").read_text())
    # a finished shard damaged later: a rerun rewrites it (and only it), a reader refuses it meanwhile
    shard = root / "cut" / "shard-00002.npy"
    shard.write_bytes(shard.read_bytes()[:-7])
    with pytest.raises(CacheError, match="shard-00002.npy: truncated"):
        TeacherCache(root / "cut")
    said.clear()
    build_cache(root / "teacher", root / "data.jsonl", root / "cut", CACHE_K, batch_size=2, shard_rows=40,
                   max_length=64, progress=False, say=said.append)
    assert any("shard-00002.npy: finished earlier but now damaged" in s for s in said)
    assert shard.read_bytes() == (full / "shard-00002.npy").read_bytes()
    TeacherCache(root / "cut").verify()


def test_mismatches_are_refused_naming_the_example(ws, tmp_path):
    root, tok, _, out = ws
    cache = TeacherCache(out)
    other = build_char_tokenizer("0123456789+?. abcdefghijklmnopqrstuvwxyzWFS\n")
    with pytest.raises(CacheError, match="another tokenizer"):
        cache.verify(None, DistillCollator(other, max_length=64))
    changed = CACHE_ROWS[:3] + [{**CACHE_ROWS[3], "response": "First 20+5. So 26."}] + CACHE_ROWS[4:]
    (tmp_path / "changed.jsonl").write_text("".join(json.dumps(r) + "\n" for r in changed))
    with pytest.raises(CacheError, match=r"example 3 \(.*changed.jsonl:4\).*token ids differ"):
        cache.verify(read_jsonl(tmp_path / "changed.jsonl"), collator(tok))
    with pytest.raises(CacheError, match="max_length"):
        cache.verify(None, DistillCollator(tok, max_length=32))
    # rebuilding into the same folder with other data: refused, nothing touched
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    with pytest.raises(CacheError, match="other settings or data"):
        build_cache(root / "teacher", tmp_path / "changed.jsonl", out, CACHE_K, batch_size=2, shard_rows=40,
                       max_length=64, progress=False, say=lambda _: None)
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    with pytest.raises(ValueError, match="exceeds the teacher's vocabulary"):
        build_cache(root / "teacher", root / "data.jsonl", tmp_path / "big", 10_000, progress=False)


def _copy(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_damaged_caches_are_refused_naming_file_and_row(ws, tmp_path):
    root, tok, _, out = ws
    bad = _copy(out, tmp_path / "trunc")
    shard = bad / "shard-00001.npy"
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(CacheError, match=r"shard-00001.npy: truncated"):
        TeacherCache(bad)
    (bad / "shard-00001.npy").unlink()
    with pytest.raises(CacheError, match=r"shard-00001.npy: missing shard"):
        TeacherCache(bad)

    def poke(name, field, value, row=3):
        folder = _copy(out, tmp_path / name)
        array = np.load(folder / "shard-00001.npy", mmap_mode="r+")
        array[field][row] = value
        array.flush()
        del array
        return TeacherCache(folder, verify=False)  # opened unverified: verify() is under test

    cases = [("ids", "topk_ids", 10_000, "token id 10000 outside"), ("nan", "topk_logprobs", np.nan, "NaN or positive"),
             ("pos", "topk_logprobs", 0.5, "NaN or positive"), ("tail", "tail_logprob", -20.0, "sum to exp")]
    for name, field, value, message in cases:
        cache = poke(name, field, value)
        with pytest.raises(CacheError, match="sha256"):
            cache.verify()
        first = cache.shards[1]["first_row"]
        with pytest.raises(CacheError, match=rf"shard-00001.npy: row 3 \(cache row {first + 3}, example \d+\).*"
                                                rf"{message}"):
            cache.verify(check_hashes=False)


def test_collator_aligns_the_cached_rows_with_the_shifted_labels_and_the_loss_runs(ws, monkeypatch):
    monkeypatch.setenv("VCRD_COMPILE", "0")  # eager: this test is about the batch, not the compiled path
    root, tok, teacher, out = ws
    cache = TeacherCache(out)
    examples = read_jsonl(root / "data.jsonl")
    data = IndexedExamples(examples)
    collate = TeacherCacheCollator(collator(tok), cache)
    batch = collate([data[4], data[1], data[5]])
    B, T = batch["input_ids"].shape
    assert batch["teacher_topk_ids"].shape == (B, T, CACHE_K)
    assert batch["teacher_topk_logprobs"].shape == (B, T, CACHE_K)
    assert batch["teacher_tail_logprob"].shape == (B, T)
    for b, i in enumerate((4, 1, 5)):
        pos = (batch["labels"][b, 1:] != -100).nonzero().squeeze(1)
        rows = cache.rows_for(i)
        assert torch.equal(batch["teacher_topk_ids"][b, pos], rows.topk_ids)
        assert torch.equal(batch["teacher_topk_logprobs"][b, pos], rows.topk_logprobs)
        assert (batch["teacher_topk_ids"][b, pos] < len(tok)).all()
    teacher_rows = sparse_teacher_of(batch)  # the filler rows pass SparseTeacher's checks too
    student = tiny_llama(tok, 16, 3)
    with torch.no_grad():
        h = student.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    h = h.detach().requires_grad_()
    loss = fused_linear_sparse_vcrd_loss(h[:, :-1], student.lm_head.weight, teacher_rows, batch["labels"][:, 1:],
                                         step_ids=batch["step_ids"][:, 1:], config="vcrd")
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(h.grad).all()
    # the filler is harmless: another filler on the rows without a loss gives the same loss
    other = {**batch, "teacher_tail_logprob": batch["teacher_tail_logprob"].clone(),
             "teacher_topk_logprobs": batch["teacher_topk_logprobs"].clone(),
             "teacher_topk_ids": batch["teacher_topk_ids"].clone()}
    free = torch.ones(B, T, dtype=torch.bool)
    free[:, :-1] = batch["labels"][:, 1:] == -100
    other["teacher_topk_ids"][free] = torch.arange(CACHE_K, dtype=torch.int32) + 5
    lp = torch.log_softmax(torch.arange(CACHE_K, 0, -1).float(), -1)
    other["teacher_topk_logprobs"][free] = lp.half()
    other["teacher_tail_logprob"][free] = float("-inf")
    again = fused_linear_sparse_vcrd_loss(h.detach()[:, :-1], student.lm_head.weight, sparse_teacher_of(other),
                                          batch["labels"][:, 1:], step_ids=batch["step_ids"][:, 1:], config="vcrd")
    torch.testing.assert_close(again, loss.detach())
    # a changed example under a cached index is refused by the collator itself
    moved = [(4, examples[1])]
    with pytest.raises(CacheError, match="example 4"):
        collate(moved)


def test_cli_builds_and_refuses(ws, tmp_path, capsys):
    root, _, _, full = ws
    args = ["cache-teacher", "--model", str(root / "teacher"), "--data", str(root / "data.jsonl"),
            "--top-k", str(CACHE_K), "--batch-size", "3", "--shard-rows", "40", "--max-length", "64"]
    assert main(args + ["--out", str(tmp_path / "c")]) == 0
    for p in full.glob("shard-*.npy"):  # batch size does not change the results beyond float noise
        a, b = np.load(p), np.load(tmp_path / "c" / p.name)
        assert (a["topk_ids"][:, 0] == b["topk_ids"][:, 0]).all()
    assert main(args + ["--out", str(tmp_path / "c")]) == 0
    assert "already complete" in capsys.readouterr().out
    assert main(args[:-4] + ["--out", str(tmp_path / "d"), "--top-k", "0"]) == 2
    assert "--top-k" in capsys.readouterr().err


def test_distill_loss_trains_from_a_cached_batch_without_a_teacher(ws):
    """distill_loss with the cached rows in the batch runs no teacher and equals the sparse loss on the
    student's own hidden states; the student's parameters all receive its gradient."""
    root, tok, _, out = ws
    data = IndexedExamples(read_jsonl(root / "data.jsonl"))
    batch = TeacherCacheCollator(collator(tok), TeacherCache(out))([data[0], data[3], data[2]])
    student = tiny_llama(tok, 16, 5)
    loss, stats = distill_loss(student, None, batch, "vcrd")
    loss.backward()
    with torch.no_grad():
        h = student.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    want = fused_linear_sparse_vcrd_loss(h[:, :-1], student.lm_head.weight.detach(), sparse_teacher_of(batch),
                                         batch["labels"][:, 1:], step_ids=batch["step_ids"][:, 1:], config="vcrd")
    torch.testing.assert_close(loss.detach(), want, rtol=1e-5, atol=1e-6)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters() if p.requires_grad)
    assert stats.valid.sum() == (batch["labels"][:, 1:] != -100).sum()


def test_vcrd_trainer_trains_from_the_cache(ws, tmp_path):
    """VCRDTrainer(teacher_cache=DIR): no teacher model; its first logged loss is distill_loss of the
    first (sequential) batch with the cached rows, and the student's parameters move."""
    import copy

    from transformers import TrainingArguments

    from vcrd.train.trainer import VCRDTrainer

    root, tok, _, out = ws
    examples = read_jsonl(root / "data.jsonl")
    student = tiny_llama(tok, 16, 7)
    init = copy.deepcopy(student)
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=3, learning_rate=0.1,
                             optim="sgd", logging_steps=1, save_strategy="no", report_to=[], use_cpu=True,
                             remove_unused_columns=False, train_sampling_strategy="sequential", disable_tqdm=True)
    trainer = VCRDTrainer(model=student, teacher_cache=out, vcrd_config="vcrd", args=args, train_dataset=examples,
                          data_collator=collator(tok))
    trainer.train()
    logged = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    batch = TeacherCacheCollator(collator(tok), TeacherCache(out))([(i, examples[i]) for i in range(3)])
    want = distill_loss(init, None, batch, "vcrd")[0].detach()
    assert len(logged) == 2 and abs(logged[0] - float(want)) <= 1e-4 * abs(float(want))
    assert any((a - b).abs().max() > 0 for a, b in zip(student.parameters(), init.parameters()))
    with pytest.raises(ValueError, match="exactly one of teacher_model"):
        VCRDTrainer(model=student, args=args, train_dataset=examples, data_collator=collator(tok))


def test_vcrd_train_from_a_teacher_cache(ws, tmp_path, capsys):
    """`vcrd train` with "teacher_cache" instead of "teacher": verified before anything is written, trains
    without a teacher folder; a cache built over other data is refused with exit 2."""
    root, tok, teacher, out = ws
    student = tiny_llama(tok, 16, 9)
    student.save_pretrained(tmp_path / "student")
    tok.save_pretrained(tmp_path / "student")

    def run(data, name):
        cfg = {"student": str(tmp_path / "student"), "teacher_cache": str(out), "data": str(data),
               "output_dir": str(tmp_path / name), "max_steps": 2, "batch_size": 2, "save_steps": 2,
               "logging_steps": 1, "max_length": 64, "learning_rate": 0.01}
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(cfg))
        return main(["train", "--config", str(path)])

    assert run(root / "data.jsonl", "run") == 0
    assert (tmp_path / "run" / "final").is_dir()
    other = tmp_path / "other.jsonl"
    other.write_text("".join(json.dumps({**r, "response": r["response"] + " Done."}) + "\n" for r in CACHE_ROWS))
    assert run(other, "bad") == 2
    assert "other.jsonl" in capsys.readouterr().err and not (tmp_path / "bad").exists()


def test_a_full_cache_trains_like_the_online_teacher(ws):
    """End to end, K = V: distill_loss from the cached batch equals distill_loss with the teacher model run
    online on the same batch (cache rows aligned with the label rows; the log-probs rounded to fp16)."""
    root, tok, teacher, _ = ws
    full = build_cache(root / "teacher", root / "data.jsonl", root / "k_eq_v", len(tok), batch_size=4,
                          max_length=64, progress=False, say=lambda _: None)
    data = IndexedExamples(read_jsonl(root / "data.jsonl"))
    batch = TeacherCacheCollator(collator(tok), TeacherCache(full))([data[4], data[1], data[5]])
    student = tiny_llama(tok, 16, 5)
    online, online_stats = distill_loss(student, teacher, batch, "vcrd")
    cached, cached_stats = distill_loss(student, None, batch, "vcrd")
    torch.testing.assert_close(cached.detach(), online.detach(), rtol=2e-3, atol=0)
    valid = online_stats.valid
    torch.testing.assert_close(cached_stats.D[valid], online_stats.D[valid], rtol=1e-2, atol=1e-3)
    torch.testing.assert_close(cached_stats.lp_u[valid], online_stats.lp_u[valid], rtol=0, atol=1e-2)
    shifted = dict(batch, teacher_topk_ids=batch["teacher_topk_ids"].roll(1, dims=1))  # one position off
    assert not torch.allclose(distill_loss(student, None, shifted, "vcrd")[0], online, rtol=2e-3)


def test_a_soft_capped_teacher_is_stored_after_its_own_post_processing(ws, tmp_path):
    """A Gemma-2 teacher (soft-cap 30, its head scaled so the cap bends): the cache holds the top-K of its
    own logits ``model(ids).logits``, not of the raw LM head's output (SPEC §1, §10)."""
    root, tok, _, _ = ws
    gemma = tiny_family(tok, "gemma2", 8).eval()
    gemma.save_pretrained(tmp_path / "gemma")
    tok.save_pretrained(tmp_path / "gemma")
    out = build_cache(tmp_path / "gemma", root / "data.jsonl", tmp_path / "cache", CACHE_K, batch_size=2, shard_rows=40,
                         max_length=64, progress=False, say=lambda _: None)
    cache = TeacherCache(out)
    bent = False
    for i, e in enumerate(read_jsonl(root / "data.jsonl")):
        ids, labels, _ = collator(tok).encode(e)
        with torch.no_grad():
            out_i = gemma(torch.tensor([ids]), output_hidden_states=True)
            raw = (out_i.hidden_states[-1] @ gemma.lm_head.weight.T)[0]
        rows = loss_rows(labels)
        want = SparseTeacher.from_logits(out_i.logits[0][rows], CACHE_K)
        got = cache.rows_for(i)
        assert torch.equal(got.topk_ids.long(), want.topk_ids)
        torch.testing.assert_close(got.topk_logprobs.float(), want.topk_logprobs, atol=2e-3, rtol=1e-3)
        torch.testing.assert_close(got.tail_logprob, want.tail_logprob, atol=1e-4, rtol=1e-4)
        unprocessed = SparseTeacher.from_logits(raw[rows], CACHE_K)
        bent |= bool((unprocessed.topk_logprobs - want.topk_logprobs).abs().max() > 0.1)
    assert bent  # the raw head's log-probs differ: storing them would fail the check above
