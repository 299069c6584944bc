"""The suite's shared helpers, in one module (tests import them from here, never from another test module).

- realistic logits, step ids, ignored rows and the three-way parity rule of DESIGN.md (``parity_check``:
  ``|impl - truth| <= 2·|base - truth| + tol[dtype]·max|truth|``), on the loss and every gradient;
- the logits-level batch and configs the CPU path, Triton and parity-helper tests share;
- starting multi-process tests without a port race (:func:`spawn`, :func:`torchrun`), vocabulary shard
  layouts and a collective counter;
- counting the bytes Triton kernels load and store under the interpreter (:class:`TrafficCounter`).

The suite runs vcrd's default settings (``torch.compile`` of the CPU path's per-chunk math, 64-row
chunks): nothing here sets a ``VCRD_*`` variable. A test that means the eager path sets
``VCRD_COMPILE=0`` itself (``monkeypatch.setenv``), and says so.

Multi-process tests: :func:`spawn` runs ``worker(rank, world, *args)`` in ``world`` spawned processes whose
gloo process group is already initialised through a rendezvous FILE in a fresh temporary folder
(``init_method="file://..."``): no port is picked in one process and bound later in another. The torchrun
environment variables (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``) are set, so the Hugging
Face Trainer / accelerate adopt the group as they would under torchrun. :func:`torchrun` runs ``torchrun
--standalone --nproc_per_node N -m MODULE ARGS`` as a subprocess (the standalone rendezvous binds port 0
itself, and the workers reuse its store: race-free too).

Traffic: every load and store of the interpreter goes through ``InterpreterBuilder.create_masked_load`` /
``create_masked_store`` (the unmasked forms call them), so wrapping those two and summing mask-true
elements × item size gives exact counts, attributed to named tensors by address.
"""

from __future__ import annotations

import datetime
import os
import subprocess
import sys
import tempfile
from collections import Counter
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch

from vcrd import VCRDConfig
from vcrd.distributed.ranks import exit_without_teardown

TOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2, torch.float64: 1e-10}


def realistic_logits(n: int, V: int, *, std: float = 10.0, agreement: float = 0.8, seed: int = 0,
                     dtype=torch.float32):
    """Student/teacher logits like trained LMs': ``randn·std`` with correlated teacher and student.

    ``agreement`` in [0, 1] mixes the student into the teacher (1 → near-equal models). Labels are
    the teacher's trace: mostly its argmax, some sampled from its distribution, some random.
    """
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(n, V, generator=g, dtype=torch.float64) * std
    noise = torch.randn(n, V, generator=g, dtype=torch.float64) * std
    s = agreement * u + (1 - agreement ** 2) ** 0.5 * noise
    pick = torch.rand(n, generator=g)
    sampled = torch.multinomial(torch.softmax(u / std * 3, -1).float(), 1, generator=g).squeeze(1)
    y = torch.where(pick < 0.5, u.argmax(-1), torch.where(pick < 0.8, sampled, torch.randint(0, V, (n,), generator=g)))
    return s.to(dtype), u.to(dtype), y


def step_ids_for(n: int, seed: int = 0, p_new: float = 0.2) -> torch.Tensor:
    """Non-decreasing step ids starting at 0 (a new step with probability ``p_new`` per token)."""
    g = torch.Generator().manual_seed(seed + 1)
    new = (torch.rand(n, generator=g) < p_new).long()
    new[:1] = 0
    return torch.cumsum(new, 0)


def ignore_some(y: torch.Tensor, frac: float = 0.2, seed: int = 0, ignore_index: int = -100) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed + 2)
    return torch.where(torch.rand(y.shape, generator=g) < frac, torch.full_like(y, ignore_index), y)


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


# ---------------------------------------------------------------------------------------------
# The three-way parity rule
# ---------------------------------------------------------------------------------------------

def base_dtype(dtype: torch.dtype) -> torch.dtype:
    """The precision of "base" for a test in ``dtype``: float64 for float64, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def parity_check(impl: torch.Tensor, base: torch.Tensor, truth: torch.Tensor, dtype: torch.dtype):
    """``(ok, message)`` for ``max|impl - truth| <= 2·max|base - truth| + tol[dtype]·max|truth|``.

    The three tensors (a loss or a gradient) come from the same, already rounded inputs:

    - ``truth``: the reference formula (``impl="reference"``) in float64.
    - ``base``: the same reference formula at the precision the implementation computes in. SPEC §1
      says every implementation computes in fp32 whatever the input dtype (bf16/fp16 logits are
      upcast before the softmax; the reference itself upcasts them), so for fp32/bf16/fp16 tests
      ``base`` is the reference run on the fp32 upcast of the (rounded) inputs, with its gradient
      kept in fp32 (:func:`base_dtype`); for fp64 tests it is fp64. ``2·|base - truth|`` therefore
      only admits the fp32 arithmetic noise of the formula itself (large where the formula is ill
      conditioned, e.g. a steep weight sigmoid), never the rounding of the inputs (shared by all
      three) and never a "the dtype is coarse" allowance: that is ``tol[dtype]``.
    - ``impl``: the implementation under test, in the test dtype (a bf16 input gives a bf16
      gradient; its output rounding, <= 2^-8 relative per rounding, is what ``tol[bf16] = 1e-2`` covers).

    ``tol[dtype]`` scales with ``max|truth|``: an absolute tolerance lets an all-zero gradient pass
    whenever the gradient is smaller than the tolerance (it did, for bf16, in the first version).
    Non-finite entries must match exactly (same NaN positions, same infinities); the bound is
    checked on the finite ones. ``tests/core/test_parity_helper.py`` proves this rejects a zeroed and a
    halved gradient for every dtype.
    """
    if impl.shape != truth.shape or base.shape != truth.shape:
        return False, f"shapes differ: impl {tuple(impl.shape)}, base {tuple(base.shape)}, truth {tuple(truth.shape)}"
    a, b, t = impl.detach().double(), base.detach().double(), truth.detach().double()
    finite = t.abs() < torch.inf  # False at NaN and ±inf
    if not torch.equal(torch.isnan(a), torch.isnan(t)) or not torch.equal(torch.where(finite, 0.0, t).nan_to_num(),
                                                                          torch.where(finite, 0.0, a).nan_to_num()):
        return False, (f"non-finite entries differ: impl has {int((~(a.abs() < torch.inf)).sum())}, truth has "
                       f"{int((~finite).sum())}")
    if not bool(finite.any()):
        return True, "no finite entries"
    err = lambda x: torch.where(finite, (x - t).abs(), 0.0).max().item()  # noqa: E731  (NaN propagates)
    e_impl, e_base = err(a), err(b)
    scale = torch.where(finite, t.abs(), 0.0).max().item()
    bound = 2 * e_base + TOL[dtype] * scale
    ok = e_impl <= bound  # False for NaN
    return ok, (f"max|impl - truth| = {e_impl:.3e} {'<=' if ok else '>'} 2·{e_base:.3e} + {TOL[dtype]:g}·{scale:.3e}"
                f" = {bound:.3e}")


def assert_parity(name: str, impl: torch.Tensor, base: torch.Tensor, truth: torch.Tensor, dtype) -> None:
    """Assert the three-way rule of :func:`parity_check` (the loss, or one gradient)."""
    ok, message = parity_check(impl, base, truth, dtype)
    assert ok, f"{name} ({dtype}): {message}"


def assert_parities(names: Sequence[str], impl: Sequence[torch.Tensor], base: Sequence[torch.Tensor],
                    truth: Sequence[torch.Tensor], dtype) -> None:
    """:func:`assert_parity` for a loss and every gradient (all of them: a missing one fails)."""
    assert len(names) == len(impl) == len(base) == len(truth), "a loss or gradient is missing"
    for name, a, b, c in zip(names, impl, base, truth):
        assert_parity(name, a, b, c, dtype)


def upstream_gradient(shape: torch.Size, seed: int = 9) -> torch.Tensor:
    """A random upstream gradient (float64): magnitudes in [0.5, 1.5] with random signs, so it is
    never 1 and never near 0 (a near-zero upstream value would hide an error in its row)."""
    g = torch.Generator().manual_seed(seed)
    magnitude = torch.rand(shape, generator=g, dtype=torch.float64) + 0.5
    sign = torch.where(torch.rand(shape, generator=g) < 0.5, -1.0, 1.0).to(torch.float64)
    return magnitude * sign


def run_with_grads(fn: Callable[..., torch.Tensor], leaves: List[Optional[torch.Tensor]], upstream: Optional[str],
                   seed: int = 9) -> List[torch.Tensor]:
    """``[loss, grad of each leaf]``: ``fn(*leaves)`` backpropagated with a random upstream gradient
    (``upstream="random"``) or ones. ``leaves`` are made leaves that require grad (None stays None)."""
    leaves = [None if t is None else t.detach().clone().requires_grad_() for t in leaves]
    loss = fn(*leaves)
    g = upstream_gradient(loss.shape, seed) if upstream == "random" else torch.ones(loss.shape, dtype=torch.float64)
    loss.backward(g.to(loss.dtype))
    return [loss.detach()] + [t.grad for t in leaves if t is not None]


def logits_three_way(s: torch.Tensor, u: torch.Tensor, y: torch.Tensor, cfg, *, step_ids=None, reduction="mean",
                     upstream: Optional[str] = "random", impl: str = "torch", check: bool = True, seed: int = 9,
                     **kw) -> Dict[str, List[torch.Tensor]]:
    """Loss and student-logit gradient of ``vcrd_loss``: ``impl`` in the dtype of ``s`` and ``u``
    (already rounded), against the reference in float64 (truth) and at :func:`base_dtype` (base),
    all on the same rounded inputs and with the same random upstream gradient; then the three-way
    rule on the loss and the gradient. Returns ``{"impl", "base", "truth": [loss, grad]}``."""
    from vcrd import vcrd_loss

    dtype = s.dtype
    out = {}
    for name, run_dtype, which in [("impl", dtype, impl), ("base", base_dtype(dtype), "reference"),
                                   ("truth", torch.float64, "reference")]:
        fn = lambda x, which=which, run_dtype=run_dtype: vcrd_loss(  # noqa: E731
            x, u.to(run_dtype), y, step_ids=step_ids, config=cfg, reduction=reduction, impl=which, **kw)
        out[name] = run_with_grads(fn, [s.to(run_dtype)], upstream, seed)
    if check:
        assert_parities(("loss", "grad"), out["impl"], out["base"], out["truth"], dtype)
    return out


LOGITS_CONFIGS = {  # the configs of the logits-level parity tests (CPU path, Triton, helper)
    "kd": VCRDConfig.preset("kd"),
    "discord": VCRDConfig.preset("discord"),
    "vcrd": VCRDConfig.preset("vcrd"),
    "rkl-expected": VCRDConfig(divergence="rkl", validity="expected"),
    "jsd0.3-T2-ce": VCRDConfig(divergence="jsd", beta=0.3, temperature=2.0, ce_weight=0.5),
    "fkl-T2-tokens": VCRDConfig(temperature=2.0, normalize="tokens", window_steps=1),
}


def batch(N=63, V=1271, std=10.0, agreement=0.8, dtype=torch.float32, B=None, seed=0):
    s, u, y = realistic_logits(N, V, std=std, agreement=agreement, seed=seed)
    y = ignore_some(y, seed=seed)
    steps = step_ids_for(N, seed=seed)
    if B:
        s, u, y = s.reshape(B, N // B, V), u.reshape(B, N // B, V), y.reshape(B, N // B)
        steps = torch.stack([step_ids_for(N // B, seed=seed + b) for b in range(B)])
    return s.to(dtype), u.to(dtype), y, steps


def three_way(s, u, y, steps, cfg, reduction="mean", upstream="random", impl="torch", **kw):
    """Loss and gradient: ``impl`` in the input dtype vs the reference in fp64 (truth) and fp32
    (base), random upstream gradient (:func:`parity_check` documents the rule)."""
    return logits_three_way(s, u, y, cfg, step_ids=steps, reduction=reduction, upstream=upstream, impl=impl, **kw)


TIMEOUT_S = 120  # a collective waiting longer than this fails the test instead of hanging it


def _spawned_entry(rank: int, worker: Callable, world: int, init_method: str, args: tuple) -> None:
    import torch.distributed as dist

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      VCRD_COMPILE="0")  # the eager CPU path: no torch.compile in every worker
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=TIMEOUT_S))
    try:
        worker(rank, world, *args)
    except BaseException:
        dist.destroy_process_group()
        raise
    # a gloo group that DDP used can abort the interpreter's teardown (SIGABRT after a complete run:
    # vcrd.distributed.ranks.exit_without_teardown says why); end the worker as the CLI does
    exit_without_teardown(0)


def spawn(worker: Callable, world: int, *args) -> None:
    """Run ``worker(rank, world, *args)`` (a module-level function) on ``world`` gloo ranks; raises if any
    rank fails."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory(prefix="vcrd-rdzv-") as folder:
        init = f"file://{os.path.join(folder, 'rendezvous')}"
        mp.start_processes(_spawned_entry, args=(worker, world, init, args), nprocs=world, join=True,
                           start_method="spawn")


def torchrun(nproc: int, module: str, args: Sequence[str], *, env: Optional[Dict[str, str]] = None,
             timeout: float = 300, cwd: Optional[str] = None) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node nproc -m module *args`` with this interpreter; its output
    captured (text). One torch thread per worker; ``env`` adds variables."""
    full = {**os.environ, "OMP_NUM_THREADS": "1", "VCRD_COMPILE": "0", "PYTHONUNBUFFERED": "1", **(env or {})}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", module, *args]
    return subprocess.run(command, env=full, capture_output=True, text=True, timeout=timeout, cwd=cwd)


def shard_layout(world: int, V: int, mode: str):
    """``[(start, width)]`` per rank: ``"even"`` splits (first shards one wider), ``"reversed"`` gives rank 0
    the last columns, ``"padded"`` gives every shard ceil(V/world) columns (the last runs past V)."""
    if mode == "padded":
        w = -(-V // world)
        return [(r * w, w) for r in range(world)]
    sizes = [V // world + (r < V % world) for r in range(world)]
    starts = [sum(sizes[:r]) for r in range(world)]
    spans = list(zip(starts, sizes))
    return spans[::-1] if mode == "reversed" else spans


class CollectiveCounter:
    """Wraps ``dist.all_reduce`` and ``dist.all_gather_object`` and counts the calls."""

    def __init__(self, dist):
        self.dist, self.counts = dist, {"all_reduce": 0, "all_gather_object": 0}
        self.orig = {name: getattr(dist, name) for name in self.counts}
        for name in self.counts:
            setattr(dist, name, self._wrap(name))

    def _wrap(self, name):
        def call(*args, **kwargs):
            self.counts[name] += 1
            return self.orig[name](*args, **kwargs)
        return call

    def reset(self):
        for name in self.counts:
            self.counts[name] = 0

    def restore(self):
        for name, fn in self.orig.items():
            setattr(self.dist, name, fn)


class TrafficCounter:
    """``with TrafficCounter(s=s, u=u, grad=g) as t: ...`` then ``t.read["s"]``, ``t.written["grad"]`` (bytes)."""

    def __init__(self, **tensors: torch.Tensor) -> None:
        self.regions: Dict[str, tuple] = {
            name: (t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()) for name, t in tensors.items()
        }
        self.read: Counter = Counter()
        self.written: Counter = Counter()

    def _count(self, counter: Counter, ptrs, mask, itemsize: int) -> None:
        addr = np.asarray(ptrs.data).astype(np.uint64)
        live = np.broadcast_to(np.asarray(mask.data, dtype=bool), addr.shape)
        counter["total"] += int(live.sum()) * itemsize
        for name, (lo, hi) in self.regions.items():
            counter[name] += int((live & (addr >= lo) & (addr < hi)).sum()) * itemsize

    def __enter__(self) -> TrafficCounter:
        from triton.runtime import interpreter

        builder = interpreter.InterpreterBuilder
        self._saved = builder.create_masked_load, builder.create_masked_store
        load, store = self._saved
        counter = self

        def itemsize(ptrs) -> int:
            return np.dtype(interpreter._get_np_dtype(ptrs.get_element_ty())).itemsize

        # the trailing cache/eviction arguments differ between triton versions (3.9: cache_policy,
        # is_volatile; 3.8: cache_modifier, eviction_policy, is_volatile): passed on as they come
        def masked_load(b, ptrs, mask, *rest):
            counter._count(counter.read, ptrs, mask, itemsize(ptrs))
            return load(b, ptrs, mask, *rest)

        def masked_store(b, ptrs, value, mask, *rest):
            counter._count(counter.written, ptrs, mask, itemsize(ptrs))
            return store(b, ptrs, value, mask, *rest)

        builder.create_masked_load, builder.create_masked_store = masked_load, masked_store
        return self

    def __exit__(self, *exc) -> None:
        from triton.runtime import interpreter

        builder = interpreter.InterpreterBuilder
        builder.create_masked_load, builder.create_masked_store = self._saved
