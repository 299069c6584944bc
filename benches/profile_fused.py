"""Where the fused-linear loss spends its time: one fwd+bwd under torch's profiler, grouped by operator.

    python benches/profile_fused.py --shape qwen2.5-0.5b --dtype bf16 --preset vcrd
    python benches/profile_fused.py --N 512 --H 64 --V 4099 --dtype fp32 --top 15

Same inputs as ``benches/compare.py`` (its ``make_inputs``); one warm-up call (``torch.compile``), then one
profiled call. Prints the wall time of the profiled call, the operators' self CPU time (top ``--top``) and
each one's share of the summed self time, so "where does the time go" has a number; then the profiled
call's gradients against the float64 reference (``benches/gradcheck.py``; bf16: the three-way rule), exit 1
if they fail. The profiler adds a little overhead of its own; use ``compare.py`` for times to quote.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # benches.* when run as a script

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from benches import gradcheck  # noqa: E402
from benches.compare import DTYPES, SHAPES, make_inputs  # noqa: E402
from vcrd import VCRDConfig, fused_linear_vcrd_loss  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", choices=list(SHAPES), help="a named model head (N, H, V)")
    p.add_argument("--N", type=int)
    p.add_argument("--H", type=int)
    p.add_argument("--V", type=int)
    p.add_argument("--dtype", choices=DTYPES, default="bf16")
    p.add_argument("--preset", choices=("kd", "discord", "vcrd"), default="vcrd")
    p.add_argument("--top", type=int, default=12, help="operators to list (default 12)")
    args = p.parse_args(argv)
    if args.shape:
        N, H, V = SHAPES[args.shape]
    elif args.N and args.H and args.V and min(args.N, args.H, args.V) >= 1:
        N, H, V = args.N, args.H, args.V
    else:
        p.error("--shape, or --N --H --V (each >= 1)")
    hs, ws, ht, wt, y, steps = make_inputs(N, H, V, dtype=args.dtype)
    cfg = VCRDConfig.preset(args.preset)

    def call() -> None:
        hs.grad = ws.grad = None
        fused_linear_vcrd_loss(hs, ws, ht, wt, y, step_ids=steps, config=cfg, impl="torch").backward()

    call()  # warm-up: torch.compile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        call()
        wall = time.perf_counter() - t0
    events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    total = sum(e.self_cpu_time_total for e in events)
    print(f"N={N} H={H} V={V} {args.dtype} preset {args.preset}: profiled fwd+bwd {wall:.3f} s wall, "
          f"{total / 1e6:.3f} s summed self CPU time, {torch.get_num_threads()} threads, torch {torch.__version__}")
    for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:args.top]:
        print(f"  {e.self_cpu_time_total / 1e6:8.3f} s  {100 * e.self_cpu_time_total / total:5.1f} %  "
              f"{e.count:5d} calls  {e.key}")
    # the profiled call's gradients against float64 (bf16: the three-way rule against PyTorch in bf16)
    ref = gradcheck.fused_reference(hs, ws, ht, wt, y, steps, [args.preset])[args.preset]
    base = None if args.dtype == "fp32" else \
        gradcheck.fused_reference(hs, ws, ht, wt, y, steps, [args.preset], base=True)[args.preset]
    check = gradcheck.check_fused(hs.grad, ws.grad, ref, gradcheck.TOL_BY_DTYPE[args.dtype], base)
    print(f"grad check of the profiled call: {gradcheck.cell(check)}")
    return 0 if check["grad_check"] == "pass" else 1


if __name__ == "__main__":
    sys.exit(main())
