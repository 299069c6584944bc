"""The logits-level path across a sweep of configurations, in one process: no cliff (issue 27, item 6).

    python benches/config_sweep.py                    # N=1024, V=151936, fp32, every configuration
    python benches/config_sweep.py --N 512 --V 32003  # smaller
    python benches/config_sweep.py --json benches/results/config_sweep.json
    python benches/config_sweep.py --only vcrd kd --alone    # the preset and kd, not interleaved

One process, in this order: naive PyTorch forward KL (two full log-softmaxes, autograd: the ``naive-fkl``
of ``benches/bench_logits.py``), the ``vcrd`` preset (``impl="torch"``, the compiled CPU path), then every
configuration of the sweep (temperatures, divergences and betas, the CE term, token normalisation,
validity modes, windows, SPEC §1 scale and soft-cap, the presets), then the ``vcrd`` preset again. A
configuration that exhausted dynamo's recompile limit would fall back to eager and show here as a cliff:
the last line of the table is the check that the preset is still as fast after the sweep. Each entry is
the median of ``--repeats`` fwd+bwd calls after one warm-up call (which compiles); the gradient of its last
timed call is checked against the float64 reference of its configuration (``benches/gradcheck.py``: rows
0-95 and N-96..N-1, exact because the windows are causal, over the whole batch's ``Z``), ≤ 1e-4 relative.
Inputs: ``benches.providers.make_inputs`` (std-10 correlated logits, 10 % ignored rows, 30-token steps).
Timings are wall time on a shared machine: the load average is printed with each row.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # benches.* when run as a script

from benches import gradcheck  # noqa: E402
from benches.machine import cpu_name  # noqa: E402
from benches.providers import make_inputs, naive_fkl  # noqa: E402
from vcrd import VCRDConfig, vcrd_loss  # noqa: E402

VCRD = VCRDConfig.preset("vcrd")


def sweep() -> List[Tuple[str, VCRDConfig]]:
    """The configurations, named by what differs from the ``vcrd`` preset (or a preset's name)."""
    named = [("kd", VCRDConfig.preset("kd")), ("discord", VCRDConfig.preset("discord"))]
    changes = [dict(temperature=2.0), dict(temperature=0.7), dict(divergence="rkl"),
               dict(divergence="jsd", beta=0.1), dict(divergence="jsd", beta=0.5), dict(divergence="jsd", beta=0.9),
               dict(ce_weight=0.5), dict(ce_weight=0.5, temperature=2.0), dict(normalize="tokens"),
               dict(validity="expected"), dict(validity=None), dict(window_steps=1), dict(window_steps=None),
               dict(correction=False), dict(student_logit_scale=0.125), dict(teacher_softcap=30.0),
               dict(student_softcap=30.0, teacher_softcap=30.0)]
    for change in changes:
        named.append((", ".join(f"{k}={v}" for k, v in change.items()), replace(VCRD, **change)))
    return named


def interleaved(fns: List[Callable[[], None]], repeats: int) -> List[float]:
    """Median wall seconds of each of ``fns``, called in turn ``repeats`` times after one warm-up call each
    (interleaved, so a load that changes during the run weighs on every one alike)."""
    for fn in fns:
        fn()
    times: List[List[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, t in zip(fns, times):
            t0 = time.perf_counter()
            fn()
            t.append(time.perf_counter() - t0)
    return [statistics.median(t) for t in times]


def fwd_bwd(loss: Callable[[torch.Tensor], torch.Tensor], s: torch.Tensor) -> Tuple[torch.Tensor, Callable[[], None]]:
    """A leaf copy of ``s`` and one fwd+bwd of ``loss`` on it (its gradient left in the leaf)."""
    x = s.clone().requires_grad_()

    def call() -> None:
        x.grad = None
        loss(x).backward()

    return x, call


def run(N: int, V: int, repeats: int, log: Callable[[str], None], only: Optional[List[str]] = None,
        alone: bool = False) -> Dict:
    """Every row of the sweep, in order (the preset, the configurations, the preset again), each timed
    interleaved with the naive loss (``alone``: the naive loss timed once first, then each configuration on its
    own); ``only``: just the named configurations. The naive loss's own gradient is checked once."""
    s, u, y, steps = make_inputs(N, V)
    z_cache: Dict = {}
    naive_x, naive = fwd_bwd(lambda x: naive_fkl(x, u, y, steps), s)
    entries = [("vcrd (first)", VCRD)] + sweep() + [("vcrd (after the sweep)", VCRD)]
    if only:
        preset = "vcrd" in only
        entries = [(name, cfg) for name, cfg in entries if name in only or (preset and name.startswith("vcrd ("))]
    naive_alone = interleaved([naive], repeats)[0] if alone else None
    rows = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for name, cfg in entries:
            x, call = fwd_bwd(lambda x, cfg=cfg: vcrd_loss(x, u, y, step_ids=steps, config=cfg, impl="torch"), s)
            naive_s, seconds = (naive_alone, *interleaved([call], repeats)) if alone else interleaved([naive, call],
                                                                                                      repeats)
            check = gradcheck.check_logits(x.grad, x, u, y, steps, cfg, z_cache=z_cache)
            row = dict(name=name, seconds=seconds, naive_seconds=naive_s, speedup_vs_naive=naive_s / seconds,
                       load=os.getloadavg()[0], grad_check=check["grad_check"], grad_rel_err=check["grad_rel_err"])
            rows.append(row)
            log(f"{name:45s} {seconds:7.3f} s  naive {naive_s:7.3f} s  {row['speedup_vs_naive']:5.2f}× naive  grad "
                f"{row['grad_check']} ({row['grad_rel_err']:.1e})  load {row['load']:.1f}")
    naive_check = gradcheck.check_logits(naive_x.grad, naive_x, u, y, steps, "kd", z_cache=z_cache)
    recompile = [str(w.message) for w in caught if "recompile" in str(w.message).lower()]
    from torch._dynamo.utils import counters
    return dict(N=N, V=V, repeats=repeats, alone=alone, rows=rows, naive_grad_check=naive_check["grad_check"],
                naive_grad_rel_err=naive_check["grad_rel_err"], recompile_warnings=recompile,
                compiled_graphs=int(counters["stats"]["unique_graphs"]), machine=machine())


def machine() -> str:
    cpu = cpu_name()
    return (f"{cpu}, {torch.get_num_threads()} threads, Python {platform.python_version()}, torch {torch.__version__}, "
            f"{time.strftime('%Y-%m-%d %H:%M')}")


def markdown(result: Dict) -> str:
    """The sweep as a markdown table (with the machine line and the verdict)."""
    rows = result["rows"]
    worst = min(rows, key=lambda r: r["speedup_vs_naive"])
    how = ("each configuration timed alone, the naive loss once first" if result.get("alone") else
           "each configuration interleaved with the naive loss")
    lines = [f"Machine: {result['machine']}; N={result['N']}, V={result['V']}, fp32, median of {result['repeats']} "
             f"({how}); {result['compiled_graphs']} compiled graphs, "
             f"{len(result['recompile_warnings'])} recompile warnings; naive gradient {result['naive_grad_check']} "
             f"({result['naive_grad_rel_err']:.1e}).",
             "", "| configuration (vs the `vcrd` preset) | fwd+bwd (s) | naive (s) | speed-up vs naive | grad check "
             "| load |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['name']} | {r['seconds']:.3f} | {r['naive_seconds']:.3f} | {r['speedup_vs_naive']:.2f}× "
                     f"| {r['grad_check']} ({r['grad_rel_err']:.1e}) | {r['load']:.1f} |")
    every = all(r["grad_check"] == "pass" for r in rows) and result["naive_grad_check"] == "pass"
    lines += ["", f"Slowest: {worst['name']} at {worst['speedup_vs_naive']:.2f}× naive; every gradient "
              f"{'passes' if every else 'does NOT pass'}."]
    return "\n".join(lines)


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--N", type=positive, default=1024, help="rows (default 1024)")
    p.add_argument("--V", type=positive, default=151936, help="vocabulary (default 151936)")
    p.add_argument("--repeats", type=positive, default=3, help="timed calls per configuration (default 3)")
    p.add_argument("--json", type=Path, default=None, help="write the result here")
    names = ["vcrd"] + [name for name, _ in sweep()]
    p.add_argument("--only", nargs="+", choices=names, metavar="NAME",
                   help="only these configurations (\"vcrd\": the preset, first and last); one of: " + "; ".join(names))
    p.add_argument("--alone", action="store_true",
                   help="time each configuration on its own, not interleaved with the naive loss")
    args = p.parse_args(argv)
    gradcheck.self_test(verbose=False)
    result = run(args.N, args.V, args.repeats, lambda line: print(line, flush=True), args.only, args.alone)
    print(markdown(result))
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    passed = all(r["grad_check"] == "pass" for r in result["rows"]) and result["naive_grad_check"] == "pass"
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
