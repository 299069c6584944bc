"""Gradient error of the fused-linear losses' two GEMM modes against float64, beside plain PyTorch in bf16.

    python benches/bf16_error.py            # N=301, H=48, V=1031, std-10 logits, preset vcrd

Same bf16-rounded inputs for every row; truth: float64 GEMMs and the float64 reference
(``impl="reference"``; the sparse loss: ``sparse_vcrd_loss`` on float64 logits of the same top-64 teacher).
Printed: max |error| / max |truth| over the gradients of the student hidden states and head
(docs/numerics.md). Eager chunk code (``VCRD_COMPILE=0`` is set here): the compiled path computes the
same formulas.
"""

from __future__ import annotations

import os

os.environ.setdefault("VCRD_COMPILE", "0")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from vcrd import VCRDConfig, fused_linear_vcrd_loss, vcrd_loss  # noqa: E402
from vcrd.core.sparse_teacher import SparseTeacher  # noqa: E402
from vcrd.distributed import fused_linear_vocab_parallel_vcrd_loss  # noqa: E402
from vcrd.loss.sparse import fused_linear_sparse_vcrd_loss, sparse_vcrd_loss  # noqa: E402


def main(N: int = 301, H: int = 48, V: int = 1031) -> None:
    g = torch.Generator().manual_seed(0)
    hs = torch.randn(N, H, generator=g).bfloat16()
    ws = (torch.randn(V, H, generator=g) * 10 / H ** 0.5).bfloat16()
    ht = (hs.float() + 0.3 * torch.randn(N, H, generator=g)).bfloat16()
    wt = (ws.float() + torch.randn(V, H, generator=g) * 0.4).bfloat16()
    y = (ht.float() @ wt.float().T).argmax(-1)
    y[::7] = -100
    steps = torch.arange(N) // 20

    def grads(fn, dtype):
        h, w = hs.to(dtype).clone().requires_grad_(), ws.to(dtype).clone().requires_grad_()
        fn(h, w).backward()
        return h.grad.double(), w.grad.double()

    def rel(got, want):
        return max(((a - b).abs().max() / b.abs().max()).item() for a, b in zip(got, want))

    sparse_teacher = SparseTeacher.from_logits(ht.double() @ wt.double().T, 64)
    cfg = VCRDConfig()
    truth = grads(lambda h, w: fused_linear_vcrd_loss(h, w, ht.double(), wt.double(), y, step_ids=steps, config=cfg,
                                                      impl="reference"), torch.float64)
    sparse_truth = grads(lambda h, w: sparse_vcrd_loss(h @ w.T, sparse_teacher, y, step_ids=steps, config=cfg),
                         torch.float64)
    pytorch = grads(lambda h, w: vcrd_loss(F.linear(h, w).float(), F.linear(ht, wt).float(), y, step_ids=steps,
                                           config=cfg, impl="reference"), torch.bfloat16)
    print(f"PyTorch in bf16 (F.linear bf16, reference in fp32): {rel(pytorch, truth):.2e}")
    for precision in ("exact", "head"):
        c = cfg.replace(gemm_precision=precision)
        fused = grads(lambda h, w, c=c: fused_linear_vcrd_loss(h, w, ht, wt, y, step_ids=steps, config=c,
                                                               impl="torch"), torch.bfloat16)
        parallel = grads(lambda h, w, c=c: fused_linear_vocab_parallel_vcrd_loss(
            h, w, ht, wt, y, vocab_start=0, vocab_size=V, step_ids=steps, config=c), torch.bfloat16)
        sparse = grads(lambda h, w, c=c: fused_linear_sparse_vcrd_loss(h, w, sparse_teacher, y, step_ids=steps,
                                                                       config=c, impl="torch"), torch.bfloat16)
        print(f"gemm_precision={precision!r}: fused {rel(fused, truth):.2e}, vocab-parallel "
              f"{rel(parallel, truth):.2e}, sparse top-64 {rel(sparse, sparse_truth):.2e}")


if __name__ == "__main__":
    main()
