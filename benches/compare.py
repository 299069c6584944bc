"""Fused-linear distillation losses side by side, one process per provider (CPU, fp32, fwd+bwd).

    python benches/compare.py                      # all providers and shapes → JSON, markdown, PNG
    python benches/compare.py --quick              # smaller shapes, for a smoke run

Providers: the four GEMMs alone (student logits, teacher logits, grad of the student hidden and
of the student weight: the floor any fused loss pays), naive full-logits autograd (forward KL),
TRL's ``generalized_jsd_loss`` (beta=0) on full logits, Liger's ``LigerFusedLinearJSDLoss``
(compiled, forward KL only: weight_hard_loss=0, weight_soft_loss=1, beta=0), and vcrd's
``fused_linear_vcrd_loss`` with presets ``kd`` and ``vcrd``. Each (provider, shape) runs in a fresh
process so peak RSS is its own; the median of ``--repeats`` timed runs follows one warm-up run.
Results go to ``benches/results/compare.json`` and the section of docs/benchmarks.md between
``<!-- compare:begin -->`` and ``<!-- compare:end -->``, with ``docs/compare.png``.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROVIDERS = ["gemm-floor", "naive-fkl", "trl-gjsd-beta0", "liger-fused-jsd", "vcrd-kd", "vcrd-vcrd"]


def make_inputs(N: int, H: int, V: int, seed: int = 0):
    """Student/teacher hidden states and heads giving std ~10 correlated logits; 10 % rows ignored."""
    import torch

    g = torch.Generator().manual_seed(seed)
    hs = torch.randn(N, H, generator=g)
    ws = torch.randn(V, H, generator=g) * (10 / H ** 0.5)
    ht = hs + 0.5 * torch.randn(N, H, generator=g)
    wt = ws + torch.randn(V, H, generator=g) * (5 / H ** 0.5)
    y = torch.cat([(ht[i:i + 256] @ wt.T).argmax(-1) for i in range(0, N, 256)])  # the teacher's trace
    y[torch.rand(N, generator=g) < 0.1] = -100
    return hs.requires_grad_(), ws.requires_grad_(), ht, wt, y, torch.arange(N) // 30


def provider_fn(name: str):
    import torch

    if name == "gemm-floor":
        def run(hs, ws, ht, wt, y, steps):
            with torch.no_grad():
                s, _ = hs @ ws.T, ht @ wt.T
                s.sub_(s.mean())  # stand-in gradient of the logits, same shape
                hs.grad, ws.grad = s @ ws, s.T @ hs
    elif name in ("naive-fkl", "trl-gjsd-beta0"):
        def run(hs, ws, ht, wt, y, steps):
            s = hs @ ws.T
            with torch.no_grad():
                u = ht @ wt.T
            if name == "naive-fkl":
                logp, logq = torch.log_softmax(s, -1), torch.log_softmax(u, -1)
                mask = y != -100
                loss = ((logq.exp() * (logq - logp)).sum(-1) * mask).sum() / mask.sum()
            else:
                from trl.experimental.gkd.gkd_trainer import GKDTrainer

                loss = GKDTrainer.generalized_jsd_loss(s[None], u[None], labels=y[None], beta=0.0)
            loss.backward()
    elif name == "liger-fused-jsd":
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

        loss_fn = LigerFusedLinearJSDLoss(weight_hard_loss=0.0, weight_soft_loss=1.0, beta=0.0, compiled=True)

        def run(hs, ws, ht, wt, y, steps):
            loss_fn(hs, ws, ht, wt, y).backward()
    elif name.startswith("vcrd-"):
        from vcrd import fused_linear_vcrd_loss

        preset = name.split("-", 1)[1]

        def run(hs, ws, ht, wt, y, steps):
            fused_linear_vcrd_loss(hs, ws, ht, wt, y, step_ids=steps, config=preset, impl="torch").backward()
    else:
        raise ValueError(f"--provider: expected one of {PROVIDERS}, got {name!r}")
    return run


def worker(args) -> None:
    """One provider, one shape, this process: print one JSON line."""
    import torch

    sys.path.insert(0, str(ROOT))
    from benches.memory import peak_rss_delta

    inputs = make_inputs(args.N, args.H, args.V)
    run = provider_fn(args.provider)

    def once():
        inputs[0].grad = inputs[1].grad = None
        run(*inputs)

    once()  # warm-up (torch.compile for liger and vcrd)
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        once()
        times.append(time.perf_counter() - t0)
    delta, _ = peak_rss_delta(once)
    print(json.dumps(dict(provider=args.provider, N=args.N, H=args.H, V=args.V, median_s=statistics.median(times),
                          times_s=times, peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                          op_delta_bytes=delta, threads=torch.get_num_threads(), torch=torch.__version__)))


def machine_line(rows) -> str:
    sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True,
                           text=True).stdout.strip()
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else "?"
    r = rows[0]
    return (f"Machine: {cpu}, {r['threads']} threads, Python {platform.python_version()}, torch {r['torch']}, "
            f"git {sha.strip()}{' (dirty)' if dirty else ''}, {time.strftime('%Y-%m-%d')}")


def table(rows) -> str:
    out = ["| N | H | V | provider | median fwd+bwd (s) | time / GEMM floor | peak RSS (GiB) "
           "| op-only peak delta (GiB) |",
           "|---|---|---|---|---|---|---|---|"]
    shapes = sorted({(r["N"], r["H"], r["V"]) for r in rows}, key=lambda k: (k[2], k[0]))
    for N, H, V in shapes:
        group = [r for r in rows if (r["N"], r["H"], r["V"]) == (N, H, V)]
        floor = next((r["median_s"] for r in group if r["provider"] == "gemm-floor"), None)
        for r in sorted(group, key=lambda r: r["median_s"]):
            ratio = f"{r['median_s'] / floor:.2f}" if floor else "–"
            out.append(f"| {N} | {H} | {V} | {r['provider']} | {r['median_s']:.3f} | {ratio} | "
                       f"{r['peak_rss_bytes'] / 2**30:.2f} | {r['op_delta_bytes'] / 2**30:.2f} |")
    return "\n".join(out)


def plot(rows, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    sweep = [r for r in rows if r["V"] != max(x["V"] for x in rows)] or rows
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for provider in PROVIDERS:
        pts = sorted((r["N"], r["median_s"], r["peak_rss_bytes"] / 2**30) for r in sweep if r["provider"] == provider)
        if pts:
            axes[0].plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=provider)
            axes[1].plot([p[0] for p in pts], [p[2] for p in pts], marker="o", label=provider)
    V = sweep[0]["V"]
    Ns = sorted({r["N"] for r in sweep})
    axes[0].set(xscale="log", yscale="log", xlabel="tokens N", ylabel="median fwd+bwd (s)", title=f"time, V={V}")
    axes[1].set(xscale="log", xlabel="tokens N", ylabel="peak RSS (GiB)", title=f"memory, V={V}")
    for ax in axes:
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.set_xticks(Ns, [str(n) for n in Ns])
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def write_report(data: dict) -> None:
    """The docs/benchmarks.md section and docs/compare.png from ``{"machine": ..., "rows": [...]}``."""
    rows = data["rows"]
    md = ROOT / "docs" / "benchmarks.md"
    png = md.with_name("compare.png")
    section = "\n".join(["<!-- compare:begin -->", data["machine"], "", table(rows), "",
                         "![time and memory over tokens](compare.png)" if plot(rows, png) else "(no plot)",
                         "<!-- compare:end -->"])
    text = md.read_text()
    if "<!-- compare:begin -->" not in text:
        text += "\n<!-- compare:begin -->\n<!-- compare:end -->\n"
    md.write_text(re.sub(r"<!-- compare:begin -->.*<!-- compare:end -->", lambda _: section, text, flags=re.S))
    print(f"wrote {md} and {png}")


def orchestrate(args) -> None:
    shapes = [(256, 256, 8000), (1024, 256, 8000)] if args.quick else \
        [(1024, 512, 151936), (256, 512, 32000), (1024, 512, 32000), (4096, 512, 32000)]
    rows = []
    machine = None
    for N, H, V in shapes:
        for provider in args.providers:
            cmd = [sys.executable, __file__, "--worker", "--provider", provider, "--N", str(N), "--H", str(H),
                   "--V", str(V), "--repeats", str(args.repeats)]
            print(f"[compare] {provider:16s} N={N} H={H} V={V} ...", end=" ", flush=True)
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:
                print("FAILED")
                print(done.stderr[-2000:], file=sys.stderr)
                continue
            row = json.loads(done.stdout.strip().splitlines()[-1])
            rows.append(row)
            machine = machine or machine_line(rows)  # the checkout as the run starts
            print(f"{row['median_s']:.3f} s, peak RSS {row['peak_rss_bytes'] / 2**30:.2f} GiB")
    out = ROOT / "benches" / "results" / ("compare-quick.json" if args.quick else "compare.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": machine, "rows": rows}, indent=1))
    print(f"wrote {out}")
    if args.quick:
        print(table(rows))
    else:
        write_report({"machine": machine, "rows": rows})


def main() -> None:
    p = argparse.ArgumentParser(description="Fused-linear distillation losses side by side (CPU).")
    p.add_argument("--providers", nargs="+", default=PROVIDERS, choices=PROVIDERS)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="small shapes, print the table only")
    p.add_argument("--report", metavar="JSON", help="only rewrite the docs section and plot from a results file")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--provider", help=argparse.SUPPRESS)
    p.add_argument("--N", type=int)
    p.add_argument("--H", type=int)
    p.add_argument("--V", type=int)
    args = p.parse_args()
    if args.worker:
        worker(args)
    elif args.report:
        write_report(json.loads(Path(args.report).read_text()))
    else:
        orchestrate(args)


if __name__ == "__main__":
    main()
