"""The losses under ``torch.autocast``: they keep their own precision (fp32 logits, fp32 accumulation)."""

from __future__ import annotations

import torch

from vcrd import fused_linear_vcrd_loss, vcrd_loss


def test_fused_linear_under_autocast_equals_fp32():
    g = torch.Generator().manual_seed(0)
    N, H, V = 150, 32, 301
    h = torch.randn(N, H, generator=g).bfloat16()  # what an autocast forward hands over
    w = (torch.randn(V, H, generator=g) * 0.5).requires_grad_()
    ht, wt = torch.randn(N, H, generator=g), torch.randn(V, H, generator=g) * 0.5
    y = torch.randint(0, V, (N,), generator=g)
    y[::5] = -100
    grads = []
    for autocast in (True, False):
        x = h.clone().requires_grad_()
        w.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = fused_linear_vcrd_loss(x, w, ht, wt, y, config="vcrd", chunk_size=64)
        loss.backward()
        assert loss.dtype == torch.float32
        grads.append((loss.detach(), x.grad.float(), w.grad.clone()))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert grads[0][2].abs().max() > 0


def test_logits_loss_under_autocast_equals_fp32():
    g = torch.Generator().manual_seed(1)
    s = (torch.randn(4, 33, 257, generator=g) * 10).requires_grad_()
    u = torch.randn(4, 33, 257, generator=g) * 10
    y = torch.randint(0, 257, (4, 33), generator=g)
    out = []
    for autocast in (True, False):
        s.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = vcrd_loss(s, u, y, config="vcrd")
        loss.backward()
        out.append((loss.detach(), s.grad.clone()))
    for a, b in zip(*out):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9)
