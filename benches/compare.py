"""Fused-linear distillation losses side by side, one process per provider (CPU, fwd+bwd).

    python benches/compare.py                      # all providers and shapes → JSON, markdown, PNG
    python benches/compare.py --quick              # smaller shapes, for a smoke run
    python benches/compare.py --shape smollm2 qwen2.5-0.5b --dtype bf16   # the named model heads
    python benches/compare.py --N 256 --H 128 --V 8192 --dtype bf16      # one shape
    python benches/compare.py --self-test          # only the gradient checker's self-test

Providers: the GEMM floor, naive full-logits autograd (forward KL), TRL's ``generalized_jsd_loss``
(beta=0) on full logits, TRL 1.16's fused ``_chunked_divergence_loss`` (beta=0: forward KL; on CPU
TRL projects every row, ignored ones included: its Triton path alone drops them), Liger's
``LigerFusedLinearJSDLoss`` (compiled, forward KL only: weight_hard_loss=0, weight_soft_loss=1,
beta=0), and vcrd's ``fused_linear_vcrd_loss`` with presets ``kd`` and ``vcrd`` (default
``gemm_precision``: bf16 GEMMs for bf16 heads) and ``vcrd-vcrd-exact`` (preset ``vcrd``,
``gemm_precision="exact"``: fp32 GEMMs whatever the heads' dtype).

The GEMM floor (DESIGN.md) is the four GEMMs alone — student logits, teacher logits, grad of the
student hidden states, grad of the student head — in the input dtype (bf16 GEMMs for bf16 inputs),
on the non-ignored rows only (about 90 % of N here: the rows vcrd computes, since vcrd drops ignored
rows before any GEMM; a floor over all N rows would flatter vcrd by the ignored fraction), each
written with ``torch.mm(..., out=)`` into a buffer allocated once, outside the timing, as are the
gathered rows. The student logits buffer stands in for their gradient. Nothing else is timed: no
allocation (fresh ``[N, V]`` outputs page-fault), no elementwise pass, no random numbers. Each
(provider, shape) runs in a fresh process so peak RSS is its own; the median of ``--repeats`` timed
runs follows one warm-up run.

Gradient check (every provider but the floor): after its timing, each worker compares the
gradients of its last timed call, w.r.t. the student hidden states and the student LM head, with
the float64 reference of the preset it computes (``kd``, i.e. forward KL averaged over the
non-ignored rows, for naive, TRL and Liger). The reference (``benches/gradcheck.py``:
``vcrd.core.reference`` on float64 logits chunk by chunk, each chunk widened back to the start of its
rows' causal windows, chained through ``logits = hidden @ Wᵀ``) covers every row, so both
gradients are checked in full; it is computed once per shape in its own process before the
providers run, and is not part of any timing or memory figure. A result is ``pass`` when
``max |error| / max |reference| <= 1e-4`` for both gradients. The checker's self-test runs first.

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
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # benches.* when run as a script
PROVIDERS = ["gemm-floor", "naive-fkl", "trl-gjsd-beta0", "trl-chunked-div", "liger-fused-jsd", "vcrd-kd",
             "vcrd-vcrd", "vcrd-vcrd-exact"]
# the vcrd preset each loss computes: its float64 reference is what the timed gradients are checked against
REFERENCE_PRESET = {"naive-fkl": "kd", "trl-gjsd-beta0": "kd", "trl-chunked-div": "kd", "liger-fused-jsd": "kd",
                    "vcrd-kd": "kd", "vcrd-vcrd": "vcrd", "vcrd-vcrd-exact": "vcrd"}
# model heads (N, H, V) by name: SmolLM2's and Qwen2.5-0.5B's, at the token counts of issue 27
SHAPES = {"smollm2": (2048, 576, 49152), "qwen2.5-0.5b": (1024, 896, 151936)}
DTYPES = ("fp32", "bf16")


def make_inputs(N: int, H: int, V: int, seed: int = 0, dtype: str = "fp32"):
    """Student/teacher hidden states and heads giving std ~10 correlated logits; 10 % rows ignored.

    Returns ``hs [N, H]``, ``ws [V, H]`` (both requiring grad), ``ht``, ``wt``, labels ``y [N]``,
    step ids ``[N]``; the floats in ``dtype`` (``"fp32"`` or ``"bf16"``, drawn in fp32 then rounded)."""
    import torch

    if dtype not in DTYPES:
        raise ValueError(f"dtype: expected one of {DTYPES}, got {dtype!r}")
    g = torch.Generator().manual_seed(seed)
    hs = torch.randn(N, H, generator=g)
    ws = torch.randn(V, H, generator=g) * (10 / H ** 0.5)
    ht = hs + 0.5 * torch.randn(N, H, generator=g)
    wt = ws + torch.randn(V, H, generator=g) * (5 / H ** 0.5)
    y = torch.cat([(ht[i:i + 256] @ wt.T).argmax(-1) for i in range(0, N, 256)])  # the teacher's trace
    y[torch.rand(N, generator=g) < 0.1] = -100
    hs, ws, ht, wt = (x.to(torch.bfloat16 if dtype == "bf16" else torch.float32) for x in (hs, ws, ht, wt))
    return hs.requires_grad_(), ws.requires_grad_(), ht, wt, y, torch.arange(N) // 30


class GemmFloor:
    """The floor's ``run``: the four GEMMs of the kept rows into buffers made here, once (module docstring).

    ``S [n, V]`` student logits (then the stand-in for their gradient), ``U [n, V]`` teacher logits,
    ``grad_h [n, H]``, ``grad_w [V, H]``; ``n`` the non-ignored rows; all in the inputs' dtype."""

    def __init__(self, hs, ws, ht, wt, y, steps) -> None:
        import torch

        kept = (y != -100).nonzero().squeeze(1)  # the rows vcrd computes
        self.h, self.ht = hs.detach().index_select(0, kept), ht.index_select(0, kept)
        self.w, self.wt = ws.detach(), wt.detach()
        self.S = torch.empty(kept.numel(), self.w.shape[0], dtype=self.h.dtype)
        self.U = torch.empty(kept.numel(), self.wt.shape[0], dtype=self.ht.dtype)
        self.grad_h, self.grad_w = torch.empty_like(self.h), torch.empty_like(self.w)

    def __call__(self, *_) -> None:
        import torch

        torch.mm(self.h, self.w.T, out=self.S)
        torch.mm(self.ht, self.wt.T, out=self.U)
        torch.mm(self.S, self.w, out=self.grad_h)
        torch.mm(self.S.T, self.h, out=self.grad_w)


def provider_fn(name: str, inputs):
    """``run(hs, ws, ht, wt, y, steps)``: one fwd+bwd of provider ``name`` (set-up on ``inputs`` done here)."""
    import torch

    if name == "gemm-floor":
        run = GemmFloor(*inputs)
    elif name == "trl-chunked-div":
        from trl.trainer.distillation_trainer import _chunked_divergence_loss

        def run(hs, ws, ht, wt, y, steps):  # mean over the valid rows (num_items_in_batch=None): kd
            loss, _, _ = _chunked_divergence_loss(hs[None], ht[None], ws, wt, (y != -100)[None], beta=0.0)
            loss.backward()
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
        from vcrd import VCRDConfig, fused_linear_vcrd_loss

        _, preset, *precision = name.split("-")  # vcrd-<preset>[-<gemm_precision>]
        cfg = VCRDConfig.preset(preset, gemm_precision=precision[0] if precision else "auto")

        def run(hs, ws, ht, wt, y, steps):
            fused_linear_vcrd_loss(hs, ws, ht, wt, y, step_ids=steps, config=cfg, impl="torch").backward()
    else:
        raise ValueError(f"--provider: expected one of {PROVIDERS}, got {name!r}")
    return run


def worker(args) -> None:
    """One provider, one shape, this process: print one JSON line."""
    import torch

    from benches.memory import peak_rss_delta

    inputs = make_inputs(args.N, args.H, args.V, dtype=args.dtype)
    run = provider_fn(args.provider, inputs)

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
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # before the check's fp64 buffers
    row = dict(provider=args.provider, N=args.N, H=args.H, V=args.V, dtype=args.dtype,
               n_kept=int((inputs[4] != -100).sum()),
               median_s=statistics.median(times), times_s=times, peak_rss_bytes=peak, op_delta_bytes=delta,
               threads=torch.get_num_threads(), torch=torch.__version__)
    if args.provider == "gemm-floor":
        row["floor"] = "gemms-into-buffers"  # the honest floor; rows without this key are the old one
    if args.provider in REFERENCE_PRESET:
        row.update(check_gradients(args, inputs))
    print(json.dumps(row))


def check_gradients(args, inputs) -> dict:
    """The last timed call's gradients against the float64 reference (from ``--ref``, or computed here)."""
    import torch

    from benches import gradcheck

    hs, ws, ht, wt, y, steps = inputs
    preset = REFERENCE_PRESET[args.provider]
    t0 = time.perf_counter()
    if args.ref:
        ref = torch.load(args.ref, weights_only=True)
        if not (torch.equal(ref["labels"], y) and torch.equal(ref["step_ids"], steps)):
            return dict(grad_check="FAIL", grad_rel_err=float("inf"), grad_reference=preset,
                        grad_note="the reference was computed on other inputs")
    else:
        ref = gradcheck.fused_reference(hs, ws, ht, wt, y, steps, [preset])[preset]
        if args.dtype != "fp32":
            base = gradcheck.fused_reference(hs, ws, ht, wt, y, steps, [preset], base=True)[preset]
            ref.update(base_h=base["grad_h"], base_W=base["grad_W"])
    base = dict(grad_h=ref["base_h"], grad_W=ref["base_W"]) if args.dtype != "fp32" else None
    out = gradcheck.check_fused(hs.grad, ws.grad, ref, tol=gradcheck.TOL_BY_DTYPE[args.dtype], base=base)
    out.update(grad_reference=preset, grad_check_s=time.perf_counter() - t0)
    return out


def reference_worker(args) -> None:
    """The float64 reference gradients of one shape, for each preset: one file per preset in ``--out``."""
    import torch

    from benches import gradcheck

    hs, ws, ht, wt, y, steps = make_inputs(args.N, args.H, args.V, dtype=args.dtype)
    t0 = time.perf_counter()
    refs = gradcheck.fused_reference(hs, ws, ht, wt, y, steps, args.presets)  # of the rounded inputs
    # bf16: PyTorch itself in bf16 on the same inputs, the base of the three-way rule
    bases = gradcheck.fused_reference(hs, ws, ht, wt, y, steps, args.presets, base=True) if args.dtype != "fp32" else {}
    files = {}
    for preset, ref in refs.items():
        files[preset] = str(Path(args.out) / f"ref-{preset}-{args.N}-{args.H}-{args.V}-{args.dtype}.pt")
        base = {f"base_{k[5:]}": bases[preset][k] for k in ("grad_h", "grad_W")} if bases else {}
        torch.save(dict(grad_h=ref["grad_h"], grad_W=ref["grad_W"], Z=ref["Z"], labels=y, step_ids=steps, **base),
                   files[preset])
    print(json.dumps(dict(files=files, seconds=time.perf_counter() - t0)))


def machine_line(rows) -> str:
    sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True,
                           text=True).stdout.strip()
    from benches.machine import cpu_name

    cpu = cpu_name()
    r = rows[0]
    return (f"Machine: {cpu}, {r['threads']} threads, Python {platform.python_version()}, torch {r['torch']}, "
            f"git {sha.strip()}{' (dirty)' if dirty else ''}, {time.strftime('%Y-%m-%d')}")


def table(rows) -> str:
    out = ["| N | H | V | dtype | provider | median fwd+bwd (s) | time / GEMM floor | peak RSS (GiB) "
           "| op-only peak delta (GiB) | grad check (max rel err: hidden, weight) |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    key = lambda r: (r["N"], r["H"], r["V"], r.get("dtype", "fp32"))  # noqa: E731  (fp32: results before dtypes)
    for N, H, V, dtype in sorted({key(r) for r in rows}, key=lambda k: (k[3], k[2], k[0])):
        group = [r for r in rows if key(r) == (N, H, V, dtype)]
        floor = next((r["median_s"] for r in group if r["provider"] == "gemm-floor"), None)
        for r in sorted(group, key=lambda r: r["median_s"]):
            ratio = f"{r['median_s'] / floor:.2f}" if floor else "–"
            check = "– (not a loss)" if r["provider"] == "gemm-floor" else gradcheck_cell(r)
            out.append(f"| {N} | {H} | {V} | {dtype} | {r['provider']} | {r['median_s']:.3f} | {ratio} | "
                       f"{r['peak_rss_bytes'] / 2**30:.2f} | {r['op_delta_bytes'] / 2**30:.2f} | {check} |")
    return "\n".join(out)


def gradcheck_cell(row) -> str:
    from benches.gradcheck import cell  # imports torch: here, not at the orchestrator's start

    return cell(row)


def notes(rows) -> str:
    """What the floor and the grad-check column mean, under the machine line."""
    kept = ", ".join(sorted({f"{r['n_kept']} of {r['N']}" for r in rows if "n_kept" in r},
                            key=lambda s: int(s.split()[-1])))
    from benches.gradcheck import TOL, TOL_BY_DTYPE

    checked = [r for r in rows if "grad_check" in r]
    failed = [r for r in checked if r["grad_check"] != "pass"]
    gemms = "the four GEMMs (student and teacher logits, grad of the student hidden states and of the student weight)"
    honest = all(r.get("floor") == "gemms-into-buffers" for r in rows if r["provider"] == "gemm-floor")
    how = ("in the input dtype, each written into a buffer allocated once outside the timing (no allocation, no "
           "elementwise pass)" if honest else "with fresh [N, V] outputs and an extra elementwise pass (results "
           "recorded before the floor became the GEMMs alone into preallocated buffers: this floor is slower than "
           "the GEMMs and flatters every ratio to it)")
    lines = [f"gemm-floor: {gemms} on the non-ignored rows only ({kept} rows), the rows vcrd computes: vcrd "
             f"drops ignored rows before any GEMM, so the floor does too; {how}." if kept else
             f"gemm-floor: {gemms} on all N rows (results recorded before the floor was restricted to the "
             f"non-ignored rows, which vcrd computes: this floor flatters vcrd by the ~10 % ignored rows)."]
    if checked:
        lines.append("grad check: the gradients of each provider's last timed call, w.r.t. the student hidden "
                     "states (h) and LM head (W), against the float64 reference (`vcrd.core.reference`, every row, "
                     "chained through the logits GEMM) of the preset it computes (`kd`, i.e. forward KL over the "
                     f"non-ignored rows, for naive, TRL and Liger); fp32: max |error| / max |reference| ≤ {TOL:.0e}; "
                     + ("bf16: the three-way rule of DESIGN.md, max |error| ≤ 2 · max |error of PyTorch itself in "
                        f"bf16| + {TOL_BY_DTYPE['bf16']:.0e} · max |reference| for each gradient (PyTorch in bf16: "
                        "both logits GEMMs in bf16, the formulas in fp32 on them, bf16 backward GEMMs; its errors "
                        "are in the cell) " if any(r.get("grad_rule") == "three-way" for r in checked) else "")
                     + ("older bf16 rows: ≤ 1e-01 relative " if any(r.get("dtype") == "bf16" and "grad_rule" not in r
                                                                    for r in checked) else "")
                     + "(benches/gradcheck.py). "
                     + ("All pass." if not failed else
                        f"{len(failed)} FAILED: " + ", ".join(f"{r['provider']} N={r['N']} V={r['V']}"
                                                              for r in failed) + "."))
    else:
        lines.append("grad check: not recorded in these results.")
    return "\n\n".join(lines)


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
    section = "\n".join(["<!-- compare:begin -->", data["machine"], "", notes(rows), "", table(rows), "",
                         "![time and memory over tokens](compare.png)" if plot(rows, png) else "(no plot)",
                         "<!-- compare:end -->"])
    text = md.read_text()
    if "<!-- compare:begin -->" not in text:
        text += "\n<!-- compare:begin -->\n<!-- compare:end -->\n"
    md.write_text(re.sub(r"<!-- compare:begin -->.*<!-- compare:end -->", lambda _: section, text, flags=re.S))
    print(f"wrote {md} and {png}")


def self_test() -> None:
    print("[compare] gradient checker self-test ...", flush=True)
    done = subprocess.run([sys.executable, str(ROOT / "benches" / "gradcheck.py")], capture_output=True, text=True)
    print(done.stdout, end="")
    if done.returncode != 0:
        print(done.stderr[-3000:], file=sys.stderr)
        sys.exit("[compare] the gradient checker's self-test failed: no numbers recorded")


def orchestrate(args) -> None:
    shapes = [(256, 256, 8000, "fp32"), (1024, 256, 8000, "fp32")] if args.quick else \
        [(1024, 512, 151936, "fp32"), (256, 512, 32000, "fp32"), (1024, 512, 32000, "fp32"),
         (4096, 512, 32000, "fp32")] + [(*SHAPES[name], "bf16") for name in SHAPES]
    if args.shape:  # named model heads
        shapes = [(*SHAPES[name], dtype) for name in args.shape for dtype in args.dtype or ["bf16"]]
    if args.N and args.H and args.V:  # one shape: --N --H --V
        shapes = [(args.N, args.H, args.V, dtype) for dtype in args.dtype or ["fp32"]]
    self_test()
    rows = []
    machine = None
    presets = sorted({REFERENCE_PRESET[p] for p in args.providers if p in REFERENCE_PRESET})
    for N, H, V, dtype in shapes:
        with tempfile.TemporaryDirectory(prefix="vcrd-compare-ref-") as tmp:
            refs = {}
            if presets:
                print(f"[compare] {'fp64 reference':16s} N={N} H={H} V={V} {dtype} ({', '.join(presets)}) ...",
                      end=" ", flush=True)
                cmd = [sys.executable, __file__, "--reference", "--presets", *presets, "--out", tmp, "--N", str(N),
                       "--H", str(H), "--V", str(V), "--dtype", dtype]
                done = subprocess.run(cmd, capture_output=True, text=True)
                if done.returncode != 0:
                    print("FAILED (each provider computes its own reference)")
                    print(done.stderr[-2000:], file=sys.stderr)
                else:
                    info = json.loads(done.stdout.strip().splitlines()[-1])
                    refs = info["files"]
                    print(f"{info['seconds']:.1f} s")
            for provider in args.providers:
                cmd = [sys.executable, __file__, "--worker", "--provider", provider, "--N", str(N), "--H", str(H),
                       "--V", str(V), "--dtype", dtype, "--repeats", str(args.repeats)]
                if provider in REFERENCE_PRESET and REFERENCE_PRESET[provider] in refs:
                    cmd += ["--ref", refs[REFERENCE_PRESET[provider]]]
                print(f"[compare] {provider:16s} N={N} H={H} V={V} {dtype} ...", end=" ", flush=True)
                done = subprocess.run(cmd, capture_output=True, text=True)
                if done.returncode != 0:
                    print("FAILED")
                    print(done.stderr[-2000:], file=sys.stderr)
                    continue
                row = json.loads(done.stdout.strip().splitlines()[-1])
                rows.append(row)
                machine = machine or machine_line(rows)  # the checkout as the run starts
                check = f", grad check {gradcheck_cell(row)}" if "grad_check" in row else ""
                print(f"{row['median_s']:.3f} s, peak RSS {row['peak_rss_bytes'] / 2**30:.2f} GiB{check}")
    out = ROOT / "benches" / "results" / ("compare-quick.json" if args.quick else "compare.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": machine, "rows": rows}, indent=1))
    print(f"wrote {out}")
    if args.quick:
        print(machine, notes(rows), table(rows), sep="\n\n")
    else:
        write_report({"machine": machine, "rows": rows})


def main() -> None:
    p = argparse.ArgumentParser(description="Fused-linear distillation losses side by side (CPU).")
    p.add_argument("--providers", nargs="+", default=PROVIDERS, choices=PROVIDERS)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="small shapes, print the table only")
    p.add_argument("--report", metavar="JSON", help="only rewrite the docs section and plot from a results file")
    p.add_argument("--self-test", action="store_true", help="only run the gradient checker's self-test")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--provider", help=argparse.SUPPRESS)
    p.add_argument("--ref", help=argparse.SUPPRESS)
    p.add_argument("--reference", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--presets", nargs="+", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--shape", nargs="+", choices=list(SHAPES),
                   help="named model heads (N, H, V): " + ", ".join(f"{k} {v}" for k, v in SHAPES.items())
                        + " (default dtype bf16)")
    p.add_argument("--dtype", nargs="+", choices=DTYPES,
                   help="input dtype(s) of --shape / --N --H --V runs (the GEMMs run in it)")
    p.add_argument("--N", type=int)
    p.add_argument("--H", type=int)
    p.add_argument("--V", type=int)
    args = p.parse_args()
    if args.worker or args.reference:
        args.dtype = (args.dtype or ["fp32"])[0]
    elif any(x is not None for x in (args.N, args.H, args.V)) and not (args.N and args.H and args.V):
        p.error("--N, --H and --V go together, each >= 1")
    elif args.shape and args.N:
        p.error("--shape and --N/--H/--V: one or the other")
    if args.worker:
        worker(args)
    elif args.reference:
        reference_worker(args)
    elif args.self_test:
        self_test()
    elif args.report:
        write_report(json.loads(Path(args.report).read_text()))
    else:
        orchestrate(args)


if __name__ == "__main__":
    main()
