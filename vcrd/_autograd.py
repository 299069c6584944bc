"""Autograd glue: the fast paths compute the gradient during the forward pass; this attaches it.

``AttachGrad.apply(student_logits, value, grad, post_scale)`` returns ``value`` with a backward
that hands ``grad ⊙ grad_output · post_scale`` to ``student_logits``. The multiply happens in
place in ``grad``, so no second ``[N, V]`` buffer is allocated; a second backward through the same
graph is therefore refused with a clear error instead of returning a wrongly scaled gradient.
"""

from __future__ import annotations

import torch


class AttachGrad(torch.autograd.Function):
    """Carry a precomputed gradient for ``student_logits`` (shape of ``grad``)."""

    @staticmethod
    def forward(ctx, student_logits: torch.Tensor, value: torch.Tensor, grad: torch.Tensor,
                post_scale: float) -> torch.Tensor:
        ctx.save_for_backward(grad)
        ctx.post_scale = post_scale
        ctx.value_shape = value.shape
        ctx.used = False
        return value.detach().clone()

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        if ctx.used:
            raise RuntimeError("vcrd loss: backward was already run through this loss; its gradient is "
                               "scaled in place, so retain_graph=True double backward is not supported")
        ctx.used = True
        (grad,) = ctx.saved_tensors
        scale = grad_output * ctx.post_scale
        if scale.dim():  # reduction="none": one upstream value per row
            grad.mul_(scale.reshape(*ctx.value_shape, 1).to(grad.dtype))
        elif scale.device.type != "cpu" or float(scale) != 1.0:
            grad.mul_(scale.to(grad.dtype))
        return grad, None, None, None
