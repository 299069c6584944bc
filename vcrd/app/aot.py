"""Ahead-of-time compile report: every kernel, for sm_80 and sm_90, without a GPU.

Triton compiles each kernel for a named target with its bundled ``ptxas``. From the result:

- ``cuobjdump -res-usage`` (shipped in Triton's wheel) reads registers, spill bytes (local memory)
  and shared memory per kernel out of the cubin;
- the PTX (``asm["ptx"]``) is scanned for barriers (``bar.sync`` / ``barrier.sync``) inside each
  loop (a backward branch and the lines between its target label and it), asynchronous copies
  (``cp.async``) and TMA (``cp.async.bulk``);
- occupancy (CTAs per SM) is computed from those numbers with the CUDA occupancy rules (see
  :func:`ctas_per_sm`).

``vcrd aot`` prints the table.
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
DTYPES = ("fp32", "bf16", "fp16")
V_LM = 151936  # an LM vocabulary: the launchers' full-tile configuration
K_CACHE = 64  # a teacher cache's top-K (the sparse kernels)

# Per-SM limits (CUDA C Programming Guide, "Compute capabilities" table) for the occupancy estimate.
SM_LIMITS = {
    80: {"regs": 65536, "threads": 2048, "ctas": 32, "smem": 164 * 1024},
    90: {"regs": 65536, "threads": 2048, "ctas": 32, "smem": 228 * 1024},
}
REG_ALLOC_UNIT = 256  # registers are allocated per warp in units of 256 (8 per thread)
SMEM_RESERVED_PER_CTA = 1024  # the driver reserves 1 KB of shared memory per CTA on sm_80+


@dataclass
class KernelReport:
    kernel: str
    variant: str
    arch: int
    dtype: str
    registers: int
    spill_bytes: int
    shared_bytes: int
    num_warps: int = 0
    block_v: int = 0
    bar_sync_per_loop: tuple = ()  # barriers inside each loop of the kernel, in PTX order
    instructions_per_loop: tuple = ()  # PTX instructions inside each loop, in PTX order
    bar_sync_total: int = 0
    cp_async: int = 0
    tma: int = 0
    ctas_per_sm: int = 0
    ctas_limited_by: str = ""


def _variants():
    """(name, variant, dtype, jit function, signature, constexprs, launch config) for every kernel
    configuration we launch."""
    from vcrd.kernels.grad import grad_kernel
    from vcrd.kernels.label_logprob import label_logprob_kernel
    from vcrd.kernels.stats import DIVERGENCE_CODES, launch_config, stats_kernel

    config = launch_config(V_LM)
    BLOCK_V = config["BLOCK_V"]
    for dtype in DTYPES:
        t = f"*{dtype}"
        for div, code in DIVERGENCE_CODES.items():
            yield ("stats", div, dtype, stats_kernel,
                   {"s_ptr": t, "u_ptr": t, "labels_ptr": "*i64", "out_ptr": "*fp32", "stride_s": "i64",
                    "stride_u": "i64", "stride_out": "i64", "V": "i32", "inv_T": "fp32", "scale": "fp32",
                    "inv_scale": "fp32", "DIVERGENCE": "constexpr", "NEED_LSE_UNTEMPERED": "constexpr",
                    "BLOCK_V": "constexpr"},
                   {"DIVERGENCE": code, "NEED_LSE_UNTEMPERED": True, "BLOCK_V": BLOCK_V}, config)
            yield ("grad", div, dtype, grad_kernel,
                   {"s_ptr": t, "u_ptr": t, "labels_ptr": "*i64", "stats_ptr": "*fp32", "coef_ptr": "*fp32",
                    "grad_ptr": t, "stride_s": "i64", "stride_u": "i64", "stride_stats": "i64",
                    "stride_grad": "i64", "V": "i32", "inv_T": "fp32", "beta": "fp32",
                    "DIVERGENCE": "constexpr", "HAS_CE": "constexpr", "WRITE_GRAD": "constexpr",
                    "BLOCK_V": "constexpr"},
                   {"DIVERGENCE": code, "HAS_CE": True, "WRITE_GRAD": True, "BLOCK_V": BLOCK_V}, config)
        yield ("label_logprob", "-", dtype, label_logprob_kernel,
               {"x_ptr": t, "labels_ptr": "*i64", "out_ptr": "*fp32", "stride_x": "i64", "V": "i32",
                "inv_T": "fp32", "BLOCK_V": "constexpr"},
               {"BLOCK_V": BLOCK_V}, config)
    yield from _sparse_variants()


def _sparse_variants():
    """The sparse-teacher kernels (SPEC §10) on a cache's teacher (int32 ids, fp16 log-probs, K = K_CACHE)."""
    from vcrd.kernels.sparse import block_k, sparse_grad_kernel, sparse_stats_kernel
    from vcrd.kernels.stats import DIVERGENCE_CODES, launch_config

    config = launch_config(V_LM)
    blocks = {"BLOCK_V": config["BLOCK_V"], "BLOCK_K": block_k(K_CACHE)}
    teacher = {"ids_ptr": "*i32", "top_ptr": "*fp16"}
    for dtype in DTYPES:
        t = f"*{dtype}"
        for div, code in DIVERGENCE_CODES.items():
            yield ("sparse_stats", div, dtype, sparse_stats_kernel,
                   {"s_ptr": t, **teacher, "tail_ptr": "*fp32", "absent_ptr": "*i32", "labels_ptr": "*i64",
                    "out_ptr": "*fp32", "stride_s": "i64", "stride_ids": "i64", "stride_top": "i64",
                    "stride_out": "i64", "V": "i32", "K": "i32", "n_tail": "fp32", "log_n_tail": "fp32",
                    "log_fill_count": "fp32", "inv_T": "fp32", "beta": "fp32", "scale": "fp32", "inv_scale": "fp32",
                    "DIVERGENCE": "constexpr", "NEED_LSE_UNTEMPERED": "constexpr", "BLOCK_V": "constexpr",
                    "BLOCK_K": "constexpr"},
                   {"DIVERGENCE": code, "NEED_LSE_UNTEMPERED": True, **blocks}, config)
            yield ("sparse_grad", div, dtype, sparse_grad_kernel,
                   {"s_ptr": t, **teacher, "labels_ptr": "*i64", "stats_ptr": "*fp32", "coef_ptr": "*fp32",
                    "grad_ptr": t, "scratch_ptr": "*fp32", "stride_s": "i64", "stride_ids": "i64",
                    "stride_top": "i64", "stride_stats": "i64", "stride_grad": "i64", "stride_scratch": "i64",
                    "V": "i32", "K": "i32", "inv_T": "fp32", "beta": "fp32", "DIVERGENCE": "constexpr",
                    "HAS_CE": "constexpr",
                    "BLOCK_V": "constexpr", "BLOCK_K": "constexpr"},
                   {"DIVERGENCE": code, "HAS_CE": True, **blocks}, config)


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


_LABEL = re.compile(r"^(\$L__\w+):")
_BRANCH = re.compile(r"\bbra(?:\.uni)?\s+(\$L__\w+);")
_BARRIER = re.compile(r"\b(?:bar|barrier)\.sync\b")
_CP_ASYNC = re.compile(r"\bcp\.async\.(?:ca|cg)\b")
_TMA = re.compile(r"\bcp\.async\.bulk\b")


def ptx_counts(ptx: str) -> Dict[str, object]:
    """Barriers and instructions per loop, barriers in all, ``cp.async`` and TMA (``cp.async.bulk``).

    A loop is a branch back to a label above it; its body is every line from the label to the
    branch (LLVM lays a loop's blocks out contiguously); its instructions are the body's lines that
    are not labels, directives (``.loc``), comments or braces. Loops are listed in PTX order."""
    lines = ptx.splitlines()
    labels = {}
    loops, sizes = [], []
    for i, line in enumerate(lines):
        found = _LABEL.match(line.strip())
        if found:
            labels[found[1]] = i
        branch = _BRANCH.search(line)
        if branch and branch[1] in labels:  # target already seen: a backward branch
            body = lines[labels[branch[1]]:i + 1]
            loops.append(sum(bool(_BARRIER.search(x)) for x in body))
            sizes.append(sum(bool(x.strip()) and not x.strip().startswith(("$", ".", "//", "{", "}")) for x in body))
    return {
        "bar_sync_per_loop": tuple(loops),
        "instructions_per_loop": tuple(sizes),
        "bar_sync_total": sum(bool(_BARRIER.search(x)) for x in lines),
        "cp_async": sum(bool(_CP_ASYNC.search(x)) for x in lines),
        "tma": sum(bool(_TMA.search(x)) for x in lines),
    }


def ctas_per_sm(arch: int, registers: int, num_warps: int, shared_bytes: int) -> tuple:
    """Resident CTAs per SM and the limiting resource, by the CUDA occupancy calculator's rules:
    registers are allocated per warp in units of 256 (``ceil(regs·32 / 256)·256`` per warp) out of
    65536 per SM; at most 2048 threads and 32 CTAs per SM; shared memory per CTA is the kernel's
    plus 1 KB reserved, out of 164 KB (sm_80) / 228 KB (sm_90)."""
    lim = SM_LIMITS[arch]
    regs_per_warp = -(-max(registers, 1) * 32 // REG_ALLOC_UNIT) * REG_ALLOC_UNIT
    by = {
        "registers": lim["regs"] // regs_per_warp // num_warps,
        "threads": lim["threads"] // (32 * num_warps),
        "CTA slots": lim["ctas"],
        "shared memory": lim["smem"] // (shared_bytes + SMEM_RESERVED_PER_CTA),
    }
    limiter = min(by, key=by.get)
    return by[limiter], limiter


def compile_all(archs: Iterable[int] = ARCHS) -> List[KernelReport]:
    """Compile every kernel variant for each arch; one row per (kernel, variant, arch, dtype)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    reports = []
    for name, variant, dtype, fn, signature, constexprs, config in _variants():
        for arch in archs:
            src = ASTSource(fn=fn, signature=signature, constexprs=constexprs)
            options = {"num_warps": config["num_warps"], "enable_fp_fusion": True}
            compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
            usage = resource_usage(compiled.asm["cubin"])
            ctas, limiter = ctas_per_sm(arch, usage["REG"], config["num_warps"], usage["SHARED"])
            reports.append(KernelReport(name, variant, arch, dtype, usage["REG"], usage["LOCAL"], usage["SHARED"],
                                        num_warps=config["num_warps"], block_v=config["BLOCK_V"],
                                        ctas_per_sm=ctas, ctas_limited_by=limiter,
                                        **ptx_counts(compiled.asm["ptx"])))
    return reports


def format_table(reports: List[KernelReport]) -> str:
    lines = ["| kernel | variant | arch | dtype | BLOCK_V × warps | registers | spill bytes | shared bytes | "
             "bar.sync per loop | bar.sync total | PTX instr. per element pair (per loop) | cp.async / TMA | "
             "CTAs/SM (limit) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in reports:
        per_loop = ", ".join(map(str, r.bar_sync_per_loop)) or "-"
        per_thread = max(r.block_v // (32 * r.num_warps), 1)  # elements per thread per tensor
        per_pair = ", ".join(f"{n / per_thread:.1f}" for n in r.instructions_per_loop) or "-"
        lines.append(f"| {r.kernel} | {r.variant} | sm_{r.arch} | {r.dtype} | {r.block_v} × {r.num_warps} | "
                     f"{r.registers} | {r.spill_bytes} | {r.shared_bytes} | {per_loop} | {r.bar_sync_total} | "
                     f"{per_pair} | {r.cp_async} / {r.tma} | {r.ctas_per_sm} ({r.ctas_limited_by}) |")
    return "\n".join(lines)
