"""Modelled (not measured) GPU time of the Triton loss: bytes moved / copy bandwidth.

    python benches/roofline.py            # N=16384, V=151936, bf16, H100 and H200

Bytes per row come from the counted traffic (tests/backends/test_triton_traffic.py): the statistics kernel
reads student and teacher once, the gradient kernel reads both again and writes the gradient once
(5 units of N·V·itemsize; JSD reads both a third time: 7 units). The minimum is 3 units. Copy
bandwidths are the measured ones quoted in REFERENCES.md: H100 3.0 TB/s, H200 4.3 TB/s. Exp
throughput is not modelled; every kernel is assumed memory-bound.
"""

from __future__ import annotations

import argparse

GPUS = {"H100 (3.0 TB/s)": 3.0e12, "H200 (4.3 TB/s)": 4.3e12}
UNITS = {"minimum (read s, read u, write grad)": 3, "vcrd fkl / rkl (two sweeps)": 5, "vcrd jsd (three reads)": 7,
         "forward only, no gradient (stats sweep)": 2}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--vocab", type=int, default=151936)
    p.add_argument("--itemsize", type=int, default=2, help="bytes per logit (2 = bf16)")
    a = p.parse_args()
    unit = a.tokens * a.vocab * a.itemsize
    print(f"MODELLED, not measured: N={a.tokens}, V={a.vocab}, {a.itemsize}-byte logits, "
          f"one unit = {unit / 1e9:.2f} GB\n")
    print("| traffic | units | GB | " + " | ".join(GPUS) + " |")
    print("|---|---|---|" + "---|" * len(GPUS))
    for name, k in UNITS.items():
        times = " | ".join(f"{k * unit / bw * 1e3:.1f} ms" for bw in GPUS.values())
        print(f"| {name} | {k} | {k * unit / 1e9:.1f} | {times} |")


if __name__ == "__main__":
    main()
