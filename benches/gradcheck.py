"""Check the gradient a benchmark timed against the float64 reference (``vcrd.core.reference``).

    python benches/gradcheck.py        # the checker's self-test (small inputs, about a minute on 2 cores)

Every benchmarked provider computes the same quantity, the mean of a per-row loss over the batch:
naive PyTorch, TRL (beta=0) and Liger (beta=0) compute forward KL averaged over the non-ignored
rows, which is vcrd's preset ``kd``; vcrd's providers compute their own preset. The oracle is
``reference.vcrd_loss`` of that preset in float64, differentiated by autograd.

Why a subset of rows is exact (SPEC §4–6). The weights are detached and a row's window is causal
(rows ``j <= r`` of the same sequence with ``step_ids[j] >= step_ids[r] - window_steps``), so under
``reduction="sum"`` the gradient of row r is ``w_r · ∂D_r/∂s_r``: it depends on row r's logits and
on the per-row statistics of the rows of r's window, nothing else. Running the reference on rows
``lo..b-1``, where ``lo`` is the first row any window of rows ``a..b-1`` reaches, therefore gives
the gradient of rows ``a..b-1`` exactly (up to float64 rounding; the rows ``lo..a-1`` are
discarded). The timed ``"mean"`` gradient is that divided by ``Z``: the number of non-ignored
rows (``normalize="tokens"``) or ``Σ_valid w_val·w_dc`` (``"weights"``, clamped as in §6), which
needs every row's weights: it is summed over the whole batch in chunks, each from the reference's
own statistics (``return_stats=True``) on the chunk widened to ``lo`` the same way. ``Z`` never
comes from the implementation under test.

- Logits in (``bench_logits.py``): the gradient of the first and of the last ``rows`` rows (96 by
  default; the last block's windows depend on everything the fast path carried across its 64-row
  chunks), and ``Z`` over the whole batch.
- Hidden states in (``compare.py``): every row. The reference computes the float64 logits chunk by
  chunk, and with ``G`` the reference gradient of a chunk's logits, ``grad_hidden = G @ W`` and
  ``grad_weight = Σ_chunks Gᵀ @ hidden`` (chain rule of ``logits = hidden @ Wᵀ``): both gradients
  of the fused loss, checked in full.

Metric: ``max |got - ref| / max |ref|`` over the checked entries (NaN or inf → inf). Tolerance
``TOL = 1e-4`` for fp32: the entries are ``w·(p - q)/Z`` and ``p = exp(s - lse)`` with
``|s - lse| ≲ 100`` for these std-10 logits, so fp32 rounding (2^-24 ≈ 6e-8 relative) of the
exponent's argument gives at most ≈ 6e-6 relative error per entry, and the fp32 GEMMs of the
fused providers add ≈ 1e-6 to the logits (H ≤ 512 terms); measured errors are 1e-6 to 5e-6
(every provider, V from 8000 to 151936, H 512).
1e-4 leaves more than 10× headroom over that bound, while every error that changes training is
far above it: a halved gradient is 0.5, a 1 % wrong ``Z`` is 1e-2, a weight computed over the
wrong window or a dropped row is ≥ 1e-3. :func:`self_test` shows the checker passing vcrd's real
gradients and failing each of those, and that the chunked, widened reference equals the
whole-batch reference to 1e-12.
"""

from __future__ import annotations

import math
import os
import time
from typing import Callable, Dict, List, Optional, Tuple

import torch

from vcrd import VCRDConfig

try:
    from vcrd import reference
except ImportError:  # vcrd/__init__ does not export it (yet)
    import vcrd.core.reference as reference

TOL = 1e-4
# bf16 inputs: the three-way rule of DESIGN.md against PyTorch itself in bf16 (check_fused's ``base``), with
# this margin relative to max |reference| (Cut Cross-Entropy's bf16 value, as vcrd gpu-check uses)
TOL_BY_DTYPE = {"fp32": TOL, "bf16": 1e-2}
ROWS = int(os.environ.get("VCRD_BENCH_GRAD_ROWS", 96))  # rows per checked block, logits benchmark
# memory the float64 reference may use for one chunk (it holds ~9 [rows, V] fp64 tensors with grad)
BUDGET = int(os.environ.get("VCRD_BENCH_REF_BUDGET_MB", 4096)) * 2**20
Logits = Callable[[int, int], Tuple[torch.Tensor, torch.Tensor]]  # (lo, hi) → fp64 student, teacher logits


def config(preset) -> VCRDConfig:
    return preset if isinstance(preset, VCRDConfig) else VCRDConfig.preset(preset)


def window_lo(cfg: VCRDConfig, steps: torch.Tensor, a: int) -> int:
    """First row whose statistics can enter the window of any row ``>= a`` (one packed sequence,
    non-decreasing ``steps``): the weights of rows ``a..`` are exact on rows ``lo..``."""
    if not cfg.correction or cfg.window_steps is None:
        return a
    return int(torch.searchsorted(steps, steps[a] - cfg.window_steps))


def max_overlap(cfg: VCRDConfig, steps: torch.Tensor) -> int:
    if not cfg.correction or cfg.window_steps is None:
        return 0
    lo = torch.searchsorted(steps, steps - cfg.window_steps)
    return int((torch.arange(steps.numel()) - lo).max())


def check_layout(y: torch.Tensor, steps: torch.Tensor) -> None:
    if y.dim() != 1 or steps.shape != y.shape or bool((steps[1:] < steps[:-1]).any()):
        raise ValueError("the gradient check expects one packed sequence: 1-D labels, non-decreasing step_ids")


def chunk_rows(V: int, overlap: int, per_elem: int = 9 * 8) -> int:
    """New rows per reference chunk so that ``(rows + overlap) · V`` fp64 temporaries fit ``BUDGET``."""
    return max(32, BUDGET // (per_elem * V) - overlap)


def normalizer(logits: Logits, y: torch.Tensor, steps: torch.Tensor, preset) -> float:
    """``Z`` of SPEC §6 for the whole batch (no ``num_items_in_batch``), from the reference only."""
    cfg = config(preset)
    check_layout(y, steps)
    valid = y != cfg.ignore_index
    n_valid = int(valid.sum())
    if n_valid == 0:
        return 1.0  # all-ignored: the loss and every gradient are 0
    if cfg.normalize == "tokens":
        return float(n_valid)
    N = y.numel()
    total = torch.zeros((), dtype=torch.float64)
    step = chunk_rows(logits(0, 1)[0].shape[-1], max_overlap(cfg, steps), per_elem=8 * 8)
    for a in range(0, N, step):
        b = min(N, a + step)
        lo = window_lo(cfg, steps, a)
        s, u = logits(lo, b)
        with torch.no_grad():
            _, st = reference.vcrd_loss(s, u, y[lo:b], step_ids=steps[lo:b], config=cfg, reduction="sum",
                                        return_stats=True)
        w = (st.w_val * st.w_dc).double()[a - lo:]
        total += torch.where(valid[a:b], w, 0).sum()
    return max(float(total), 1e-6 * n_valid)


def block_grad(logits: Logits, y: torch.Tensor, steps: torch.Tensor, preset, a: int, b: int) -> torch.Tensor:
    """float64 ``∂(Σ_r loss_r)/∂s`` of rows ``a..b-1`` (divide by ``Z`` for the ``"mean"`` gradient)."""
    cfg = config(preset)
    lo = window_lo(cfg, steps, a)
    s, u = logits(lo, b)
    s = s.detach().requires_grad_()
    reference.vcrd_loss(s, u, y[lo:b], step_ids=steps[lo:b], config=cfg, reduction="sum").backward()
    return s.grad[a - lo:]


class Errors:
    """Running ``max |got - ref|`` and ``max |ref|`` over blocks; ``rel`` is their ratio (NaN → inf)."""

    def __init__(self) -> None:
        self.err, self.scale = 0.0, 0.0

    def add(self, got: torch.Tensor, ref: torch.Tensor, rows: int = 4096) -> None:
        for i in range(0, got.shape[0], rows):  # bounded fp64 temporaries for [V, H] weight gradients
            g, r = got[i:i + rows].double(), ref[i:i + rows].double()
            e = (g - r).abs().max().item() if g.numel() else 0.0
            self.err = math.inf if not math.isfinite(e) else max(self.err, e)
            self.scale = max(self.scale, r.abs().max().item() if r.numel() else 0.0)

    @property
    def rel(self) -> float:
        if self.scale == 0.0:
            return 0.0 if self.err == 0.0 else math.inf
        return self.err / self.scale


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    e = Errors()
    e.add(got, ref)
    return e.rel


def verdict(rel: float, tol: float = TOL) -> str:
    return "pass" if rel <= tol else "FAIL"  # NaN/inf compare False: FAIL


def check_logits(grad: Optional[torch.Tensor], s: torch.Tensor, u: torch.Tensor, y: torch.Tensor,
                 steps: torch.Tensor, preset, rows: int = ROWS, z_cache: Optional[Dict] = None) -> Dict:
    """Check the timed ``"mean"`` gradient w.r.t. the student logits ``s [N, V]`` (fp32).

    Rows ``0..rows-1`` and ``N-rows..N-1`` against the reference; ``Z`` over the whole batch
    (cached in ``z_cache`` by shape and preset: it is one scalar, and the costly part)."""
    cfg = config(preset)
    check_layout(y, steps)
    s, u = s.detach(), u.detach()
    N = y.numel()
    t0 = time.perf_counter()

    def logits(lo, hi):
        return s[lo:hi].double(), u[lo:hi].double()

    key = (tuple(s.shape), str(cfg), int(y.sum()), float(s[0, 0]))
    Z = z_cache.get(key) if z_cache is not None else None
    if Z is None:
        Z = normalizer(logits, y, steps, cfg)
        if z_cache is not None:
            z_cache[key] = Z
    blocks = [(0, N)] if N <= 2 * rows else [(0, rows), (N - rows, N)]
    errors = Errors()
    if grad is None:
        errors.err = math.inf
    else:
        for a, b in blocks:
            errors.add(grad[a:b], block_grad(logits, y, steps, cfg, a, b) / Z)
    return dict(grad_check=verdict(errors.rel), grad_rel_err=errors.rel, grad_tol=TOL,
                grad_reference=preset if isinstance(preset, str) else str(cfg),
                grad_rows=", ".join(f"{a}-{b - 1}" for a, b in blocks) + f" of {N}",
                grad_check_s=time.perf_counter() - t0)


def fused_reference(hs, ws, ht, wt, y, steps, presets: List, base: bool = False) -> Dict:
    """float64 gradients of the ``"mean"`` loss w.r.t. the student hidden states and LM head, every
    row, for each preset: ``{preset: dict(grad_h [N, H], grad_W [V, H], Z)}`` (no bias).

    ``base=True``: instead, PyTorch itself in the inputs' dtype (bf16/fp16), the "base" of DESIGN.md's
    three-way rule: both logits made by GEMMs in that dtype (rounded there), SPEC's formulas
    (``vcrd.core.reference``) in float32 on them, the logits' gradient rounded back to the dtype (as
    autograd does at the ``.float()`` boundary) before the two backward GEMMs in that dtype, whose
    products are summed over chunks in float64 (a little kinder than one GEMM over every row)."""
    check_layout(y, steps)
    cfgs = {p: config(p) for p in presets}
    N, V = y.numel(), ws.shape[0]
    gemm = hs.dtype if base else torch.float64
    compute = torch.float32 if base else torch.float64
    hs_, ht_, ws_, wt_ = (x.detach().to(gemm) for x in (hs, ht, ws, wt))
    out = {p: dict(grad_h=torch.zeros(hs.shape, dtype=torch.float64), grad_W=torch.zeros(ws.shape, dtype=torch.float64),
                   Z=0.0) for p in presets}
    zsum = {p: torch.zeros((), dtype=torch.float64) for p in presets}
    overlap = max(max_overlap(c, steps) for c in cfgs.values())
    step = chunk_rows(V, overlap, per_elem=12 * 8)  # the reference's tensors, both logits, their copy, G
    for a in range(0, N, step):
        b = min(N, a + step)
        lo_all = min(window_lo(c, steps, a) for c in cfgs.values())
        s_all, u_all = (hs_[lo_all:b] @ ws_.T).to(compute), (ht_[lo_all:b] @ wt_.T).to(compute)
        for p, cfg in cfgs.items():
            lo = window_lo(cfg, steps, a)
            s = s_all[lo - lo_all:].clone().requires_grad_()
            loss, st = reference.vcrd_loss(s, u_all[lo - lo_all:], y[lo:b], step_ids=steps[lo:b], config=cfg,
                                           reduction="sum", return_stats=True)
            loss.backward()
            G = s.grad[a - lo:].to(gemm)
            out[p]["grad_h"][a:b] = G @ ws_
            out[p]["grad_W"] += G.T @ hs_[a:b]
            zsum[p] += torch.where(y[a:b] != cfg.ignore_index, (st.w_val * st.w_dc).double()[a - lo:], 0).sum()
            del s, loss, st, G
        del s_all, u_all
    for p, cfg in cfgs.items():
        n_valid = int((y != cfg.ignore_index).sum())
        Z = 1.0 if n_valid == 0 else float(n_valid) if cfg.normalize == "tokens" else \
            max(float(zsum[p]), 1e-6 * n_valid)
        out[p]["grad_h"] /= Z
        out[p]["grad_W"] /= Z
        out[p]["Z"] = Z
    return out


def check_fused(grad_h: Optional[torch.Tensor], grad_W: Optional[torch.Tensor], ref: Dict, tol: float = TOL,
                base: Optional[Dict] = None) -> Dict:
    """Timed fused-linear gradients against :func:`fused_reference`'s entry for the provider's preset.

    Without ``base``: ``max |error| / max |ref| <= tol`` for both gradients. With ``base`` (the
    ``base=True`` entry of :func:`fused_reference`, for bf16/fp16 inputs): DESIGN.md's three-way rule,
    ``max |error| <= 2 · max |base - ref| + tol · max |ref|`` for each gradient (``tol``: 1e-2 for
    bf16), i.e. no worse than PyTorch itself in that dtype, up to a margin."""
    checks = {}
    for name, got, key in (("hidden", grad_h, "grad_h"), ("weight", grad_W, "grad_W")):
        e = Errors()
        if got is None:
            e.err = math.inf
        else:
            e.add(got, ref[key])
        bound = tol * e.scale
        if base is not None:
            b = Errors()
            b.add(base[key], ref[key])
            bound += 2 * b.err
            checks[f"grad_rel_err_base_{name}"] = b.rel
        checks[name] = (e, e.err <= bound)  # NaN/inf compare False
    rel = max(checks["hidden"][0].rel, checks["weight"][0].rel)
    out = dict(grad_check="pass" if checks["hidden"][1] and checks["weight"][1] else "FAIL", grad_rel_err=rel,
               grad_rel_err_hidden=checks["hidden"][0].rel, grad_rel_err_weight=checks["weight"][0].rel, grad_tol=tol,
               grad_rule="three-way" if base is not None else "relative")
    out.update({k: v for k, v in checks.items() if k.startswith("grad_rel_err_base")})
    return out


def cell(row: Dict) -> str:
    """The report's "grad check" cell."""
    if "grad_check" not in row:
        return "–"
    if "grad_rel_err_base_hidden" in row:
        return (f"{row['grad_check']} (h {row['grad_rel_err_hidden']:.1e}, W {row['grad_rel_err_weight']:.1e}; "
                f"PyTorch in bf16: h {row['grad_rel_err_base_hidden']:.1e}, W {row['grad_rel_err_base_weight']:.1e})")
    if "grad_rel_err_weight" in row:
        return (f"{row['grad_check']} (h {row['grad_rel_err_hidden']:.1e}, W {row['grad_rel_err_weight']:.1e})")
    return f"{row['grad_check']} ({row['grad_rel_err']:.1e})"


# ----------------------------------------------------------------------------------------------
# self-test: the checker passes vcrd's real gradients, fails wrong ones, and its pieces are exact

def _small_logits(N=300, V=257, seed=0):
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(N, V, generator=g) * 10
    s = 0.8 * u + torch.randn(N, V, generator=g) * 6
    y = u.argmax(-1)
    y[torch.rand(N, generator=g) < 0.1] = -100
    return s, u, y, torch.arange(N) // 7  # 7-row steps: a 4-step window spans up to 34 earlier rows


def self_test(verbose: bool = True) -> List[str]:
    """Raise ``AssertionError`` if the checker could not fail (or wrongly fails); return the report lines."""
    from vcrd import fused_linear_vcrd_loss, vcrd_loss

    global BUDGET
    lines = []

    def say(msg):
        lines.append(msg)
        if verbose:
            print(f"[gradcheck self-test] {msg}", flush=True)

    saved = BUDGET
    BUDGET = 9 * 8 * 257 * 80  # force several chunks of the widened reference (64 new rows each at V=257)
    try:
        s, u, y, steps = _small_logits()
        N = y.numel()
        for preset in ("kd", "vcrd"):
            # (1) exactness: the block method and chunked Z equal the whole-batch float64 mean gradient
            x = s.double().requires_grad_()
            reference.vcrd_loss(x, u.double(), y, step_ids=steps, config=preset).backward()
            full = x.grad

            def logits(lo, hi):
                return s[lo:hi].double(), u[lo:hi].double()

            Z = normalizer(logits, y, steps, preset)
            gap = max((block_grad(logits, y, steps, preset, a, b) / Z - full[a:b]).abs().max().item()
                      for a, b in [(0, 48), (130, 190), (N - 48, N)])
            assert gap <= 1e-12 * full.abs().max().item(), f"{preset}: block method off by {gap}"
            say(f"{preset}: widened blocks + chunked Z = whole-batch fp64 gradient (max gap {gap:.1e})")
            # (2) vcrd's real fp32 gradient passes; wrong ones fail
            xs = s.clone().requires_grad_()
            last = int((y != -100).nonzero()[-1])
            vcrd_loss(xs, u, y, step_ids=steps, config=preset, impl="torch").backward()
            good = check_logits(xs.grad, s, u, y, steps, preset, rows=48)
            assert good["grad_check"] == "pass", good
            wrong = {"halved": xs.grad * 0.5, "Z off by 1%": xs.grad * 1.01,
                     "NaN in one entry": xs.grad.clone().index_fill_(0, torch.tensor([N - 1]), float("nan")),
                     "last valid row dropped": xs.grad.clone().index_fill_(0, torch.tensor([last]), 0.0)}
            if preset == "vcrd":
                xw = s.clone().requires_grad_()
                vcrd_loss(xw, u, y, step_ids=steps, config=VCRDConfig.preset("vcrd", window_steps=2),
                          impl="torch").backward()
                wrong["window of 2 steps, not 4"] = xw.grad
            else:
                wrong["mean over all N rows, ignored ones included"] = xs.grad * (y != -100).sum() / N
            fails = {k: check_logits(g, s, u, y, steps, preset, rows=48) for k, g in wrong.items()}
            for k, r in fails.items():
                assert r["grad_check"] == "FAIL", (preset, k, r)
            say(f"{preset}: vcrd fp32 gradient passes (rel err {good['grad_rel_err']:.1e}); flagged: "
                + ", ".join(f"{k} ({r['grad_rel_err']:.1e})" for k, r in fails.items()))

        # (3) fused linear: the chunked reference equals autograd through float64 hidden states
        g = torch.Generator().manual_seed(1)
        N, H, V = 300, 32, 257
        hs, ht = torch.randn(N, H, generator=g), torch.randn(N, H, generator=g)
        ws = torch.randn(V, H, generator=g) * (10 / H ** 0.5)
        wt = ws + torch.randn(V, H, generator=g) * (5 / H ** 0.5)
        ht = hs + 0.5 * ht
        refs = fused_reference(hs, ws, ht, wt, y, steps, ["kd", "vcrd"])
        for preset in ("kd", "vcrd"):
            h64, w64 = hs.double().requires_grad_(), ws.double().requires_grad_()
            reference.vcrd_loss(h64 @ w64.T, ht.double() @ wt.double().T, y, step_ids=steps,
                                config=preset).backward()
            gap = max(rel_err(refs[preset]["grad_h"], h64.grad), rel_err(refs[preset]["grad_W"], w64.grad))
            assert gap <= 1e-12, f"{preset}: chunked fused reference off by {gap}"
            a, b = hs.clone().requires_grad_(), ws.clone().requires_grad_()
            fused_linear_vcrd_loss(a, b, ht, wt, y, step_ids=steps, config=preset, impl="torch").backward()
            good = check_fused(a.grad, b.grad, refs[preset])
            assert good["grad_check"] == "pass", good
            row0 = int((y != -100).nonzero()[0])
            bad = {"grad_weight halved": check_fused(a.grad, b.grad * 0.5, refs[preset]),
                   "one row of grad_hidden zeroed": check_fused(a.grad.clone().index_fill_(0, torch.tensor([row0]),
                                                                                        0.0), b.grad, refs[preset]),
                   "grad_weight missing": check_fused(a.grad, None, refs[preset])}
            for k, r in bad.items():
                assert r["grad_check"] == "FAIL", (preset, k, r)
            say(f"fused {preset}: chunked reference = whole-batch fp64 (rel gap {gap:.1e}); vcrd passes "
                f"({cell(good)}); flagged: " + ", ".join(f"{k} ({r['grad_rel_err']:.1e})" for k, r in bad.items()))
            # (4) bf16: the three-way rule against PyTorch in bf16 passes vcrd's bf16 mode and flags wrong ones
            h16, w16 = hs.bfloat16().requires_grad_(), ws.bfloat16().requires_grad_()
            ht16, wt16 = ht.bfloat16(), wt.bfloat16()
            ref16 = fused_reference(h16, w16, ht16, wt16, y, steps, [preset])[preset]
            base16 = fused_reference(h16, w16, ht16, wt16, y, steps, [preset], base=True)[preset]
            fused_linear_vcrd_loss(h16, w16, ht16, wt16, y, step_ids=steps, config=preset, impl="torch").backward()
            tol16 = TOL_BY_DTYPE["bf16"]
            good = check_fused(h16.grad, w16.grad, ref16, tol16, base16)
            assert good["grad_check"] == "pass", good
            bad = {"grad_weight halved": check_fused(h16.grad, w16.grad * 0.5, ref16, tol16, base16),
                   "grad_hidden zeroed": check_fused(h16.grad * 0, w16.grad, ref16, tol16, base16)}
            for k, r in bad.items():
                assert r["grad_check"] == "FAIL", (preset, k, r)
            say(f"fused {preset} bf16, three-way rule: vcrd passes ({cell(good)}); flagged: "
                + ", ".join(f"{k} ({r['grad_rel_err']:.1e})" for k, r in bad.items()))
    finally:
        BUDGET = saved
    return lines


if __name__ == "__main__":
    t0 = time.perf_counter()
    self_test()
    print(f"[gradcheck self-test] ok ({time.perf_counter() - t0:.1f} s)")
