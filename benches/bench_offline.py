"""Offline distillation (SPEC §10): disk, training-step time and student accuracy, cache vs online teacher.

    python benches/bench_offline.py disk                     # bytes per token on disk for K = 16, 64, 256
    python benches/bench_offline.py step --repeats 5         # one training step: online teacher 4x vs cache
    python benches/bench_offline.py accuracy --seeds 0 1 2   # the demo's vcrd student, online vs cache

``disk``: the cache writer's own shard files (:func:`vcrd.train.teacher_cache_writer.write_shard`, header
included) for 100,000 random valid rows per K, against a dense bf16 row (``2 V`` bytes) at the
teacher vocabularies named.

``step``: tiny Llamas, the student 64-d / 2 layers and a teacher 224-d / 2 layers (4.1x the student's
parameters), vocabulary 8192, batch 8 x 256 tokens of random ids with a 32-token prompt: one AdamW
step of :func:`vcrd.train.trainer.distill_loss` (preset vcrd), (a) with the teacher model run at every
step and (b) from the teacher's top-K rows read from a memory-mapped ``.npy`` of cache records (the
cache's record layout; the rows are read and converted inside the timing). Both alternate in one
process (median of ``--repeats`` after a warm-up). The gradient of the step timed from the cache is
checked against the float64 reference on the completed teacher (``benches/gradcheck.py`` metric).

``accuracy``: :func:`vcrd.app.demo.run_demo` at its full default size, presets ``vcrd`` only, for each
seed: the online vcrd student and the student trained from the top-64 cache (same initial weights,
batches, steps), exact match on the same 500 held-out problems; mean and spread over the seeds.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from vcrd import SparseTeacher

RESULTS = Path(__file__).parent / "results"


def machine() -> str:
    return (f"{torch.get_num_threads()} torch threads, load average {os.getloadavg()[0]:.1f} "
            f"(2 cores shared with other jobs: timings under load), torch {torch.__version__}")


# ------------------------------------------------------------------------------------------- disk
def disk(args) -> dict:
    from vcrd.train.teacher_cache_format import record_dtype
    from vcrd.train.teacher_cache_writer import write_shard

    rows, out = 100_000, {}
    g = torch.Generator().manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        for k in args.K:
            logits = torch.randn(rows, max(args.K) * 2, generator=g) * 3
            t = SparseTeacher.from_logits(logits, k)

            def fill(array, t=t):
                array["topk_ids"] = t.topk_ids.numpy()
                array["topk_logprobs"] = t.topk_logprobs.to(torch.float16).numpy()
                array["tail_logprob"] = t.tail_logprob.numpy()

            size, _ = write_shard(Path(tmp) / f"k{k}.npy", rows, k, fill)
            out[k] = {"bytes_per_token": size / rows, "record_bytes": record_dtype(k).itemsize}
    print(f"disk: {rows} rows per shard, the cache writer's .npy files (header included)")
    print("| K | bytes / token (measured) | record | " + " | ".join(f"vs dense bf16, V={v}" for v in args.V) + " |")
    print("|---:|---:|---:|" + "---:|" * len(args.V))
    for k, r in out.items():
        print(f"| {k} | {r['bytes_per_token']:.2f} | {r['record_bytes']} | "
              + " | ".join(f"{2 * v / r['bytes_per_token']:.0f}x smaller" for v in args.V) + " |")
    return {"rows": rows, "K": out, "dense_bf16_bytes": {v: 2 * v for v in args.V}}


# ------------------------------------------------------------------------------------------- step
def tiny_llama(vocab: int, hidden: int, layers: int, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                                        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=4,
                                        max_position_embeddings=512, tie_word_embeddings=False))


def step(args) -> dict:
    from gradcheck import Errors, verdict  # benches/ is on sys.path when run as a script

    from vcrd.core import reference
    from vcrd.train.teacher_cache_format import record_dtype
    from vcrd.train.trainer import CACHE_KEYS, distill_loss

    V, B, T, prompt = args.vocab, args.batch, args.seq, 32
    student, teacher = tiny_llama(V, 64, 2, 1), tiny_llama(V, 224, 2, 2).eval().requires_grad_(False)
    n_s, n_t = (sum(p.numel() for p in m.parameters()) for m in (student, teacher))
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, V, (B, T), generator=g)
    labels = ids.clone()
    labels[:, :prompt] = -100
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    with torch.no_grad():
        cached = SparseTeacher.from_logits(teacher(input_ids=ids).logits, args.K)  # [B, T, K]: position t
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "records.npy"
        records = np.lib.format.open_memmap(path, mode="w+", dtype=record_dtype(args.K), shape=(B * T,))
        records["topk_ids"] = cached.topk_ids.reshape(B * T, -1).int().numpy()
        records["topk_logprobs"] = cached.topk_logprobs.reshape(B * T, -1).half().numpy()
        records["tail_logprob"] = cached.tail_logprob.reshape(-1).numpy()
        records.flush()
        del records
        records = np.load(path, mmap_mode="r")
        opt = torch.optim.AdamW(student.parameters(), lr=1e-3)

        def run(kind: str):
            if kind == "online":
                loss, _ = distill_loss(student, teacher, batch, "vcrd")
            else:
                rows = records[:]  # the pages of this batch's records
                fields = [torch.from_numpy(np.ascontiguousarray(rows[n])) for n in
                          ("topk_ids", "topk_logprobs", "tail_logprob")]
                shaped = [fields[0].view(B, T, -1), fields[1].view(B, T, -1), fields[2].view(B, T)]
                loss, _ = distill_loss(student, None, {**batch, **dict(zip(CACHE_KEYS, shaped))}, "vcrd")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            grads = {n: p.grad.clone() for n, p in student.named_parameters() if n == "lm_head.weight"}
            opt.step()
            return loss.detach(), grads

        times = {"online": [], "cache": []}
        run("online"), run("cache")  # warm-up (torch.compile of the loss chunks)
        for _ in range(args.repeats):
            for kind in times:
                w, c = time.perf_counter(), time.process_time()
                _, grads = run(kind)
                times[kind].append((time.perf_counter() - w, time.process_time() - c))
        # gradient check of the cache step: the same step's LM-head gradient from the float64 reference
        # on the completed teacher (autograd through the student's final hidden states, which do not
        # depend on the head)
        opt.zero_grad(set_to_none=True)
        state = {k: v.clone() for k, v in student.state_dict().items()}
        loss, grads = run("cache")
        student.load_state_dict(state)
        with torch.no_grad():
            h = student.model(input_ids=ids).last_hidden_state[:, :-1].double()
        W = student.lm_head.weight.detach().double().requires_grad_()
        teacher_rows = SparseTeacher(cached.topk_ids[:, :-1], cached.topk_logprobs.half()[:, :-1],
                                     cached.tail_logprob[:, :-1])
        dense = teacher_rows.completed_logprobs(slice(None), V, torch.float64).reshape(B, T - 1, V)
        reference.vcrd_loss(h @ W.T, dense, labels[:, 1:], config="vcrd").backward()
        err = Errors()
        err.add(grads["lm_head.weight"], W.grad)
    med = {k: (statistics.median(w for w, _ in v), statistics.median(c for _, c in v)) for k, v in times.items()}
    print(f"step: student {n_s / 1e6:.2f}M params (64-d, 2 layers), teacher {n_t / 1e6:.2f}M (224-d, 2 layers, "
          f"{n_t / n_s:.1f}x), V={V}, batch {B}x{T}, K={args.K}, preset vcrd, {machine()}")
    for k, (w, c) in med.items():
        print(f"  {k:6s}: median {w:.3f} s wall, {c:.3f} s CPU per step")
    print(f"  cache vs online: {med['online'][0] / med['cache'][0]:.2f}x wall, "
          f"{med['online'][1] / med['cache'][1]:.2f}x CPU")
    print(f"  grad check (cache step, lm_head vs float64 reference on the completed teacher): "
          f"{err.rel:.1e} -> {verdict(err.rel)}")
    return {"params": {"student": n_s, "teacher": n_t}, "median_wall": {k: v[0] for k, v in med.items()},
            "median_cpu": {k: v[1] for k, v in med.items()}, "grad_rel_err": err.rel, "grad_check": verdict(err.rel)}


# --------------------------------------------------------------------------------------- accuracy
def accuracy(args) -> dict:
    from vcrd.app.demo import DemoSettings, run_demo

    per_seed = {}
    for seed in args.seeds:
        with tempfile.TemporaryDirectory() as tmp:
            r = run_demo(DemoSettings(seed=seed, presets=("vcrd",), offline_k=args.K, out=tmp))
        per_seed[seed] = {"online": r["accuracy"]["vcrd"], "cache": r["accuracy"]["vcrd_offline"],
                          "teacher": r["accuracy"]["teacher"], "seconds": r["seconds"]}
        print(f"seed {seed}: {per_seed[seed]}", flush=True)
    out = {"per_seed": per_seed}
    print(f"\naccuracy: demo at full size (n_eval 500), presets vcrd, K={args.K}, seeds {args.seeds}; {machine()}")
    print("| student | " + " | ".join(f"seed {s}" for s in args.seeds) + " | mean | spread (min–max) |")
    print("|---|" + "---:|" * (len(args.seeds) + 2))
    for kind in ("online", "cache", "teacher"):
        acc = [per_seed[s][kind] for s in args.seeds]
        out[kind] = {"mean": statistics.mean(acc), "min": min(acc), "max": max(acc)}
        print(f"| {kind} | " + " | ".join(f"{a:.1%}" for a in acc)
              + f" | {statistics.mean(acc):.1%} | {min(acc):.1%}–{max(acc):.1%} |")
    diffs = [per_seed[s]["cache"] - per_seed[s]["online"] for s in args.seeds]
    out["cache_minus_online"] = diffs
    print("cache − online per seed: " + ", ".join(f"{d:+.1%}" for d in diffs))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="what", required=True)
    d = sub.add_parser("disk")
    d.add_argument("--K", type=int, nargs="+", default=[16, 64, 256])
    d.add_argument("--V", type=int, nargs="+", default=[32000, 151936])
    s = sub.add_parser("step")
    s.add_argument("--vocab", type=int, default=8192)
    s.add_argument("--batch", type=int, default=8)
    s.add_argument("--seq", type=int, default=256)
    s.add_argument("--K", type=int, default=64)
    s.add_argument("--repeats", type=int, default=5)
    a = sub.add_parser("accuracy")
    a.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    a.add_argument("--K", type=int, default=64)
    args = p.parse_args()
    result = {"disk": disk, "step": step, "accuracy": accuracy}[args.what](args)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"offline_{args.what}.json").write_text(json.dumps({"machine": machine(), **result}, indent=1,
                                                                  default=str))


if __name__ == "__main__":
    main()
