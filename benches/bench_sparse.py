"""Sparse (top-K) teacher vs the dense teacher: time, memory and gradient check, CPU, fp32, fwd+bwd.

    python benches/bench_sparse.py                        # N=1024, H=512, V=65536, K = 16, 64, 256, both levels
    python benches/bench_sparse.py --level fused --K 64   # the issue's target (sparse fused >= 1.25x dense)
    python benches/bench_sparse.py --V 8192 --N 256 --repeats 2

Providers, alternated in one process (median of ``--repeats`` after a warm-up; wall and CPU seconds):

- ``dense``: the teacher's full logits (``logits`` level: ``vcrd_loss(s, u)``; ``fused`` level:
  ``fused_linear_vcrd_loss`` with the teacher's hidden states and LM head, i.e. its GEMM);
- ``sparse K=..``: :func:`sparse_vcrd_loss` / :func:`fused_linear_sparse_vcrd_loss` on CPU, the O(K)
  path (:mod:`vcrd.backends.torch_sparse`);
- ``densified K=..``: the same losses through the dense CPU backend on the completed teacher
  densified (logits level: the whole ``[N, V]`` completed teacher, built inside the call; fused level:
  per chunk), as vcrd's CPU path was before the O(K) one.

Memory: peak RSS during one call minus RSS before it (``benches/memory.py``). Each provider's
timed gradient is checked against the float64 reference (``vcrd.core.reference``, ``benches/gradcheck.py``
metric and tolerance): ``dense`` on the teacher's logits, the sparse providers on the completed
teacher densified in float64 by the check (logits level: the first and last 96 rows and Z over the
batch; fused level: every row of grad_hidden and grad_weight). Preset vcrd, one packed sequence with
30-token steps, 10 % ignored rows.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path
from typing import Callable, Dict

import gradcheck  # benches/ is on sys.path when run as a script
import torch
from memory import peak_rss_delta

from vcrd import SparseTeacher, fused_linear_sparse_vcrd_loss, fused_linear_vcrd_loss, sparse_vcrd_loss, vcrd_loss
from vcrd.core.checks import RowBatch
from vcrd.core.loss_options import parse_options
from vcrd.loss.fused_linear import loss_from_hidden

PRESET = "vcrd"


def densified_logits_loss(s, teacher: SparseTeacher, y, steps):
    """``sparse_vcrd_loss`` through the dense CPU backend on the completed teacher, densified whole."""
    dense = teacher.completed_logprobs(slice(None), s.shape[-1], torch.float32).view_as(s)
    return vcrd_loss(s, dense, y, step_ids=steps, config=PRESET, impl="torch")


def densified_fused_loss(h, w, teacher: SparseTeacher, y, steps):
    """``fused_linear_sparse_vcrd_loss`` with the completed teacher densified per chunk (dense backend)."""
    opts = parse_options("densified_fused_loss", dict(step_ids=steps, config=PRESET, impl="torch"))
    V = w.shape[0]
    layout = opts.layout(y, h.shape[:-1], h.device, V)
    read = teacher.chunk_reader(V, torch.float32)
    return loss_from_hidden(h, w, None, lambda idx, s, rows: RowBatch(s, read(idx), rows), V, layout, opts, "auto")


def sparse_fused_reference(hs, ws, completed: torch.Tensor, y, steps) -> Dict[str, torch.Tensor]:
    """float64 ``"mean"`` gradients w.r.t. hidden states and head, every row, on a given float64
    teacher ``completed [N, V]`` (log-probs: they play the logits), chunked and widened to each window
    as :func:`gradcheck.fused_reference` does."""
    cfg = gradcheck.config(PRESET)
    hs64, ws64 = hs.detach().double(), ws.detach().double()

    def logits(lo, hi):
        return hs64[lo:hi] @ ws64.T, completed[lo:hi]

    Z = gradcheck.normalizer(logits, y, steps, cfg)
    grad_h, grad_w = torch.zeros_like(hs64), torch.zeros_like(ws64)
    step = gradcheck.chunk_rows(ws.shape[0], gradcheck.max_overlap(cfg, steps), per_elem=12 * 8)
    for a in range(0, y.numel(), step):
        b = min(y.numel(), a + step)
        G = gradcheck.block_grad(logits, y, steps, cfg, a, b) / Z
        grad_h[a:b] = G @ ws64
        grad_w.addmm_(G.T, hs64[a:b])
    return {"grad_h": grad_h, "grad_W": grad_w}


def timed(providers: Dict[str, Callable], repeats: int):
    """Warm-up, then ``repeats`` interleaved rounds; ``{name: (median wall, median CPU, last grads)}``."""
    for fn in providers.values():
        fn()
    times = {k: [] for k in providers}
    grads = {}
    for _ in range(repeats):
        for name, fn in providers.items():
            w, c = time.perf_counter(), time.process_time()
            grads[name] = fn()
            times[name].append((time.perf_counter() - w, time.process_time() - c))
    return {k: (statistics.median(w for w, _ in v), statistics.median(c for _, c in v), grads[k])
            for k, v in times.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--N", type=int, default=1024)
    p.add_argument("--H", type=int, default=512)
    p.add_argument("--V", type=int, default=65536)
    p.add_argument("--K", type=int, nargs="+", default=[16, 64, 256])
    p.add_argument("--level", choices=["logits", "fused", "both"], default="both")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-densified", action="store_true", help="skip the densified providers")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default 0: torch's default)")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    g = torch.Generator().manual_seed(0)
    hs = torch.randn(a.N, a.H, generator=g)
    ws = (torch.randn(a.V, a.H, generator=g) * (10 / a.H ** 0.5)).requires_grad_()
    ht = hs + 0.5 * torch.randn(a.N, a.H, generator=g)
    wt = ws.detach() + torch.randn(a.V, a.H, generator=g) * (5 / a.H ** 0.5)
    with torch.no_grad():
        u = torch.cat([ht[i:i + 256] @ wt.T for i in range(0, a.N, 256)])
        s0 = torch.cat([hs[i:i + 256] @ ws.T for i in range(0, a.N, 256)])
    y = u.argmax(-1)
    y[torch.rand(a.N, generator=g) < 0.1] = -100
    steps = torch.arange(a.N) // 30
    teachers = {k: SparseTeacher.from_logits(u, k) for k in a.K}
    header = (f"N={a.N} H={a.H} V={a.V}, preset {PRESET}, fp32, {torch.get_num_threads()} threads, load average "
              f"{os.getloadavg()[0]:.1f} (2 cores shared with other jobs: timings under load), "
              f"torch {torch.__version__}")
    results = {"machine": header, "rows": []}
    print(header, flush=True)
    print("| level | provider | median fwd+bwd wall (s) | CPU (s) | dense / this (wall) | peak RSS delta (MiB) | "
          "grad check (max rel err) |")
    print("|---|---|---:|---:|---:|---:|---|")
    levels = ["logits", "fused"] if a.level == "both" else [a.level]
    for level in levels:
        providers: Dict[str, Callable] = {}
        if level == "logits":
            def logits_run(loss_fn):
                def run():
                    x = s0.clone().requires_grad_()
                    loss_fn(x).backward()
                    return (x.grad,)
                return run

            providers["dense"] = logits_run(lambda x: vcrd_loss(x, u, y, step_ids=steps, config=PRESET))
            for k, t in teachers.items():
                providers[f"sparse K={k}"] = logits_run(
                    lambda x, t=t: sparse_vcrd_loss(x, t, y, step_ids=steps, config=PRESET, impl="torch"))
                if not a.no_densified:
                    providers[f"densified K={k}"] = logits_run(lambda x, t=t: densified_logits_loss(x, t, y, steps))
        else:
            def fused_run(loss_fn):
                def run():
                    x = hs.clone().requires_grad_()
                    ws.grad = None
                    loss_fn(x).backward()
                    return x.grad, ws.grad.clone()
                return run

            providers["dense"] = fused_run(lambda x: fused_linear_vcrd_loss(x, ws, ht, wt, y, step_ids=steps,
                                                                            config=PRESET))
            for k, t in teachers.items():
                providers[f"sparse K={k}"] = fused_run(
                    lambda x, t=t: fused_linear_sparse_vcrd_loss(x, ws, t, y, step_ids=steps, config=PRESET))
                if not a.no_densified:
                    providers[f"densified K={k}"] = fused_run(lambda x, t=t: densified_fused_loss(x, ws, t, y, steps))
        out = timed(providers, a.repeats)
        memory = {name: peak_rss_delta(fn)[0] for name, fn in providers.items()}
        refs = {}
        for name, (wall, cpu, grads) in out.items():
            k = None if name == "dense" else int(name.split("K=")[1])
            if k not in refs:  # the float64 teacher the check uses: the logits, or the completed top-K
                teacher64 = u.double() if k is None else teachers[k].completed_logprobs(slice(None), a.V, torch.float64)
                refs[k] = (teacher64 if level == "logits" else
                           gradcheck.fused_reference(hs, ws, ht, wt, y, steps, [PRESET])[PRESET] if k is None else
                           sparse_fused_reference(hs, ws, teacher64, y, steps))
            if level == "logits":
                check = gradcheck.check_logits(grads[0], s0, refs[k], y, steps, PRESET)
            else:
                check = gradcheck.check_fused(grads[0], grads[1], refs[k])
            row = dict(level=level, provider=name, wall=wall, cpu=cpu, speedup=out["dense"][0] / wall,
                       rss_delta=memory[name], **check)
            results["rows"].append(row)
            print(f"| {level} | {name} | {wall:.3f} | {cpu:.3f} | {row['speedup']:.2f}x | {memory[name] / 2**20:.0f} | "
                  f"{gradcheck.cell(row)} |", flush=True)
        refs.clear()
    print("disk per token: " + ", ".join(f"K={k}: {6 * k + 4} bytes" for k in a.K)
          + f" (int32 ids, fp16 log-probs, fp32 tail) vs dense bf16 {2 * a.V} bytes")
    out_dir = Path(__file__).parent / "results"
    out_dir.mkdir(exist_ok=True)
    name = f"sparse-{a.level}-V{a.V}-t{torch.get_num_threads()}.json"
    (out_dir / name).write_text(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    main()
