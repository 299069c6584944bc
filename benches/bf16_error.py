"""Gradient error of the fused-linear losses' two GEMM modes against float64, beside plain PyTorch in bf16.

    python benches/bf16_error.py                                  # N=301, H=48, V=1031
    python benches/bf16_error.py --N 512 --H 576 --V 49152 --fused-only   # SmolLM2's head, 512 rows

Inputs: ``benches/compare.py``'s (std ~10 correlated logits, teacher-trace labels, 10 % ignored rows,
30-token steps), rounded to bf16; the same for every row. Truth: float64 GEMMs and the float64 reference
(``impl="reference"``; the sparse loss: ``sparse_vcrd_loss`` on float64 logits of the same top-64
teacher). PyTorch in bf16: ``F.linear`` in bf16, the reference formulas in fp32 autograd. Printed per
preset: max |error| / max |truth| over the gradients of the student hidden states and head
(docs/numerics.md). Eager chunk code (``VCRD_COMPILE=0`` is set here): the compiled path computes the
same formulas.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("VCRD_COMPILE", "0")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # benches.* when run as a script

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from benches.compare import make_inputs  # noqa: E402
from vcrd import VCRDConfig, fused_linear_vcrd_loss, vcrd_loss  # noqa: E402
from vcrd.core.sparse_teacher import SparseTeacher  # noqa: E402
from vcrd.distributed import fused_linear_vocab_parallel_vcrd_loss  # noqa: E402
from vcrd.loss.sparse import fused_linear_sparse_vcrd_loss, sparse_vcrd_loss  # noqa: E402


def main(N: int, H: int, V: int, fused_only: bool) -> None:
    hs, ws, ht, wt, y, steps = (x.detach() for x in make_inputs(N, H, V, dtype="bf16"))

    def grads(fn, dtype):
        h, w = hs.to(dtype).clone().requires_grad_(), ws.to(dtype).clone().requires_grad_()
        fn(h, w).backward()
        return h.grad.double(), w.grad.double()

    def rel(got, want):
        return max(((a - b).abs().max() / b.abs().max()).item() for a, b in zip(got, want))

    def errors(preset: str) -> str:
        cfg = VCRDConfig.preset(preset)
        truth = grads(lambda h, w: fused_linear_vcrd_loss(h, w, ht.double(), wt.double(), y, step_ids=steps,
                                                          config=cfg, impl="reference"), torch.float64)
        pytorch = grads(lambda h, w: vcrd_loss(F.linear(h, w).float(), F.linear(ht, wt).float(), y, step_ids=steps,
                                               config=cfg, impl="reference"), torch.bfloat16)
        line = [f"{preset}: PyTorch in bf16 {rel(pytorch, truth):.2e}"]
        for precision in ("exact", "head"):
            c = cfg.replace(gemm_precision=precision)
            fused = grads(lambda h, w, c=c: fused_linear_vcrd_loss(h, w, ht, wt, y, step_ids=steps, config=c,
                                                                   impl="torch"), torch.bfloat16)
            line.append(f"{precision}: fused {rel(fused, truth):.2e}")
            if not fused_only:
                parallel = grads(lambda h, w, c=c: fused_linear_vocab_parallel_vcrd_loss(
                    h, w, ht, wt, y, vocab_start=0, vocab_size=V, step_ids=steps, config=c), torch.bfloat16)
                line[-1] += f", vocab-parallel {rel(parallel, truth):.2e}"
        if not fused_only:  # the sparse loss against its own truth: the same top-64 teacher in float64
            teacher = SparseTeacher.from_logits(ht.double() @ wt.double().T, 64)
            sparse_truth = grads(lambda h, w: sparse_vcrd_loss(h @ w.T, teacher, y, step_ids=steps, config=cfg),
                                 torch.float64)
            for precision in ("exact", "head"):
                c = cfg.replace(gemm_precision=precision)
                sparse = grads(lambda h, w, c=c: fused_linear_sparse_vcrd_loss(h, w, teacher, y, step_ids=steps,
                                                                               config=c, impl="torch"), torch.bfloat16)
                line.append(f"sparse top-64 {precision}: {rel(sparse, sparse_truth):.2e}")
        return "; ".join(line)

    for preset in ("kd", "vcrd"):
        print(errors(preset), flush=True)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--N", type=int, default=301)
    p.add_argument("--H", type=int, default=48)
    p.add_argument("--V", type=int, default=1031)
    p.add_argument("--fused-only", action="store_true", help="only fused_linear_vcrd_loss (large shapes)")
    a = p.parse_args()
    main(a.N, a.H, a.V, a.fused_only)
