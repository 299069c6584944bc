"""A served teacher in vLLM's format (``prompt_logprobs``: per position ``{token_id: Logprob}``) becomes a
``SparseTeacher`` and trains: checked against a dump made by hand and an oracle written here."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import pytest
import torch

from vcrd import SparseTeacher, sparse_vcrd_loss
from vcrd.core import reference


@dataclass
class Logprob:  # the shape of vllm.sequence.Logprob
    logprob: float
    rank: int
    decoded_token: str


def vllm_dump(logq: torch.Tensor, labels: torch.Tensor, k: int, form: str):
    """What vLLM returns for prompt_logprobs=k: the top-k per position plus the actual token when it is
    outside them (rank > k), in one of the three forms vcrd reads."""
    positions = []
    for r in range(logq.shape[0]):
        order = sorted(range(logq.shape[1]), key=lambda v: (-float(logq[r, v]), v))
        rank = {v: i + 1 for i, v in enumerate(order)}
        chosen = order[:k] + ([int(labels[r])] if rank[int(labels[r])] > k else [])
        entry = {}
        for v in chosen:
            lp = float(logq[r, v])
            if form == "object":
                entry[v] = Logprob(lp, rank[v], f"t{v}")
            elif form == "json":
                entry[str(v)] = {"logprob": lp, "rank": rank[v], "decoded_token": f"t{v}"}
            else:
                entry[str(v)] = lp
        positions.append(entry)
    if form == "json":
        positions = json.loads(json.dumps([None, *positions]))[1:]  # as read back from a JSON dump
    return positions


@pytest.mark.parametrize("form", ["object", "json", "number"])
def test_from_vllm_keeps_the_top_k_and_puts_the_rest_in_the_tail(form):
    g = torch.Generator().manual_seed(0)
    N, V, k = 37, 53, 5
    logq = torch.log_softmax(torch.randn(N, V, generator=g, dtype=torch.float64) * 3, -1)
    labels = torch.randint(0, V, (N,), generator=g)
    teacher = SparseTeacher.from_vllm(vllm_dump(logq, labels, k, form), k=k)
    for r in range(N):
        order = sorted(range(V), key=lambda v: (-float(logq[r, v]), v))[:k]
        assert teacher.topk_ids[r].tolist() == order
        torch.testing.assert_close(teacher.topk_logprobs[r].double(), logq[r, order], rtol=0, atol=1e-6)
        rest = math.log(sum(math.exp(float(logq[r, v])) for v in range(V) if v not in order))
        assert float(teacher.tail_logprob[r]) == pytest.approx(rest, abs=1e-5)


def test_default_k_is_the_fewest_entries_and_fewer_is_refused():
    positions = [{"3": -0.1, "7": -2.5, "1": -3.0}, {"2": -0.05, "9": -3.2}]
    teacher = SparseTeacher.from_vllm(positions)
    assert teacher.k == 2 and teacher.topk_ids.tolist() == [[3, 7], [2, 9]]
    with pytest.raises(ValueError, match=r"positions\[1\]: has 2 entries, fewer than k=3"):
        SparseTeacher.from_vllm(positions, k=3)


def test_bad_dumps_name_the_position():
    with pytest.raises(ValueError, match=r"positions\[0\]: got None .*prompt_logprobs\[1:\]"):
        SparseTeacher.from_vllm([None, {"1": -0.1}])
    with pytest.raises(ValueError, match=r"log-probability \(<= 0, not NaN\), got 0.5"):
        SparseTeacher.from_vllm([{"1": 0.5}])
    with pytest.raises(TypeError, match=r"int token id .*'abc'"):
        SparseTeacher.from_vllm([{"abc": -0.1}])
    with pytest.raises(ValueError, match="non-empty dict"):
        SparseTeacher.from_vllm([{}])


def test_all_the_mass_in_the_top_k_gives_an_empty_tail():
    teacher = SparseTeacher.from_vllm([{"0": math.log(0.75), "4": math.log(0.25)}])
    assert teacher.tail_logprob.tolist() == [-math.inf]


def test_a_vllm_dump_trains_like_its_completed_teacher():
    """Round trip into a training step: the loss and gradient from the vLLM dump equal the float64
    reference run on the completed teacher written out here (top-k log-probs, the tail spread evenly)."""
    g = torch.Generator().manual_seed(1)
    N, V, k = 1031, 97, 8
    logq = torch.log_softmax(torch.randn(N, V, generator=g, dtype=torch.float64) * 4, -1)
    labels = torch.randint(0, V, (N,), generator=g)
    labels[::7] = -100
    step_ids = torch.cumsum((torch.rand(N, generator=g) < 0.2).long(), 0)
    positions = vllm_dump(logq, labels.clamp(min=0), k, "json")
    completed = torch.empty(N, V, dtype=torch.float64)
    for r in range(N):
        top = sorted(range(V), key=lambda v: (-float(logq[r, v]), v))[:k]
        rest = math.log(sum(math.exp(float(logq[r, v])) for v in range(V) if v not in top))
        completed[r] = rest - math.log(V - k)
        completed[r, top] = logq[r, top].float().double()  # the dump holds fp32 log-probs
    student = (torch.randn(N, V, generator=g, dtype=torch.float64) * 3)
    s = student.clone().requires_grad_()
    want = reference.vcrd_loss(s, completed, labels, step_ids=step_ids, config="vcrd")
    want.backward()
    x = student.float().requires_grad_()
    got = sparse_vcrd_loss(x, SparseTeacher.from_vllm(positions, k=k), labels, step_ids=step_ids, config="vcrd")
    got.backward()
    assert got.item() == pytest.approx(want.item(), rel=1e-5)
    torch.testing.assert_close(x.grad.double(), s.grad, rtol=0, atol=1e-5 * float(s.grad.abs().max()))
