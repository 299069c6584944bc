"""``vocab_size=`` for the sparse-teacher losses: a student whose logits (or head) are padded beyond the
teacher's vocabulary, against the float64 reference on the first V columns and a teacher completed by
hand over V."""

from __future__ import annotations

import math

import pytest
import torch

from vcrd import SparseTeacher, fused_linear_sparse_vcrd_loss, sparse_vcrd_loss
from vcrd.core import reference

N, V, PAD, K, H = 1031, 211, 45, 16, 24


def case(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    logq = torch.log_softmax(torch.randn(N, V, generator=g, dtype=torch.float64) * 4, -1)
    top, ids = logq.topk(K, -1)
    rest = torch.logsumexp(logq.scatter(-1, ids, -math.inf), -1)
    teacher = SparseTeacher(ids, top.float(), rest.float())
    completed = (rest - math.log(V - K)).unsqueeze(-1).expand(N, V).clone()  # the tail spread evenly over V
    completed.scatter_(-1, ids, top.float().double())
    labels = torch.randint(0, V, (N,), generator=g)
    labels[::9] = -100
    steps = torch.cumsum((torch.rand(N, generator=g) < 0.2).long(), 0)
    return g, teacher, completed, labels, steps


@pytest.mark.parametrize("impl", ["torch", pytest.param("triton", marks=pytest.mark.triton)])
@pytest.mark.parametrize("preset", ["kd", "vcrd"])
def test_padded_student_logits(preset, impl):
    g, teacher, completed, labels, steps = case()
    student = torch.randn(N, V + PAD, generator=g, dtype=torch.float64) * 3
    s64 = student[:, :V].clone().requires_grad_()
    want = reference.vcrd_loss(s64, completed, labels, step_ids=steps, config=preset)
    want.backward()
    x = student.float().requires_grad_()
    got = sparse_vcrd_loss(x, teacher, labels, step_ids=steps, config=preset, vocab_size=V, impl=impl)
    got.backward()
    assert got.item() == pytest.approx(want.item(), rel=1e-5)
    torch.testing.assert_close(x.grad[:, :V].double(), s64.grad, rtol=0, atol=1e-5 * float(s64.grad.abs().max()))
    assert torch.equal(x.grad[:, V:], torch.zeros(N, PAD))  # the padded columns take no part


def test_padded_student_head():
    g, teacher, completed, labels, steps = case(1)
    hidden = torch.randn(N, H, generator=g, dtype=torch.float64)
    weight = torch.randn(V + PAD, H, generator=g, dtype=torch.float64) * 0.5
    h64, w64 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    want = reference.vcrd_loss(h64 @ w64[:V].T, completed, labels, step_ids=steps, config="vcrd")
    want.backward()
    h, w = hidden.float().requires_grad_(), weight.float().requires_grad_()
    got = fused_linear_sparse_vcrd_loss(h, w, teacher, labels, step_ids=steps, config="vcrd", vocab_size=V)
    got.backward()
    assert got.item() == pytest.approx(want.item(), rel=1e-5)
    for name, a, b in (("hidden", h.grad, h64.grad), ("weight", w.grad, w64.grad)):
        torch.testing.assert_close(a.double(), b, rtol=0, atol=1e-5 * float(b.abs().max()), msg=name)
    assert torch.equal(w.grad[V:], torch.zeros(PAD, H))


def test_bad_vocab_size_and_ids_beyond_it_are_refused():
    g, teacher, _, labels, _ = case(2)
    x = torch.randn(N, V + PAD)
    with pytest.raises(ValueError, match=r"vocab_size"):
        sparse_vcrd_loss(x, teacher, labels, vocab_size=V + PAD + 1)
    with pytest.raises(ValueError, match=r"topk_ids: expected ids in \[0, 100\)"):
        sparse_vcrd_loss(x, teacher, labels.clamp(max=99), vocab_size=100)
