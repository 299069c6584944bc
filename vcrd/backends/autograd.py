"""Autograd glue: the fast paths compute gradients during the forward pass; this attaches them.

``attach_grads(value, [(input, grad), ...], post_scale)`` returns ``value`` with a backward that
hands ``grad ⊙ grad_output · post_scale`` to each input. The multiply happens in place, so no
second copy of any gradient is allocated; a second backward through the same graph is therefore
refused with a clear error instead of returning a wrongly scaled gradient.
"""

from __future__ import annotations

from typing import Sequence, Tuple

import torch


class AttachGrad(torch.autograd.Function):
    """``forward(value, post_scale, n, *inputs, *grads)``: carry precomputed gradients of ``n`` inputs."""

    @staticmethod
    def forward(ctx, value: torch.Tensor, post_scale: float, n: int, *tensors: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(*tensors[n:])
        ctx.post_scale = post_scale
        ctx.value_shape = value.shape
        ctx.n = n
        ctx.used = False
        return value.detach().clone()

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        if ctx.used:
            raise RuntimeError("vcrd loss: backward was already run through this loss; its gradient is "
                               "scaled in place, so retain_graph=True double backward is not supported")
        ctx.used = True
        grads = ctx.saved_tensors
        # the scale keeps the loss's dtype (fp32 or fp64): a bf16/fp16 gradient is multiplied in
        # fp32 and rounded once, never by a scale already rounded to its own dtype
        scale = grad_output * ctx.post_scale
        for grad in grads:
            if scale.dim():  # reduction="none": one upstream value per row
                grad.mul_(scale.reshape(*ctx.value_shape, 1))
            elif scale.device.type != "cpu" or float(scale) != 1.0:
                grad.mul_(scale)
        return (None, None, None, *grads, *([None] * ctx.n))


def attach_grads(value: torch.Tensor, pairs: Sequence[Tuple[torch.Tensor, torch.Tensor]],
                 post_scale: float = 1.0) -> torch.Tensor:
    """``value`` whose backward gives each ``input`` its ``grad`` (times the upstream gradient and
    ``post_scale``)."""
    inputs, grads = zip(*pairs)
    return AttachGrad.apply(value, post_scale, len(inputs), *inputs, *grads)
