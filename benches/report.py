"""Turn pytest-benchmark JSON into the markdown tables and plot of docs/benchmarks.md.

    python benches/report.py benches/results/logits.json docs/benchmarks.md

The section between ``<!-- logits:begin -->`` and ``<!-- logits:end -->`` of the markdown file is
replaced (the file is created if missing); the plot goes next to it as ``logits.png``. The
"grad check" column is each case's check of the gradient it timed against the float64 reference
(``benches/gradcheck.py``; "–" for results recorded before the check existed).
"""

from __future__ import annotations

import json
import re
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benches.gradcheck import TOL, cell  # noqa: E402


def machine_line(data: dict) -> str:
    m, c = data.get("machine_info", {}), data.get("commit_info", {})
    extra = data["benchmarks"][0]["extra_info"] if data["benchmarks"] else {}
    cpu = m.get("cpu", {}).get("brand_raw", m.get("processor", "?"))
    return (f"Machine: {cpu}, {extra.get('threads', '?')} threads, Python {m.get('python_version', '?')}, "
            f"torch {extra.get('torch', '?')}, git {str(c.get('id', '?'))[:10]}{' (dirty)' if c.get('dirty') else ''}, "
            f"{data.get('datetime', '?')[:10]}")


def logits_table(data: dict) -> str:
    by_n = defaultdict(dict)
    for b in data["benchmarks"]:
        e = b["extra_info"]
        by_n[e["N"]][e["provider"]] = (b["stats"]["median"], e["peak_extra_bytes"], e["buffer_bytes"], e["V"], e)
    lines = ["| N | V | provider | median fwd+bwd (s) | speed-up vs naive | peak memory beyond inputs | "
             "= × one [N, V] fp32 buffer | grad check |", "|---|---|---|---|---|---|---|---|"]
    for N in sorted(by_n):
        naive = by_n[N].get("naive-fkl", (None,))[0]
        for provider, (t, extra, buf, V, e) in sorted(by_n[N].items(), key=lambda kv: kv[1][0]):
            speed = f"{naive / t:.2f}×" if naive else "–"
            memory = f"{extra / 2**30:.2f} GiB | {extra / buf:.2f}"
            lines.append(f"| {N} | {V} | {provider} | {t:.3f} | {speed} | {memory} | {cell(e)} |")
    return "\n".join(lines)


def plot(data: dict, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows = defaultdict(dict)
    for b in data["benchmarks"]:
        e = b["extra_info"]
        rows[e["provider"]][e["N"]] = b["stats"]["median"]
    Ns = sorted({n for r in rows.values() for n in r})
    fig, ax = plt.subplots(figsize=(7, 3.5))
    width = 0.8 / len(rows)
    for i, (provider, times) in enumerate(sorted(rows.items())):
        ax.bar([j + i * width for j in range(len(Ns))], [times.get(n, 0) for n in Ns], width, label=provider)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(Ns))], [f"N={n}" for n in Ns])
    ax.set_ylabel("median fwd+bwd (s), lower is better")
    ax.set_title("Distillation loss on logits, fp32, CPU")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def check_note(data: dict) -> str:
    extras = [b["extra_info"] for b in data["benchmarks"]]
    if not any("grad_check" in e for e in extras):
        return "grad check: not recorded in these results."
    failed = sum(e.get("grad_check") == "FAIL" for e in extras)
    return (f"grad check: the gradient each case timed vs the float64 reference (`vcrd.core.reference`) of the preset "
            f"it computes (`kd` = forward KL over the non-ignored rows for naive and TRL), on rows "
            f"{extras[0].get('grad_rows', '?')} (exact: the windows are causal) divided by the normaliser Z of the "
            f"whole batch, also from the reference; max |error| / max |reference|, pass ≤ {TOL:.0e} (fp32; "
            f"benches/gradcheck.py). "
            f"{'All pass.' if not failed else f'{failed} FAILED.'}")


def main(json_path: str, md_path: str) -> None:
    data = json.loads(Path(json_path).read_text())
    md = Path(md_path)
    png = md.with_name("logits.png")
    section = "\n".join([
        "<!-- logits:begin -->",
        machine_line(data), "",
        logits_table(data), "",
        check_note(data), "",
        "![fwd+bwd time per provider](logits.png)" if plot(data, png) else "(matplotlib missing: no plot)",
        "<!-- logits:end -->",
    ])
    text = md.read_text() if md.exists() else "# Benchmarks\n\n<!-- logits:begin -->\n<!-- logits:end -->\n"
    text = re.sub(r"<!-- logits:begin -->.*<!-- logits:end -->", lambda _: section, text, flags=re.S)
    md.write_text(text)
    print(f"wrote {md} and {png}")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python benches/report.py RESULTS.json docs/benchmarks.md")
    main(*sys.argv[1:])
