"""GPU readiness without a GPU: every kernel compiles ahead of time for sm_80 and sm_90, spill-free,
with no block-wide barrier inside the statistics and gradient loops and >= 3 statistics CTAs per SM."""

from __future__ import annotations

import os

import pytest

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1",
                                reason="ahead-of-time compilation needs the real Triton compiler, not the interpreter")


def test_ptx_counts_barriers_per_loop():
    from vcrd.app.aot import ptx_counts

    ptx = "\n".join([
        "\tbar.sync \t0;",  # before any loop
        "$L__BB0_2:", "\tld.global.v2.b32 {%r1, %r2}, [%rd1];", "\tbar.sync \t0;", "\tbar.sync \t0;",
        "\t@%p1 bra \t$L__BB0_2;",
        "\t@%p2 bra \t$L__BB0_5;",  # forward branch: not a loop
        "$L__BB0_5:", "\tcp.async.cg.shared.global [%r3], [%rd2], 16;", "\t@%p3 bra \t$L__BB0_5;",
        "\tcp.async.bulk.tensor.2d.shared::cluster.global [%r4], [%rd3, {%r5, %r6}];",
    ])
    assert ptx_counts(ptx) == {"bar_sync_per_loop": (2, 0), "instructions_per_loop": (4, 2), "bar_sync_total": 3,
                               "cp_async": 1, "tma": 1}


def test_occupancy_rules():
    from vcrd.app.aot import ctas_per_sm

    assert ctas_per_sm(90, 128, 8, 1024) == (2, "registers")  # 128 regs x 256 threads
    assert ctas_per_sm(90, 80, 8, 1024) == (3, "registers")  # 2560 regs per warp -> 25 warps
    assert ctas_per_sm(90, 72, 4, 1024) == (7, "registers")
    assert ctas_per_sm(80, 16, 4, 0) == (16, "threads")
    assert ctas_per_sm(90, 32, 4, 100 * 1024) == (2, "shared memory")


def test_every_kernel_compiles_for_sm80_and_sm90_without_spills():
    pytest.importorskip("triton", reason="triton is not installed")
    from vcrd.app.aot import compile_all, cuobjdump

    try:
        cuobjdump()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    reports = compile_all()
    kernels = {(r.kernel, r.variant, r.dtype) for r in reports}
    for dtype in ("fp32", "bf16", "fp16"):
        assert {(k, d, dtype) for k in ("stats", "grad") for d in ("fkl", "rkl", "jsd")} <= kernels
        assert ("label_logprob", "-", dtype) in kernels
        assert {(k, d, dtype) for k in ("sparse_stats", "sparse_grad") for d in ("fkl", "rkl", "jsd")} <= kernels
    assert {r.arch for r in reports} == {80, 90}
    assert all(r.registers > 0 for r in reports)
    assert [r for r in reports if r.spill_bytes] == []
    for r in reports:
        if r.kernel in ("stats", "grad", "sparse_stats", "sparse_grad"):
            assert r.bar_sync_per_loop and max(r.bar_sync_per_loop) <= 4, r
        if r.kernel in ("stats", "sparse_stats") and r.arch == 90:
            assert r.ctas_per_sm >= 3, r
