"""``check_inputs=False``: the loss's hot path reads no tensor value on the host (no device sync).

Without a GPU, host reads are detected by wrapping the Python-level ways a tensor's value reaches the
host (``item``, ``tolist``, ``bool``/``float``/``int``/``index``, ``nonzero``) while the call runs;
reads made inside C++ (a data-dependent output size) are not seen here, so the code passes output
sizes explicitly (``repeat_interleave(..., output_size=N)``). On a CUDA device the same calls run under
``torch.cuda.set_sync_debug_mode("error")``. The detector is shown to see a ``.item()``, and the default
(checked) call, which does read values.
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterator, List

import pytest
import torch

from vcrd import VCRDConfig, vcrd_loss

from ..helpers import ignore_some, realistic_logits, step_ids_for

HOST_READS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "nonzero")


@contextlib.contextmanager
def host_reads() -> Iterator[List[str]]:
    """Record every Python-level read of a tensor's value on the host while the block runs."""
    calls: List[str] = []

    def recording(name, original):
        def read(*args, **kwargs):
            calls.append(name)
            return original(*args, **kwargs)
        return read

    with pytest.MonkeyPatch.context() as mp:
        for name in HOST_READS:
            mp.setattr(torch.Tensor, name, recording(name, getattr(torch.Tensor, name)))
        mp.setattr(torch, "nonzero", recording("torch.nonzero", torch.nonzero))
        yield calls


def inputs(layout: str):
    N, V = 96, 257
    s, u, y = realistic_logits(N, V)
    y = ignore_some(y)
    kw = {"step_ids": step_ids_for(N)}
    if layout == "packed":
        kw["cu_seqlens"] = torch.tensor([0, 40, 96])
    elif layout == "shifted":  # [B, T, V] rows that cannot be flattened: logits[:, :-1]
        s = torch.cat([s.reshape(4, 24, V), torch.zeros(4, 1, V)], 1)[:, :-1]
        u, y, kw = u.reshape(4, 24, V), y.reshape(4, 24), {"step_ids": step_ids_for(24).repeat(4, 1)}
    return s, u, y, kw


CASES = {
    "vcrd-packed": ("packed", dict(config="vcrd")),
    "weights-count-tensor": ("packed", dict(config="vcrd", num_items_in_batch=torch.tensor(70))),
    "tokens-shifted": ("shifted", dict(config=VCRDConfig(normalize="tokens", ce_weight=0.2))),
    "jsd-sum": ("packed", dict(config=VCRDConfig(divergence="jsd", temperature=2.0), reduction="sum")),
    "rkl-none": ("shifted", dict(config=VCRDConfig(divergence="rkl"), reduction="none")),
}


def call(case: str, impl: str = "torch", check_inputs: bool = False, backward: bool = True):
    layout, options = CASES[case]
    s, u, y, kw = inputs(layout)
    x = s.detach().clone().requires_grad_()
    loss = vcrd_loss(x, u, y, impl=impl, check_inputs=check_inputs, **kw, **options)
    if backward and loss.dim():  # a per-row loss: the backward's upstream gradient stays a tensor
        loss.backward(torch.ones_like(loss))
    return loss


@pytest.mark.parametrize("case", list(CASES))
def test_cpu_path_reads_nothing_on_the_host(case):
    reference = call(case, impl="reference", check_inputs=True, backward=False)
    call(case)  # warm up: compilation reads values, the hot path must not
    with host_reads() as calls:
        loss = call(case)
    assert calls == [], f"host reads in the hot path: {calls}"
    torch.testing.assert_close(loss.detach(), reference.detach().float(), rtol=1e-4, atol=1e-5)


def test_triton_glue_reads_nothing_on_the_host(monkeypatch):
    """The Triton backend's torch glue (weights, reduction) with the kernel launches stubbed out."""
    pytest.importorskip("triton")
    from vcrd.kernels import grad, stats

    monkeypatch.setenv("TRITON_INTERPRET", "1")  # lets impl="triton" resolve on CPU tensors; no kernel runs
    monkeypatch.setattr(stats, "launch_stats", lambda s, u, labels, *a, **k: torch.rand(s.shape[0], stats.NUM_STATS))
    monkeypatch.setattr(grad, "launch_grad", lambda *a, **k: None)
    call("vcrd-packed", impl="triton")
    with host_reads() as calls:
        call("vcrd-packed", impl="triton")
    assert calls == [], f"host reads in the Triton glue: {calls}"


def test_the_detector_sees_host_reads():
    with host_reads() as calls:
        torch.ones(3).sum().item()
    assert calls == ["item"]
    call("vcrd-packed")
    with host_reads() as calls:
        call("vcrd-packed", check_inputs=True)  # the default, checked call reads label and step values
    assert "__bool__" in calls and "__int__" in calls, calls


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (torch.cuda.set_sync_debug_mode)")
@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="the interpreter runs on CPU tensors")
@pytest.mark.parametrize("case", list(CASES))
def test_cuda_issues_no_sync(case):  # pragma: no cover - no GPU on the development machine
    layout, options = CASES[case]
    s, u, y, kw = inputs(layout)
    move = lambda t: t.cuda() if isinstance(t, torch.Tensor) else t  # noqa: E731
    x = s.cuda().requires_grad_()
    args = {k: move(v) for k, v in {**kw, **options}.items()}
    vcrd_loss(x, u.cuda(), y.cuda(), check_inputs=False, **args)
    torch.cuda.set_sync_debug_mode("error")
    try:
        vcrd_loss(x, u.cuda(), y.cuda(), check_inputs=False, **args)
    finally:
        torch.cuda.set_sync_debug_mode("default")
