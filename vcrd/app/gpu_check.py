"""``vcrd gpu-check``: the parity suite and the side-by-side timings, in one command, for whoever has a GPU.

On CUDA (about 8 minutes on one H100 at most):

1. **Parity.** Every implementation (``vcrd_loss`` with ``impl="triton"`` and ``impl="torch"``,
   ``fused_linear_vcrd_loss`` with both, ``sparse_vcrd_loss`` and ``fused_linear_sparse_vcrd_loss``)
   against the float64 reference (``vcrd.core.reference.vcrd_loss``), at N = 4 × 1024 rows,
   V = 151936, bf16 and fp32 inputs, presets ``kd``, ``discord`` and ``vcrd``: the loss and every
   gradient (student logits, or student hidden states and head), with a random upstream gradient,
   held to the three-way rule of DESIGN.md (:func:`parity_check`).
2. **Timings.** vcrd's logits path and fused-linear path against Liger's Triton kernels (``LigerJSD``,
   ``LigerFusedLinearJSD``, beta=0) and TRL's (``_chunked_divergence_loss``, beta=0) at the README's
   shapes, fwd+bwd, CUDA events after a warm-up, the median; each timed call's gradients checked by
   the same rule. A provider that is not installed is a row marked skipped, with the reason.
3. **Report.** ``gpu_check.json`` and ``gpu_check.md`` in ``--out`` with a machine line; the exit
   status is 1 if any parity check (or any vcrd timing row's gradient check) fails.

``--interpret`` runs the same code at tiny sizes on CPU tensors under the Triton interpreter (the
command re-executes itself with ``TRITON_INTERPRET=1`` when that is not yet set: triton reads it at
import); the timings are skipped there. Without CUDA and without ``--interpret`` it exits 2.

Why ``reduction="sum"``: the float64 reference is an ``[N, V]`` computation with an ``[N, N]``
window mask; at N = 4096, V = 151936 it would need tens of GB with autograd. Under ``"sum"`` rows of
different sequences never interact (windows stop at sequence ends, there is no normaliser), so the
reference runs one sequence at a time and its losses and gradients add up to the batch's exactly.
Every implementation therefore computes ``"sum"`` over packed sequences (``cu_seqlens``); the
normaliser of ``"mean"`` is tested by the default suite.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import torch

from .. import SparseTeacher, fused_linear_sparse_vcrd_loss, fused_linear_vcrd_loss, sparse_vcrd_loss, vcrd_loss
from ..core import reference

# tol[dtype] of the three-way rule, relative to max|truth| (Cut Cross-Entropy's values; DESIGN.md)
TOL: Dict[torch.dtype, float] = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2,
                                  torch.float64: 1e-10}
PRESETS = ("kd", "discord", "vcrd")
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
IGNORE = -100


@dataclass(frozen=True)
class Sizes:
    """The parity batch: ``B`` packed sequences of ``T`` rows, hidden width ``H``, vocabulary ``V``,
    sparse teacher's top-``K``; logits ``randn·std``."""

    B: int
    T: int
    H: int
    V: int
    K: int
    std: float = 15.0

    @property
    def N(self) -> int:
        return self.B * self.T


GPU_SIZES = Sizes(B=4, T=1024, H=896, V=151936, K=64)
INTERPRET_SIZES = Sizes(B=2, T=32, H=32, V=257, K=8)
# the README's shapes (N, H, V); H is unused on the logits path
TIMING_SHAPES = {"logits": [(1024, 0, 151936), (4096, 0, 151936)],
                 "hidden": [(1024, 512, 151936), (4096, 896, 151936), (2048, 576, 49152)]}


# ---------------------------------------------------------------------------------------------
# The three-way rule
# ---------------------------------------------------------------------------------------------

def parity_check(impl: torch.Tensor, base: torch.Tensor, truth: torch.Tensor,
                 dtype: torch.dtype) -> Tuple[bool, Dict[str, float]]:
    """DESIGN.md's rule: ``max|impl - truth| <= 2·max|base - truth| + tol[dtype]·max|truth|``.

    ``impl``, ``base`` and ``truth``: one loss (0-d) or one gradient, the same shape. ``base`` is
    plain PyTorch in the input dtype (:func:`torch_in_dtype`), ``truth`` the same formula in float64,
    both from the same rounded inputs. Non-finite entries of ``impl`` must sit where ``truth`` has
    the same ones; the bound holds on the finite entries. The tolerance scales with ``max|truth|``,
    so a zeroed or halved gradient fails however small the gradient is.
    Returns ``(ok, {"err_impl", "err_base", "scale", "bound"})``.
    """
    if dtype not in TOL:
        raise ValueError(f"dtype: expected one of {list(TOL)}, got {dtype}")
    if impl.shape != truth.shape or base.shape != truth.shape:
        raise ValueError(f"impl, base: expected the shape of truth {tuple(truth.shape)}, got "
                         f"{tuple(impl.shape)} and {tuple(base.shape)}")
    a, b, t = (x.detach().double() for x in (impl, base, truth))
    finite = t.isfinite()
    same_nonfinite = torch.equal(a.isnan(), t.isnan()) and torch.equal(a.isinf() & (a > 0), t.isinf() & (t > 0)) \
        and torch.equal(a.isinf() & (a < 0), t.isinf() & (t < 0))
    zero = torch.zeros((), dtype=torch.float64, device=t.device)
    err = lambda x: torch.where(finite, (x - t).abs(), zero).max().item() if t.numel() else 0.0  # noqa: E731
    e_impl, e_base = err(a), err(b)
    scale = torch.where(finite, t.abs(), zero).max().item() if t.numel() else 0.0
    bound = 2 * e_base + TOL[dtype] * scale
    ok = bool(same_nonfinite and e_impl <= bound)  # False when e_impl is NaN
    return ok, dict(err_impl=e_impl, err_base=e_base, scale=scale, bound=bound)


# ---------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------

@dataclass
class Batch:
    """One input set in one dtype, packed sequences (``cu_seqlens``).

    ``hs [N, H]``, ``ws [V, H]``: student hidden states and head; ``ht``, ``wt``: the teacher's;
    ``s``, ``u [N, V]``: student/teacher logits (the float64 products, rounded to the dtype; built only
    for the logits path); ``y [N]`` labels (``-100`` ignored), ``steps [N]`` step ids restarting per
    sequence, ``cu [B+1]``; ``sparse``: the teacher's top-K (from ``u``)."""

    hs: torch.Tensor
    ws: torch.Tensor
    ht: torch.Tensor
    wt: torch.Tensor
    y: torch.Tensor
    steps: torch.Tensor
    cu: torch.Tensor
    T: int
    s: Optional[torch.Tensor] = None
    u: Optional[torch.Tensor] = None
    sparse: Optional[SparseTeacher] = None

    @property
    def dtype(self) -> torch.dtype:
        return self.hs.dtype

    @property
    def n_valid(self) -> int:
        return int((self.y != IGNORE).sum())

    def sequences(self) -> List[slice]:
        return [slice(i, i + self.T) for i in range(0, self.y.numel(), self.T)]


def make_batch(N: int, H: int, V: int, T: int, dtype: torch.dtype, device: torch.device, *, logits: bool,
               K: int = 0, std: float = 15.0, seed: int = 0) -> Batch:
    """Realistic distillation inputs: logits ``randn·std`` from hidden states and heads, a correlated
    teacher, labels from the teacher's trace (its argmax, a quarter random ids), 15 % rows ignored,
    steps of about 7 tokens restarting in each of the ``N / T`` packed sequences."""
    if N % T:
        raise ValueError(f"N: expected a multiple of T={T}, got {N}")
    g = torch.Generator(device=device).manual_seed(seed)
    H64 = H or 64  # the logits path has no H of its own
    rnd = lambda *shape: torch.randn(*shape, generator=g, device=device, dtype=torch.float64)  # noqa: E731
    hs, ws = rnd(N, H64), rnd(V, H64) * (std / H64 ** 0.5)
    ht, wt = hs + 0.5 * rnd(N, H64), ws + rnd(V, H64) * (0.5 * std / H64 ** 0.5)
    hs, ws, ht, wt = (x.to(dtype) for x in (hs, ws, ht, wt))
    u = torch.cat([ht[i:i + T].double() @ wt.double().T for i in range(0, N, T)]) if logits else None
    teacher_ids = torch.cat([(ht[i:i + T].double() @ wt.double().T).argmax(-1) for i in range(0, N, T)]) \
        if u is None else u.argmax(-1)
    pick = torch.rand(N, generator=g, device=device)
    y = torch.where(pick < 0.25, torch.randint(0, V, (N,), generator=g, device=device), teacher_ids)
    y = torch.where(pick > 0.85, torch.full_like(y, IGNORE), y)
    new_step = (torch.rand(N // T, T, generator=g, device=device) < 0.15).long()
    new_step[:, 0] = 0
    steps = new_step.cumsum(1).reshape(N)
    cu = torch.arange(0, N + 1, T, device=device, dtype=torch.int64)
    batch = Batch(hs, ws, ht, wt, y, steps, cu, T)
    if logits:
        batch.s = torch.cat([hs[i:i + T].double() @ ws.double().T for i in range(0, N, T)]).to(dtype)
        batch.u = u.to(dtype)
        if K:
            batch.sparse = SparseTeacher.from_logits(batch.u, K)
    return batch


# ---------------------------------------------------------------------------------------------
# Implementations, providers and the oracle: each maps (leaves, batch, preset) to a loss in "sum" form
# ---------------------------------------------------------------------------------------------

LossFn = Callable[[List[torch.Tensor], Batch, str], torch.Tensor]


@dataclass(frozen=True)
class Provider:
    """A loss to check or time: ``level`` ``"logits"`` (leaves ``[s]``) or ``"hidden"`` (leaves
    ``[hs, ws]``); ``teacher`` ``"dense"`` or ``"sparse"``; ``preset``: the preset it computes when
    fixed (third-party losses compute forward KL, i.e. ``kd``), else ``None``; ``required``: a
    ``NotImplementedError`` from it is a failure, not a skip."""

    name: str
    level: str
    teacher: str
    make: Callable[[], LossFn]
    preset: Optional[str] = None
    required: bool = False
    vcrd: bool = True


def _vcrd_logits(impl: str) -> Callable[[], LossFn]:
    return lambda: lambda leaves, b, preset: vcrd_loss(leaves[0], b.u, b.y, step_ids=b.steps, cu_seqlens=b.cu,
                                                       config=preset, reduction="sum", impl=impl)


def _vcrd_hidden(impl: str) -> Callable[[], LossFn]:
    return lambda: lambda leaves, b, preset: fused_linear_vcrd_loss(
        leaves[0], leaves[1], b.ht, b.wt, b.y, step_ids=b.steps, cu_seqlens=b.cu, config=preset, reduction="sum",
        impl=impl)


def _sparse_logits(impl: str) -> Callable[[], LossFn]:
    return lambda: lambda leaves, b, preset: sparse_vcrd_loss(leaves[0], b.sparse, b.y, step_ids=b.steps,
                                                              cu_seqlens=b.cu, config=preset, reduction="sum",
                                                              impl=impl)


def _sparse_hidden(impl: str) -> Callable[[], LossFn]:
    return lambda: lambda leaves, b, preset: fused_linear_sparse_vcrd_loss(
        leaves[0], leaves[1], b.sparse, b.y, step_ids=b.steps, cu_seqlens=b.cu, config=preset, reduction="sum",
        impl=impl)


def _liger_jsd() -> LossFn:
    from liger_kernel.transformers import LigerJSD

    jsd = LigerJSD(beta=0.0, ignore_index=IGNORE)  # forward KL, mean over the non-ignored rows

    def run(leaves, b, preset):
        logq = torch.log_softmax(leaves[0].float(), -1)
        logp = torch.log_softmax(b.u.float(), -1)
        return jsd(logq, logp, b.y) * b.n_valid
    return run


def _liger_fused_jsd() -> LossFn:
    from liger_kernel.transformers import LigerFusedLinearJSD

    jsd = LigerFusedLinearJSD(jsd_beta=0.0, ignore_index=IGNORE)
    return lambda leaves, b, preset: jsd(leaves[0], leaves[1], b.ht, b.wt, b.y) * b.n_valid


def _trl_chunked() -> LossFn:
    from trl.trainer.distillation_trainer import _chunked_divergence_loss

    def run(leaves, b, preset):
        mask = (b.y != IGNORE)[None]
        loss, _, _ = _chunked_divergence_loss(leaves[0][None], b.ht[None], leaves[1], b.wt, mask, beta=0.0)
        return loss * b.n_valid
    return run


IMPLEMENTATIONS = [
    Provider("vcrd_loss[triton]", "logits", "dense", _vcrd_logits("triton"), required=True),
    Provider("vcrd_loss[torch]", "logits", "dense", _vcrd_logits("torch")),
    Provider("fused_linear_vcrd_loss[triton]", "hidden", "dense", _vcrd_hidden("triton")),
    Provider("fused_linear_vcrd_loss[torch]", "hidden", "dense", _vcrd_hidden("torch")),
    Provider("sparse_vcrd_loss[auto]", "logits", "sparse", _sparse_logits("auto")),
    Provider("fused_linear_sparse_vcrd_loss[auto]", "hidden", "sparse", _sparse_hidden("auto")),
]
TIMED = {
    "logits": [Provider("vcrd kd (triton)", "logits", "dense", _vcrd_logits("triton"), "kd"),
               Provider("vcrd vcrd (triton)", "logits", "dense", _vcrd_logits("triton"), "vcrd"),
               Provider("liger LigerJSD (beta=0)", "logits", "dense", _liger_jsd, "kd", vcrd=False)],
    "hidden": [Provider("vcrd fused kd", "hidden", "dense", _vcrd_hidden("auto"), "kd"),
               Provider("vcrd fused vcrd", "hidden", "dense", _vcrd_hidden("auto"), "vcrd"),
               Provider("liger LigerFusedLinearJSD (beta=0)", "hidden", "dense", _liger_fused_jsd, "kd", vcrd=False),
               Provider("trl _chunked_divergence_loss (beta=0)", "hidden", "dense", _trl_chunked, "kd",
                        vcrd=False)],
}


def leaves_of(b: Batch, level: str, dtype: torch.dtype) -> List[torch.Tensor]:
    """Fresh leaves requiring grad: the student's logits, or its hidden states and head, in ``dtype``."""
    src = [b.s] if level == "logits" else [b.hs, b.ws]
    return [x.detach().to(dtype).requires_grad_() for x in src]


def run_with_grads(fn: Callable[[List[torch.Tensor]], torch.Tensor], leaves: List[torch.Tensor],
                   upstream: float) -> List[torch.Tensor]:
    """``[loss · upstream, grad of each leaf]`` of one call (leaves' old gradients dropped)."""
    for x in leaves:
        x.grad = None
    loss = fn(leaves) * upstream
    loss.backward()
    return [loss.detach()] + [x.grad if x.grad is not None else torch.zeros_like(x) for x in leaves]


def torch_in_dtype(leaves: List[torch.Tensor], b: Batch, rows: slice, preset: str, teacher: str) -> torch.Tensor:
    """One sequence's loss in plain PyTorch, no vcrd fast path, as a PyTorch model in the leaves'
    dtype gives it: both models' logits made in that dtype (``hidden @ weightᵀ``, rounded there), then
    SPEC's formulas literally (``vcrd.core.reference``) on them upcast to float32 for bf16/fp16, as
    losses on low-precision logits are computed in practice. With float64 leaves it is the truth; in
    the input dtype, the "torch in dtype" of the three-way rule.

    (The formulas themselves in bf16 are no base: against float64 their gradients of the head are off
    by about a quarter of their size, a bound so loose that a zeroed gradient passes.)"""
    dtype = leaves[0].dtype
    compute = torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype
    s = leaves[0][rows] if len(leaves) == 1 else leaves[0][rows] @ leaves[1].T
    if teacher == "sparse":
        u = b.sparse.completed_logprobs(rows, s.shape[-1], dtype)
    elif len(leaves) == 1:
        u = b.u[rows].to(dtype)
    else:
        u = b.ht[rows].to(dtype) @ b.wt.to(dtype).T
    return reference.vcrd_loss(s.to(compute), u.to(compute), b.y[rows], step_ids=b.steps[rows], config=preset,
                               reduction="sum")


def oracle(b: Batch, level: str, teacher: str, preset: str, dtype: torch.dtype, upstream: float) -> List[torch.Tensor]:
    """``[loss · upstream, grads]`` of :func:`torch_in_dtype` in ``dtype``, one sequence at a time
    (each sequence's backward before the next: memory of one sequence), summed; the loss summed in
    float64."""
    leaves = leaves_of(b, level, dtype)
    total = torch.zeros((), dtype=torch.float64, device=b.y.device)
    for rows in b.sequences():
        loss = torch_in_dtype(leaves, b, rows, preset, teacher) * upstream
        loss.backward()
        total += loss.detach().double()
    return [total] + [x.grad if x.grad is not None else torch.zeros_like(x) for x in leaves]


def three_way(p: Provider, fn: LossFn, b: Batch, preset: str, upstream: float,
              got: Optional[List[torch.Tensor]] = None, cache: Optional[Dict] = None) -> List[Dict]:
    """The provider's loss and gradients (``got``, or one call now) against base (torch in dtype) and
    truth (float64): one row per quantity, with the rule's numbers and ``ok``. ``cache``: oracles
    kept by ``(level, teacher, preset)`` for providers that share a batch."""
    dtype = b.dtype
    if got is None:
        got = run_with_grads(lambda leaves: fn(leaves, b, preset), leaves_of(b, p.level, dtype), upstream)
    key = (p.level, p.teacher, preset, upstream)
    if cache is None or key not in cache:
        pair = (oracle(b, p.level, p.teacher, preset, dtype, upstream),
                oracle(b, p.level, p.teacher, preset, torch.float64, upstream))
        if cache is not None:
            cache[key] = pair
    base, truth = cache[key] if cache is not None else pair
    names = ["loss", "grad logits"] if p.level == "logits" else ["loss", "grad hidden", "grad weight"]
    rows = []
    for name, g_impl, g_base, g_truth in zip(names, got, base, truth):
        ok, numbers = parity_check(g_impl, g_base, g_truth, dtype)
        rows.append(dict(quantity=name, ok=ok, **numbers))
    return rows


# ---------------------------------------------------------------------------------------------
# The suite
# ---------------------------------------------------------------------------------------------

@dataclass
class Report:
    """What ``gpu_check.json`` holds."""

    machine: Dict[str, str]
    mode: str
    sizes: Dict[str, int]
    parity: List[Dict] = field(default_factory=list)
    timings: List[Dict] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def failed(self) -> List[Dict]:
        bad = [r for r in self.parity if r["status"] == "fail"]
        return bad + [r for r in self.timings if r["status"] == "fail" and r["vcrd"]]


def machine_info(device: torch.device) -> Dict[str, str]:
    """GPU (or CPU) name, CUDA, torch, triton, liger-kernel, trl versions, git sha."""
    from importlib import metadata

    def version(dist: str) -> str:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return "not installed"

    root = Path(__file__).resolve().parents[2]
    sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True)
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True,
                           text=True)
    cpuinfo = Path("/proc/cpuinfo")
    cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                if line.startswith("model name")), "?") if cpuinfo.exists() else platform.processor() or "?"
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU: {cpu}"
    return dict(device=name, cuda=str(torch.version.cuda), torch=torch.__version__, triton=version("triton"),
                liger_kernel=version("liger-kernel"), trl=version("trl"),
                git=(sha.stdout.strip() + (" (dirty)" if dirty.stdout.strip() else "")) if sha.returncode == 0
                else "unknown", python=platform.python_version(), date=time.strftime("%Y-%m-%d %H:%M UTC",
                                                                                       time.gmtime()))


def run_parity(report: Report, sizes: Sizes, device: torch.device, log: Callable[[str], None]) -> None:
    """Every implementation × dtype × preset against the float64 reference (three-way rule)."""
    upstream = 0.73  # a random upstream gradient, fixed so reruns agree
    for dname, dtype in DTYPES.items():
        b = make_batch(sizes.N, sizes.H, sizes.V, sizes.T, dtype, device, logits=True, K=sizes.K, std=sizes.std)
        for preset in PRESETS:
            cache: Dict = {}  # one preset's oracles at a time: at full size each holds [N, V] float64 gradients
            for p in IMPLEMENTATIONS:
                row = dict(implementation=p.name, dtype=dname, preset=preset, N=sizes.N, V=sizes.V)
                t0 = time.perf_counter()
                try:
                    checks = three_way(p, p.make(), b, preset, upstream, cache=cache)
                except NotImplementedError as e:
                    row.update(status="fail" if p.required else "skipped", reason=" ".join(str(e).split()))
                except Exception as e:  # e.g. out of memory or a kernel that fails to compile: a result, not a crash
                    row.update(status="fail", reason=f"{type(e).__name__}: {' '.join(str(e).split())[:500]}")
                else:
                    row.update(status="pass" if all(c["ok"] for c in checks) else "fail", checks=checks)
                row["seconds"] = time.perf_counter() - t0
                report.parity.append(row)
                log(f"parity {p.name:38s} {dname} {preset:8s} {row['status']}")
        del b


def cuda_median_ms(call: Callable[[], None], warmup: int = 3, repeats: int = 10) -> Tuple[float, List[float]]:
    """The median of ``repeats`` CUDA-event timings of ``call`` after ``warmup`` calls (ms)."""
    for _ in range(warmup):
        call()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        call()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times), times


def run_timings(report: Report, device: torch.device, skip: Optional[str], log: Callable[[str], None]) -> None:
    """Each timed provider at each README shape and dtype: median fwd+bwd, and its gradients checked."""
    for level, shapes in TIMING_SHAPES.items():
        for N, H, V in shapes:
            for dname, dtype in DTYPES.items():
                b = None if skip else make_batch(N, H, V, 1024 if N % 1024 == 0 else N, dtype, device,
                                                 logits=level == "logits")
                cache: Dict = {}
                for p in TIMED[level]:
                    row = dict(provider=p.name, level=level, N=N, H=H or None, V=V, dtype=dname, vcrd=p.vcrd)
                    if skip:
                        report.timings.append(dict(row, status="skipped", reason=skip))
                        continue
                    try:
                        fn = p.make()
                    except ImportError as e:
                        report.timings.append(dict(row, status="skipped", reason=f"not installed: {e}"))
                        continue
                    leaves = leaves_of(b, level, dtype)
                    upstream = 1.0 / b.n_valid  # the mean over valid rows: gradients at their usual scale
                    got: List[torch.Tensor] = []

                    def call(p=p, fn=fn, b=b, leaves=leaves, upstream=upstream, got=got):
                        got[:] = run_with_grads(lambda x: fn(x, b, p.preset), leaves, upstream)

                    try:
                        median, times = cuda_median_ms(call)
                        checks = three_way(p, fn, b, p.preset, upstream, got=got, cache=cache)
                    except Exception as e:  # a third-party kernel failing here is a result, not a crash
                        report.timings.append(dict(row, status="fail", reason=f"{type(e).__name__}: {e}"))
                        log(f"timing {p.name:38s} N={N} H={H} V={V} {dname} fail: {e}")
                        continue
                    ok = all(c["ok"] for c in checks)
                    report.timings.append(dict(row, status="pass" if ok else "fail", median_ms=median,
                                               times_ms=times, checks=checks))
                    log(f"timing {p.name:38s} N={N} H={H} V={V} {dname} {median:.2f} ms, grads "
                        f"{'pass' if ok else 'FAIL'}")
                b = cache = None  # free the batch and its oracles before the next shape
                if device.type == "cuda":
                    torch.cuda.empty_cache()


def markdown(report: Report) -> str:
    """``gpu_check.md``: the machine line, the parity table, the timing table."""
    m = report.machine
    lines = [f"# vcrd gpu-check ({report.mode})", "",
             f"Machine: {m['device']}, CUDA {m['cuda']}, torch {m['torch']}, triton {m['triton']}, liger-kernel "
             f"{m['liger_kernel']}, trl {m['trl']}, Python {m['python']}, git {m['git']}, {m['date']}; "
             f"{report.seconds:.0f} s in all.", "",
             f"Parity: N={report.sizes['N']} ({report.sizes['B']} packed sequences), V={report.sizes['V']}, "
             f"H={report.sizes['H']}, top-K={report.sizes['K']}, reduction='sum', upstream gradient 0.73; "
             "rule: max|impl − truth| ≤ 2·max|torch in dtype − truth| + tol[dtype]·max|truth| "
             "(tol 1e-5 fp32, 1e-2 bf16), loss and every gradient.", "",
             "| implementation | dtype | preset | status | worst quantity: err impl / bound |", "|---|---|---|---|---|"]
    for r in report.parity:
        if "checks" in r:
            worst = max(r["checks"], key=lambda c: c["err_impl"] / c["bound"] if c["bound"] else float("inf"))
            detail = f"{worst['quantity']}: {worst['err_impl']:.2e} / {worst['bound']:.2e}"
        else:
            detail = r.get("reason", "")
        lines.append(f"| {r['implementation']} | {r['dtype']} | {r['preset']} | {r['status']} | {detail} |")
    lines += ["", "Timings: fwd+bwd, median of 10 CUDA-event timings after 3 warm-up calls; each timed call's "
              "gradients checked by the same rule (third-party losses against forward KL, vcrd's `kd`).", "",
              "| level | N | H | V | dtype | provider | median (ms) | gradients |", "|---|---|---|---|---|---|---|---|"]
    for r in report.timings:
        ms = f"{r['median_ms']:.2f}" if "median_ms" in r else "–"
        what = r["status"] if "reason" not in r else f"{r['status']}: {r['reason']}"
        lines.append(f"| {r['level']} | {r['N']} | {r['H'] or '–'} | {r['V']} | {r['dtype']} | {r['provider']} "
                     f"| {ms} | {what} |")
    verdict = "all parity checks pass" if not report.failed else f"{len(report.failed)} check(s) FAILED"
    lines += ["", f"Result: {verdict}.", ""]
    return "\n".join(lines)


def write(report: Report, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    data = asdict(report)
    data["failed"] = len(report.failed)
    (out / "gpu_check.json").write_text(json.dumps(data, indent=1, default=str))
    (out / "gpu_check.md").write_text(markdown(report))


def check_out(out: str) -> Path:
    """``--out`` as a folder that is not a file (created later, when the report is written)."""
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise ValueError(f"--out: expected a folder (new or existing), got the file {out!r}")
    return path


NO_GPU = ("vcrd gpu-check: error: needs a CUDA GPU (torch.cuda.is_available() is False here); "
          "on CPU, run `vcrd gpu-check --interpret` for the Triton-interpreter rehearsal at tiny sizes")


def gpu_check(args: argparse.Namespace) -> int:
    """The ``vcrd gpu-check`` command: 0 all pass, 1 a check failed, 2 no CUDA (without ``--interpret``)."""
    out = check_out(args.out)
    if args.interpret and os.environ.get("TRITON_INTERPRET") != "1":
        argv = ["gpu-check", "--interpret", "--out", str(out)] + (["--quick"] if args.quick else [])
        env = dict(os.environ, TRITON_INTERPRET="1")
        # the interpreter's launches dominate; torch.compile of the CPU path (tested by the default suite)
        # would add about 15 s of compile time to a rehearsal that checks this command's code
        env.setdefault("VCRD_COMPILE", "0")
        return subprocess.call([sys.executable, "-m", "vcrd.app.cli", *argv], env=env)
    if not args.interpret and not torch.cuda.is_available():
        print(NO_GPU, file=sys.stderr)
        return 2
    if args.interpret:  # masked-off lanes the interpreter computes anyway (NaN there is never stored)
        warnings.filterwarnings("ignore", category=RuntimeWarning, module="triton.runtime.interpreter")
    device = torch.device("cpu" if args.interpret else "cuda")
    sizes = INTERPRET_SIZES if args.interpret else GPU_SIZES
    t0 = time.perf_counter()
    report = Report(machine_info(device), "interpreter rehearsal, CPU tensors" if args.interpret else "CUDA",
                    dict(asdict(sizes), N=sizes.N))
    log = lambda msg: print(f"[gpu-check {time.perf_counter() - t0:6.1f} s] {msg}", flush=True)  # noqa: E731
    run_parity(report, sizes, device, log)
    write(report, out)  # the parity results kept even if the timings crash the process
    skip = "interpreter: timing meaningless" if args.interpret else "--quick" if args.quick else None
    run_timings(report, device, skip, log)
    report.seconds = time.perf_counter() - t0
    write(report, out)
    print(f"\nwrote {out / 'gpu_check.json'} and {out / 'gpu_check.md'}: "
          + (f"{len(report.failed)} check(s) FAILED" if report.failed else "all parity checks pass"))
    return 1 if report.failed else 0


def add_parser(sub) -> None:
    """The ``gpu-check`` subcommand on the CLI's subparsers."""
    g = sub.add_parser("gpu-check", help="parity on CUDA against float64 and timings against Liger and TRL",
                       description="On a CUDA GPU (about 8 minutes on one H100): every implementation against the "
                                   "float64 reference at N=4096, V=151936, bf16 and fp32, every preset (loss and "
                                   "gradients, the three-way rule), then fwd+bwd timings of vcrd's Triton paths "
                                   "against Liger's and TRL's kernels at the README's shapes. Writes "
                                   "gpu_check.json and gpu_check.md. Exit 1 if a check fails, 2 without CUDA.")
    g.add_argument("--out", default="runs/gpu-check", help="output folder (default runs/gpu-check)")
    g.add_argument("--interpret", action="store_true",
                   help="the same code at tiny sizes on CPU under the Triton interpreter (parity only)")
    g.add_argument("--quick", action="store_true", help="the parity suite only, no timings")
    g.set_defaults(func=gpu_check)

