"""Before/after timing of the CPU torch path's statistics sweep (issue 27 item 2), interleaved by process.

    python benches/chunk_passes.py                          # main vs this checkout, the three issue-27 shapes
    python benches/chunk_passes.py --base HEAD~1 --rounds 3 --repeats 3
    python benches/chunk_passes.py --shape bf16:2048,576,49152   # one shape (dtype:N,H,V)

"before" is ``vcrd/`` of ``--base`` (a git ref, exported to a temporary folder), "after" this checkout's
``vcrd/``. Each round runs one worker process per (shape, side), the sides alternating (and their order
swapped every round), so a change in the machine's load hits both. A worker builds the inputs of
``benches/compare.py`` (``make_inputs``: std ~10 correlated logits, 10 % ignored rows, the same seed on
both sides), times after one warm-up call (compilation):

- ``stats``: the compiled statistics of the ``vcrd`` preset alone (``TorchDensePair.stats``, forward KL)
  over the kept rows' logits, chunk by chunk (``VCRD_CHUNK_ROWS`` rows), the logits computed once
  outside the timing in the inputs' dtype (bf16 logits from bf16 heads, as the bf16 GEMM mode gives);
- ``loss``: ``fused_linear_vcrd_loss`` (preset ``vcrd``, ``impl="torch"``) forward and backward;

and prints one JSON line with the times, the loss value and the 1-minute load average before and after.
The medians over every round's repeats are printed per side with their ratio; the loss values of the two
sides must agree to 1e-5 (relative), and each side's last timed gradients (hidden states and head) must
pass the float64 check of ``benches/gradcheck.py`` (bf16: the three-way rule), else the run fails.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHAPES = ("bf16:2048,576,49152", "bf16:1024,896,151936", "fp32:2048,576,49152")


def parse_shape(text: str):
    """``"bf16:N,H,V"`` → ``("bf16", N, H, V)``."""
    dtype, _, dims = text.partition(":")
    try:
        N, H, V = (int(d) for d in dims.split(","))
    except ValueError:
        raise ValueError(f"--shape: expected dtype:N,H,V such as bf16:2048,576,49152, got {text!r}") from None
    if dtype not in ("bf16", "fp32"):
        raise ValueError(f"--shape: expected dtype bf16 or fp32, got {dtype!r} in {text!r}")
    return dtype, N, H, V


def worker(tree: str, shape: str, repeats: int, threads: int, grads: str) -> None:
    """Time ``stats`` and ``loss`` with the ``vcrd`` package of ``tree``; print one JSON line, and save the
    gradients of the last timed ``loss`` call (w.r.t. the hidden states and the head) to ``grads``."""
    sys.path.insert(0, tree)
    import torch

    if threads:
        torch.set_num_threads(threads)

    import vcrd  # before benches.compare, which puts this checkout first on sys.path
    from vcrd.backends.chunk_loop import Chunk
    from vcrd.backends.torch_dense import TorchDensePair
    from vcrd.core import settings

    if not vcrd.__file__.startswith(tree):
        raise RuntimeError(f"vcrd imported from {vcrd.__file__}, not from {tree}")
    sys.path.append(str(ROOT))
    from benches.compare import make_inputs

    dtype, N, H, V = parse_shape(shape)
    hs, ws, ht, wt, y, steps = make_inputs(N, H, V, dtype=dtype)
    cfg = vcrd.VCRDConfig.preset("vcrd")
    kept = (y != -100).nonzero().squeeze(1)
    with torch.no_grad():
        s, u = hs.detach()[kept] @ ws.detach().T, ht[kept] @ wt.T
    labels, C = y[kept], settings.chunk_rows()
    pair = TorchDensePair(cfg, V, C, True)

    def stats():
        for r0 in range(0, kept.numel(), C):
            r1 = min(r0 + C, kept.numel())
            pair.stats(Chunk(r0, r1, s[r0:r1], u[r0:r1], labels[r0:r1], torch.ones(r1 - r0, dtype=torch.bool), None))

    def loss():
        hs.grad = ws.grad = None
        value = vcrd.fused_linear_vcrd_loss(hs, ws, ht, wt, y, step_ids=steps, config=cfg, impl="torch")
        value.backward()
        return value.item()

    def timed(fn):
        fn()  # warm-up: compilation
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return times

    load = os.getloadavg()[0]
    row = dict(shape=shape, stats_s=timed(stats), loss_s=timed(loss), load=[load, os.getloadavg()[0]],
               threads=torch.get_num_threads(), torch=torch.__version__)
    torch.save(dict(grad_h=hs.grad, grad_W=ws.grad), grads)
    row["loss"] = loss()
    print(json.dumps(row))


def grads_file(folder: str, shape: str, side: str) -> str:
    """Where the worker of ``(shape, side)`` leaves its last timed gradients (each round overwrites them)."""
    return str(Path(folder) / f"{side}-{shape.replace(':', '-').replace(',', '-')}.pt")


def check_gradients(shape: str, folder: str) -> dict:
    """Both sides' last timed gradients against the float64 reference of the same inputs
    (``benches/gradcheck.py``; bf16: the three-way rule against PyTorch in bf16), printed and returned by side."""
    import torch

    sys.path.append(str(ROOT))
    from benches import gradcheck
    from benches.compare import make_inputs

    dtype, N, H, V = parse_shape(shape)
    hs, ws, ht, wt, y, steps = make_inputs(N, H, V, dtype=dtype)
    ref = gradcheck.fused_reference(hs, ws, ht, wt, y, steps, ["vcrd"])["vcrd"]
    base = gradcheck.fused_reference(hs, ws, ht, wt, y, steps, ["vcrd"], base=True)["vcrd"] if dtype != "fp32" else None
    checks = {}
    for side in ("before", "after"):
        grads = torch.load(grads_file(folder, shape, side), weights_only=True)
        checks[side] = gradcheck.check_fused(grads["grad_h"], grads["grad_W"], ref, gradcheck.TOL_BY_DTYPE[dtype], base)
        print(f"[grad check] {side:6s} {shape:22s} {gradcheck.cell(checks[side])}", flush=True)
    return checks


def export(ref: str, dest: str) -> None:
    """``vcrd/`` of git ref ``ref`` into ``dest``."""
    archive = subprocess.run(["git", "archive", ref, "vcrd"], cwd=ROOT, capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", dest], input=archive, check=True)


def machine_line(threads: int, torch_version: str, base: str) -> str:
    sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True,
                           text=True).stdout.strip()
    sys.path.append(str(ROOT))
    from benches.machine import cpu_name

    cpu = cpu_name()
    return (f"Machine: {cpu}, {threads} threads, torch {torch_version}; before = {base}, after = git "
            f"{sha.strip()}{' (dirty)' if dirty else ''}, {time.strftime('%Y-%m-%d %H:%M')}")


def orchestrate(args) -> None:
    for shape in args.shape:
        parse_shape(shape)
    with tempfile.TemporaryDirectory(prefix="vcrd-chunk-passes-") as before, \
            tempfile.TemporaryDirectory(prefix="vcrd-chunk-passes-grads-") as scratch:
        export(args.base, before)
        sides = {"before": before, "after": str(ROOT)}
        rows = {(shape, side): [] for shape in args.shape for side in sides}
        for rnd in range(args.rounds):
            for shape in args.shape:
                for side in (("before", "after") if rnd % 2 == 0 else ("after", "before")):
                    cmd = [sys.executable, __file__, "--worker", sides[side], "--shape", shape,
                           "--repeats", str(args.repeats), "--threads", str(args.threads),
                           "--grads", grads_file(scratch, shape, side)]
                    done = subprocess.run(cmd, capture_output=True, text=True)
                    if done.returncode != 0:
                        sys.exit(f"worker {side} {shape} failed:\n{done.stderr[-3000:]}")
                    row = json.loads(done.stdout.strip().splitlines()[-1])
                    rows[shape, side].append(row)
                    print(f"[round {rnd}] {side:6s} {shape:22s} stats {statistics.median(row['stats_s']):.3f} s  "
                          f"loss {statistics.median(row['loss_s']):.3f} s  "
                          f"load {row['load'][0]:.2f}-{row['load'][1]:.2f}",
                          flush=True)
        checks = {shape: check_gradients(shape, scratch) for shape in args.shape}
    first = rows[args.shape[0], "after"][0]
    print(machine_line(first["threads"], first["torch"], args.base))
    print("| shape (dtype:N,H,V) | stats before (s) | stats after (s) | after/before | fwd+bwd before (s) | "
          "fwd+bwd after (s) | after/before | load (1 min) |")
    print("|---|---|---|---|---|---|---|---|")
    for shape in args.shape:
        med = {(side, key): statistics.median(t for row in rows[shape, side] for t in row[key])
               for side in ("before", "after") for key in ("stats_s", "loss_s")}
        losses = [row["loss"] for side in ("before", "after") for row in rows[shape, side]]
        if max(losses) - min(losses) > 1e-5 * max(abs(v) for v in losses):
            sys.exit(f"{shape}: the loss values differ between before and after: {losses}")
        if any(check["grad_check"] != "pass" for check in checks[shape].values()):
            sys.exit(f"{shape}: a timed gradient fails its float64 check: {checks[shape]}")
        loads = [v for side in ("before", "after") for row in rows[shape, side] for v in row["load"]]
        print(f"| {shape} | {med['before', 'stats_s']:.3f} | {med['after', 'stats_s']:.3f} | "
              f"{med['after', 'stats_s'] / med['before', 'stats_s']:.2f} | {med['before', 'loss_s']:.3f} | "
              f"{med['after', 'loss_s']:.3f} | {med['after', 'loss_s'] / med['before', 'loss_s']:.2f} | "
              f"{min(loads):.1f}–{max(loads):.1f} |")


def main() -> None:
    p = argparse.ArgumentParser(description="Before/after timing of the CPU torch path's statistics (issue 27).")
    p.add_argument("--base", default="main", help="git ref of the 'before' code (default: main)")
    p.add_argument("--shape", nargs="+", default=list(SHAPES), help="dtype:N,H,V (default: %(default)s)")
    p.add_argument("--rounds", type=int, default=2, help="worker processes per side and shape")
    p.add_argument("--repeats", type=int, default=3, help="timed calls per worker, after one warm-up")
    p.add_argument("--threads", type=int, default=0, help="torch threads per worker (default 0: torch's own)")
    p.add_argument("--worker", metavar="TREE", help=argparse.SUPPRESS)
    p.add_argument("--grads", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.rounds < 1 or args.repeats < 1 or args.threads < 0:
        p.error(f"--rounds, --repeats >= 1 and --threads >= 0 expected, got {args.rounds}, {args.repeats}, "
                f"{args.threads}")
    if args.worker:
        worker(args.worker, args.shape[0], args.repeats, args.threads, args.grads)
    else:
        orchestrate(args)


if __name__ == "__main__":
    main()
