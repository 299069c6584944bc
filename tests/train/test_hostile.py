"""Issue #28: the cases a hostile (or unlucky) user found, kept. Each case gives a clear error or the right
result, with nothing clobbered, lost or hung. Temporary folders and tiny models only; seconds each.

Files: a planted symlink (lock, write probe, temporary name) is never written through; ``--out`` equal to
an input or naming a device is refused before any work; ``cache-teacher`` removes its own killed
temporary shards; checkpoints and teacher caches are verified by content, in every reader.
"""

from __future__ import annotations

import json
import os
import stat

import pytest
import torch

from vcrd.app.cli import main
from vcrd.train.files import UnsafeFileError, atomic_file, check_writable, new_file_mode, remove_stale_temps
from vcrd.train.run_lock import LOCK_NAME, RunLock

from ..helpers import CACHE_K, CACHE_ROWS, make_workspace, tiny_llama, train_config

VICTIM = "precious data\n"


@pytest.fixture
def victim(tmp_path):
    """A file outside the output folder that no vcrd command may change."""
    path = tmp_path / "victim.txt"
    path.write_text(VICTIM)
    os.chmod(path, 0o640)
    return path


def assert_untouched(victim) -> None:
    assert victim.read_text() == VICTIM
    assert stat.S_IMODE(victim.stat().st_mode) == 0o640


# ------------------------------------------------------------------------------------------ symlinks
def test_symlinked_lock_is_refused_not_followed(tmp_path, victim):
    out = tmp_path / "out"
    out.mkdir()
    (out / LOCK_NAME).symlink_to(victim)
    with pytest.raises(UnsafeFileError, match="symbolic link"):
        RunLock(out, lambda _: None).acquire()
    assert_untouched(victim)
    assert (out / LOCK_NAME).is_symlink()  # left as found, for the user to look at


def test_hard_linked_lock_is_refused(tmp_path, victim):
    out = tmp_path / "out"
    out.mkdir()
    os.link(victim, out / LOCK_NAME)
    with pytest.raises(UnsafeFileError, match="hard link"):
        RunLock(out, lambda _: None).acquire()
    assert_untouched(victim)


def test_cli_train_and_cache_teacher_refuse_a_symlinked_lock(tmp_path, victim, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / LOCK_NAME).symlink_to(victim)
    data = tmp_path / "data.jsonl"
    data.write_text('{"prompt": "p", "response": "r"}\n')
    model = tmp_path / "model"  # a real tiny model folder: the refusal must come from the lock, not the model
    from vcrd.app.tokenizer import build_char_tokenizer

    tok = build_char_tokenizer()
    tiny_llama(tok, 16, 0, layers=1).save_pretrained(model)
    tok.save_pretrained(model)
    assert main(["cache-teacher", "--model", str(model), "--data", str(data), "--out", str(out), "--top-k", "2"]) == 2
    assert "symbolic link" in capsys.readouterr().err
    assert_untouched(victim)


def test_write_probe_never_follows_a_planted_symlink(tmp_path, victim):
    out = tmp_path / "out"
    out.mkdir()
    planted = out / f".vcrd-write-probe-{os.getpid()}"  # the name the probe used to have
    planted.symlink_to(victim)
    check_writable(out, "--out")
    assert_untouched(victim)
    assert planted.is_symlink()
    assert sorted(p.name for p in out.iterdir()) == [planted.name]  # the probe itself is gone


def test_atomic_file_never_writes_through_a_planted_temporary_name(tmp_path, victim):
    target = tmp_path / "out" / "selected.jsonl"
    target.parent.mkdir()
    planted = target.parent / f".{target.name}.{os.getpid()}.tmp"  # the old, predictable name
    planted.symlink_to(victim)
    with atomic_file(target) as tmp:
        assert tmp != planted and tmp.name.startswith(f".{target.name}.") and tmp.name.endswith(".tmp")
        tmp.write_text("new\n")
    assert target.read_text() == "new\n" and not target.is_symlink()
    assert_untouched(victim)
    assert planted.is_symlink()


def test_atomic_file_replaces_a_symlinked_target_instead_of_following_it(tmp_path, victim):
    target = tmp_path / "out.jsonl"
    target.symlink_to(victim)
    with atomic_file(target) as tmp:
        tmp.write_text("new\n")
    assert not target.is_symlink() and target.read_text() == "new\n"
    assert_untouched(victim)


def test_atomic_file_failure_leaves_target_and_no_temporary(tmp_path):
    target = tmp_path / "kept.json"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_file(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed")
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["kept.json"]


def test_new_file_mode_never_changes_the_umask(tmp_path, monkeypatch):
    want = 0o666 & ~int(open("/proc/self/status").read().split("Umask:")[1].split()[0], 8)

    def forbidden(mask):
        raise AssertionError("os.umask called: it changes the mask of every thread for a moment")

    monkeypatch.setattr(os, "umask", forbidden)
    assert new_file_mode(tmp_path / "new.json") == want
    with atomic_file(tmp_path / "new.json") as tmp:
        tmp.write_text("{}")
    assert stat.S_IMODE((tmp_path / "new.json").stat().st_mode) == want


# ------------------------------------------------------------------------------------------ --out
@pytest.fixture
def data_file(tmp_path):
    path = tmp_path / "data.jsonl"
    lines = [{"prompt": f"q{i % 2}", "response": f"r{i}"} for i in range(4)]
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


@pytest.mark.parametrize("how", ["same", "symlink", "hardlink"])
def test_score_out_equal_to_data_is_refused_before_work(tmp_path, data_file, capsys, how):
    before = data_file.read_bytes()
    out = data_file
    if how == "symlink":
        out = tmp_path / "alias.jsonl"
        out.symlink_to(data_file)
    elif how == "hardlink":
        out = tmp_path / "alias.jsonl"
        os.link(data_file, out)
    code = main(["score", "--model", str(tmp_path / "no-model"), "--data", str(data_file), "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and "--out" in err and "input" in err, err
    assert data_file.read_bytes() == before


def test_score_out_naming_a_device_or_fifo_is_refused(tmp_path, data_file, capsys):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    for out in ("/dev/null", str(fifo)):
        code = main(["score", "--model", str(tmp_path / "no-model"), "--data", str(data_file), "--out", out])
        err = capsys.readouterr().err
        assert code == 2 and "not a regular file" in err, err
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode) and stat.S_ISFIFO(os.stat(fifo).st_mode)


def test_score_out_naming_a_directory_is_refused(tmp_path, data_file, capsys):
    code = main(["score", "--model", str(tmp_path / "no-model"), "--data", str(data_file), "--out", str(tmp_path)])
    assert code == 2 and "is a directory" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ cache-teacher temps
def test_stale_temporary_shards_of_every_name_are_removed(tmp_path):
    names = [".shard-00003.npy.4242.tmp",  # the name a killed older run left
             ".shard-00003.npy.k2j4x_9a.tmp",  # atomic_file's name now
             ".shard-00001.json.77.tmp", ".manifest.json.abc.tmp"]
    for name in names:
        (tmp_path / name).write_bytes(b"x" * 100)
    keep = ["shard-00003.npy", "notes.tmp", ".other.tmp"]
    for name in keep:
        (tmp_path / name).write_bytes(b"y")
    removed = remove_stale_temps(tmp_path, ("shard-*.npy", "shard-*.json", "manifest.json"))
    assert sorted(p.name for p in removed) == sorted(names)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(keep)


def test_cache_teacher_removes_the_shard_a_killed_run_left(tmp_path):
    from vcrd.app.tokenizer import build_char_tokenizer
    from vcrd.train.teacher_cache import TeacherCache
    from vcrd.train.teacher_cache_format import CacheError
    from vcrd.train.teacher_cache_writer import build_cache

    tok = build_char_tokenizer()
    tiny_llama(tok, 16, 1, layers=1).save_pretrained(tmp_path / "teacher")
    tok.save_pretrained(tmp_path / "teacher")
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in CACHE_ROWS[:2]))
    out = tmp_path / "cache"
    out.mkdir()
    killed = out / f".shard-00000.npy.{os.getpid() + 1}.tmp"
    killed.write_bytes(b"\0" * 4096)
    said = []
    build_cache(tmp_path / "teacher", tmp_path / "data.jsonl", out, CACHE_K, max_length=64, progress=False,
                   say=said.append)
    assert not killed.exists(), said
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]
    # a cache reader (the trainer's) verifies contents on open: a same-size flip is refused at once
    shard = out / "shard-00000.npy"
    raw = bytearray(shard.read_bytes())
    raw[-3] ^= 0x40
    shard.write_bytes(bytes(raw))
    with pytest.raises(CacheError, match="sha256"):
        TeacherCache(out)
    from transformers import TrainingArguments

    from vcrd.train.data import DistillCollator, read_jsonl
    from vcrd.train.trainer import VCRDTrainer

    args = TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=1, report_to=[], use_cpu=True,
                             remove_unused_columns=False, save_strategy="no")
    with pytest.raises(CacheError, match="sha256"):  # the trainer's reader too, before any row is read
        VCRDTrainer(model=tiny_llama(tok, 16, 2, layers=1), teacher_cache=out, args=args,
                    train_dataset=read_jsonl(tmp_path / "data.jsonl"), data_collator=DistillCollator(tok, 64))


# ------------------------------------------------------------------------------------------ small inputs
def test_num_items_in_batch_inf_nan_and_1d_tensor_are_refused():
    from vcrd.loss.functional import vcrd_loss

    s = torch.randn(6, 11, requires_grad=True)
    u = torch.randn(6, 11)
    y = torch.randint(0, 11, (6,))
    for bad in (float("inf"), float("nan"), torch.tensor(float("inf")), torch.tensor([10, 3])):
        with pytest.raises(ValueError, match="num_items_in_batch"):
            vcrd_loss(s, u, y, num_items_in_batch=bad)


def test_sparse_teacher_log_probs_requiring_grad_are_refused():
    from vcrd.loss.sparse import SparseTeacher

    ids = torch.tensor([[0, 1]])
    lp = torch.log(torch.tensor([[0.5, 0.25]])).requires_grad_(True)
    tail = torch.log(torch.tensor([0.25]))
    with pytest.raises(ValueError, match="requires grad|require grad"):
        SparseTeacher(ids, lp, tail)
    with pytest.raises(ValueError, match="require"):
        SparseTeacher(ids, lp.detach(), tail.clone().requires_grad_(True))
    SparseTeacher(ids, lp.detach(), tail)  # the detached teacher is accepted


# ------------------------------------------------------------------------------------------ vocab-parallel agreement
AGREE_TIMEOUT_S = 30  # a collective waiting longer fails the test instead of hanging it


def _agree_entry(rank: int, worker, world: int, init_method: str) -> None:
    import datetime

    import torch.distributed as dist

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), VCRD_COMPILE="0")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=AGREE_TIMEOUT_S))
    try:
        worker(rank, world)
    finally:
        dist.destroy_process_group()


def _agreement_worker(rank: int, world: int) -> None:
    """On 2 gloo ranks: each failure on ONE rank must raise on EVERY rank (a hang fails by timeout), and the
    group must stay usable after it."""
    import torch.distributed as dist

    import vcrd.core.loss_options as row_checks  # where the losses check their rows (ResolvedOptions.layout)
    from vcrd.distributed import fused_linear_vocab_parallel_vcrd_loss, vocab_parallel_vcrd_loss

    V, N, H = 13, 6, 5
    gen = torch.Generator().manual_seed(0)
    s, u = torch.randn(N, V, generator=gen), torch.randn(N, V, generator=gen)
    hs, hu = torch.randn(N, H, generator=gen), torch.randn(N, H, generator=gen)
    ws, wu = torch.randn(V, H, generator=gen), torch.randn(V, H, generator=gen)
    y = torch.randint(0, V, (N,), generator=gen)
    cut = 7
    lo, hi = (0, cut) if rank == 0 else (cut, V)

    def logits_call(**over):
        x = s[:, lo:hi].clone().requires_grad_(True)
        kw = {**dict(vocab_start=lo, vocab_size=V, config="kd"), **over}
        return vocab_parallel_vcrd_loss(x, u[:, lo:hi], y, **kw)

    def fused_call(h=None, **over):
        h = hs.clone().requires_grad_(True) if h is None else h
        kw = {**dict(vocab_start=lo, vocab_size=V, config="kd"), **over}
        return fused_linear_vocab_parallel_vcrd_loss(h, ws[lo:hi], hu, wu[lo:hi], y, **kw)

    def expect(fn, *fragments, in_step=True, **over):
        try:
            fn(**over)
        except ValueError as e:
            for fragment in fragments:
                assert fragment in str(e), (rank, fragment, str(e))
        else:
            raise AssertionError(f"rank {rank}: no error for {over} ({fragments})")
        if in_step:
            logits_call().backward()  # the group is still in step

    # the case: a 2-element num_items_in_batch tensor on rank 1 only
    expect(logits_call, "rank 1", "num_items_in_batch",
           num_items_in_batch=torch.tensor([10, 3]) if rank == 1 else 10)
    expect(fused_call, "rank 1", "num_items_in_batch",
           num_items_in_batch=torch.tensor([10, 3]) if rank == 1 else 10)
    # any exception during the agreement step is shared, not only ValueError / TypeError
    real = row_checks.check_rows
    if rank == 1:
        def broken(*a, **k):
            raise RuntimeError("device lost while checking the rows")
        row_checks.check_rows = broken
    try:
        expect(logits_call, "rank 1", "RuntimeError", "device lost", in_step=False)
    finally:
        row_checks.check_rows = real
    logits_call().backward()  # the group is still in step
    # student_hidden.requires_grad differing: refused in the forward, before the backward's all_reduce
    expect(fused_call, "requires grad", h=hs.clone() if rank == 1 else None)
    # a config that differs in one field: the message names the field and every rank's value
    expect(logits_call, "'temperature'", "rank 0 1.0", "rank 1 2.0",
           config=__import__("vcrd").VCRDConfig.preset("kd", temperature=2.0) if rank == 1 else "kd")
    seen = [None] * world
    dist.all_gather_object(seen, rank)
    assert seen == list(range(world))


def test_vocab_parallel_failures_on_one_rank_raise_on_every_rank():
    import tempfile

    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory(prefix="vcrd-rdzv-") as folder:
        init = f"file://{os.path.join(folder, 'rendezvous')}"
        mp.start_processes(_agree_entry, args=(_agreement_worker, 2, init), nprocs=2, join=True,
                           start_method="spawn")


# ------------------------------------------------------------------------------------------ data, devices, score
def test_lone_surrogate_in_data_is_named_with_file_and_line(tmp_path):
    from vcrd.train.data import read_jsonl

    data = tmp_path / "data.jsonl"
    data.write_text('{"prompt": "p", "response": "r"}\n{"prompt": "p", "response": "bad \\ud800 text"}\n')
    with pytest.raises(ValueError, match=rf"{data}:2: field 'response' holds a lone surrogate \(U\+D800"):
        read_jsonl(data)
    data.write_text('{"prompt": "p", "response": "r", "steps": ["a", "\\udfff"]}\n')
    with pytest.raises(ValueError, match=rf"{data}:1: field 'steps\[1\]'"):
        read_jsonl(data)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without a GPU")
def test_cuda_without_a_gpu_is_refused_before_anything_is_written(tmp_path, data_file, capsys):
    out = tmp_path / "cache"
    code = main(["cache-teacher", "--model", str(tmp_path / "m"), "--data", str(data_file), "--out", str(out),
                 "--top-k", "2", "--device", "cuda"])
    err = capsys.readouterr().err
    assert code == 2 and "--device" in err and "has none" in err, err
    assert not out.exists()  # no unfinished manifest
    code = main(["score", "--model", str(tmp_path / "m"), "--data", str(data_file), "--out", str(tmp_path / "o.jsonl"),
                 "--device", "cuda"])
    assert code == 2 and "--device" in capsys.readouterr().err


@pytest.fixture(scope="module")
def gpt2_folder(tmp_path_factory):
    """A 1-layer GPT-2 with 32 learned positions (an IndexError past them) and the char tokenizer."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from vcrd.app.tokenizer import build_char_tokenizer

    folder = tmp_path_factory.mktemp("gpt2")
    tok = build_char_tokenizer()
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=len(tok), n_positions=32, n_embd=16, n_layer=1, n_head=2,
                     bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    GPT2LMHeadModel(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def test_score_refuses_responses_past_the_position_limit_naming_file_and_line(gpt2_folder, tmp_path, capsys):
    data = tmp_path / "data.jsonl"
    short = {"prompt": "What is 1+1?", "response": "2."}  # 1 + 12 + 2 ids: fits 32
    long = {"prompt": "What is 1+1?", "response": "First one.\n\nThen one more.\n\nSo two."}  # 1 + 12 + 35 ids
    data.write_text("".join(json.dumps(x) + "\n" for x in (short, long, short)))
    out = tmp_path / "out.jsonl"
    code = main(["score", "--model", str(gpt2_folder), "--data", str(data), "--out", str(out),
                 "--max-step-tokens", "8"])
    err = capsys.readouterr().err
    assert code == 2 and f"{data}:2 (48 ids)" in err and "max_position_embeddings=32" in err, err
    assert f"{data}:1" not in err and not out.exists()


@pytest.mark.parametrize("flag,value", [("--max-step-tokens", "600"), ("--max-prompt-tokens", "5000")])
def test_score_caps_past_the_position_limit_are_refused_with_the_right_numbers(gpt2_folder, tmp_path, capsys, flag,
                                                                               value):
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps({"prompt": "q", "response": "r"}) + "\n")
    code = main(["score", "--model", str(gpt2_folder), "--data", str(data), "--out", str(tmp_path / "o.jsonl"),
                 "--max-step-tokens", "8", flag, value])
    err = capsys.readouterr().err
    assert code == 2 and f"{flag}: {value}" in err and "max_position_embeddings=32" in err, err
    assert "cap of 1 tokens" not in err


def test_score_responses_refuses_past_the_position_limit_instead_of_an_index_error(gpt2_folder):
    from transformers import AutoTokenizer, GPT2LMHeadModel

    from vcrd.select.naturalness import score_responses

    model = GPT2LMHeadModel.from_pretrained(gpt2_folder).eval()
    tok = AutoTokenizer.from_pretrained(gpt2_folder)
    fine = score_responses(model, tok, ["q"], [["ab", "cd"]], window=1)
    assert fine[0] is not None
    with pytest.raises(ValueError, match=r"max_position_embeddings=32.*: responses\[1\] \(41 ids\)\."):
        score_responses(model, tok, ["q", "q"], [["ab"], ["x" * 39]], window=1)


# ------------------------------------------------------------------------------------------ checkpoints
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny 4-step run (checkpoints at 2 and 4) shared by the checkpoint cases, which damage copies."""
    root, _ = make_workspace(tmp_path_factory.mktemp("hostile_run"), 8)
    assert main(["train", "--config", train_config(root, "base")]) == 0
    return root


def _copy_run(root, name):
    import shutil

    shutil.copytree(root / "base", root / name)
    return root / name, train_config(root, name)


def test_same_size_bit_flip_in_optimizer_state_is_refused_on_resume(trained):
    from vcrd.train.resume import find_resume_checkpoint
    from vcrd.train.run_errors import ResumeError

    out, _ = _copy_run(trained, "flip")
    for step in (4, 2):
        opt = out / f"checkpoint-{step}" / "optimizer.pt"
        raw = bytearray(opt.read_bytes())
        raw[len(raw) // 2] ^= 0x01  # one bit, same size: a size check cannot see it
        opt.write_bytes(bytes(raw))
        said = []
        if step == 4:
            path, _ = find_resume_checkpoint(out, said.append)
            assert path.name == "checkpoint-2" and "optimizer.pt is damaged: its sha256 differs" in said[0], said
    with pytest.raises(ResumeError, match="no complete checkpoint"):
        find_resume_checkpoint(out, lambda _: None)


def test_optimizer_state_holding_code_is_refused_with_a_clear_message(trained, capsys):
    out, cfg = _copy_run(trained, "evil")
    for step in (2, 4):
        ckpt = out / f"checkpoint-{step}"
        (ckpt / "vcrd_checkpoint.json").unlink()  # as an older vcrd wrote it: nothing to hash against

        class Payload:
            def __reduce__(self):
                return (os.getpid, ())  # harmless, but code: weights_only loading must refuse it

        torch.save({"state": Payload()}, ckpt / "optimizer.pt")
    code = main(["train", "--config", cfg, "--resume"])
    err = capsys.readouterr().err
    assert code == 2 and "optimizer.pt cannot be loaded safely" in err and "Traceback" not in err, err


def test_resume_on_another_world_size_refuses_before_saying_continuing(trained, capsys):
    out, cfg = _copy_run(trained, "world")
    for step in (2, 4):
        path = out / f"checkpoint-{step}" / "vcrd_checkpoint.json"
        manifest = json.loads(path.read_text())
        manifest["run"]["world_size"] = 2  # written by 2 processes; this resume runs 1
        path.write_text(json.dumps(manifest))
    code = main(["train", "--config", cfg, "--resume"])
    err = capsys.readouterr().err
    assert code == 2 and "world_size: checkpoint 2, now 1" in err, err
    assert "continuing from" not in err
