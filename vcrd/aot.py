"""Ahead-of-time compile report: every kernel, for sm_80 and sm_90, without a GPU.

Triton compiles each kernel for a named target with its bundled ``ptxas``; ``cuobjdump -res-usage``
(shipped in Triton's wheel) then reads registers, spill stores/loads (local memory) and shared
memory per kernel out of the cubin. ``vcrd aot`` prints the table.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, List

ARCHS = (80, 90)
DTYPES = ("fp32", "bf16")
V_LM = 151936  # an LM vocabulary: the launchers' full-tile configuration


@dataclass
class KernelReport:
    kernel: str
    variant: str
    arch: int
    dtype: str
    registers: int
    spill_bytes: int
    shared_bytes: int


def _variants():
    """(name, variant, dtype, jit function, signature, constexprs) for every kernel configuration we launch."""
    from vcrd.kernels.grad import grad_kernel
    from vcrd.kernels.label_logprob import label_logprob_kernel
    from vcrd.kernels.stats import DIVERGENCE_CODES, launch_config, stats_kernel

    BLOCK_V = launch_config(V_LM)["BLOCK_V"]
    for dtype in DTYPES:
        t = f"*{dtype}"
        for div, code in DIVERGENCE_CODES.items():
            if div != "jsd":
                yield ("stats", div, dtype, stats_kernel,
                       {"s_ptr": t, "u_ptr": t, "labels_ptr": "*i64", "out_ptr": "*fp32", "stride_s": "i64",
                        "stride_u": "i64", "stride_out": "i64", "V": "i32", "inv_T": "fp32",
                        "DIVERGENCE": "constexpr", "NEED_LSE1": "constexpr", "BLOCK_V": "constexpr"},
                       {"DIVERGENCE": code, "NEED_LSE1": True, "BLOCK_V": BLOCK_V})
            yield ("grad", div, dtype, grad_kernel,
                   {"s_ptr": t, "u_ptr": t, "labels_ptr": "*i64", "stats_ptr": "*fp32", "coef_ptr": "*fp32",
                    "grad_ptr": t, "stride_s": "i64", "stride_u": "i64", "stride_stats": "i64",
                    "stride_grad": "i64", "V": "i32", "inv_T": "fp32", "beta": "fp32",
                    "DIVERGENCE": "constexpr", "HAS_CE": "constexpr", "WRITE_GRAD": "constexpr",
                    "BLOCK_V": "constexpr"},
                   {"DIVERGENCE": code, "HAS_CE": True, "WRITE_GRAD": True, "BLOCK_V": BLOCK_V})
        yield ("label_logprob", "-", dtype, label_logprob_kernel,
               {"x_ptr": t, "labels_ptr": "*i64", "out_ptr": "*fp32", "stride_x": "i64", "V": "i32",
                "inv_T": "fp32", "BLOCK_V": "constexpr"},
               {"BLOCK_V": BLOCK_V})


def cuobjdump() -> Path:
    import triton

    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not path.exists():
        raise FileNotFoundError(f"cuobjdump not found at {path} (it ships in Triton's wheel for NVIDIA)")
    return path


def resource_usage(cubin: bytes) -> Dict[str, int]:
    """``REG``, ``LOCAL`` (spill bytes per thread) and ``SHARED`` of the one kernel in a cubin."""
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
    try:
        text = subprocess.run([str(cuobjdump()), "-res-usage", f.name], check=True, capture_output=True,
                              text=True).stdout
    finally:
        os.unlink(f.name)
    found = re.search(r"REG:(\d+).*?SHARED:(\d+).*?LOCAL:(\d+)", text)
    if not found:
        raise RuntimeError(f"could not read resource usage from cuobjdump output:\n{text}")
    return {"REG": int(found[1]), "SHARED": int(found[2]), "LOCAL": int(found[3])}


def compile_all(archs: Iterable[int] = ARCHS) -> List[KernelReport]:
    """Compile every kernel variant for each arch; one row per (kernel, variant, arch, dtype)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from vcrd.kernels.stats import launch_config

    num_warps = launch_config(V_LM)["num_warps"]
    reports = []
    for name, variant, dtype, fn, signature, constexprs in _variants():
        for arch in archs:
            src = ASTSource(fn=fn, signature=signature, constexprs=constexprs)
            options = {"num_warps": num_warps, "enable_fp_fusion": True}
            compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
            usage = resource_usage(compiled.asm["cubin"])
            reports.append(KernelReport(name, variant, arch, dtype, usage["REG"], usage["LOCAL"], usage["SHARED"]))
    return reports


def format_table(reports: List[KernelReport]) -> str:
    lines = ["| kernel | variant | arch | dtype | registers | spill bytes | shared bytes |",
             "|---|---|---|---|---|---|---|"]
    for r in reports:
        lines.append(f"| {r.kernel} | {r.variant} | sm_{r.arch} | {r.dtype} | {r.registers} | {r.spill_bytes} | "
                     f"{r.shared_bytes} |")
    return "\n".join(lines)
