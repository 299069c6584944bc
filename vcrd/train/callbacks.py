"""Trainer callbacks for :class:`vcrd.train.trainer.VCRDTrainer`.

:class:`NonFiniteLossStop` stops training at the first micro-batch whose loss is NaN or infinite,
*before* the optimizer step that would spread it into the weights, with a
:class:`NonFiniteLossError` naming the optimizer step, the micro-batch and its data lines
(``batch["sources"]``, given by ``DistillCollator(..., with_sources=True)``). The check runs on the
loss ``training_step`` returns, so the Trainer's ``logging_nan_inf_filter`` (which replaces a NaN
loss by the running mean in the logs) never sees it. It costs one device→host sync per micro-batch.
"""

from __future__ import annotations

import math
from typing import Any, List, Optional

import torch

try:
    from transformers import TrainerCallback
except ImportError:  # pragma: no cover - transformers is a dependency
    TrainerCallback = object


class NonFiniteLossError(RuntimeError):
    """The loss of a training micro-batch was NaN or infinite (``step``, ``sources``, ``loss``)."""

    exit_code = 1

    def __init__(self, message: str, step: int, sources: Optional[List[str]], loss: float) -> None:
        super().__init__(message)
        self.step, self.sources, self.loss = step, sources, loss


class NonFiniteLossStop(TrainerCallback):
    """``trainer.add_callback(NonFiniteLossStop(trainer))``: see the module docstring.

    It wraps ``trainer.training_step`` (the only place that sees each micro-batch's loss with its
    inputs) and counts micro-batches through the callback events.
    """

    def __init__(self, trainer) -> None:
        self.trainer = trainer
        self.micro = 0
        inner = trainer.training_step

        def training_step(model, inputs, *args, **kwargs):
            loss = inner(model, inputs, *args, **kwargs)
            self.check(loss, inputs)
            return loss

        trainer.training_step = training_step

    def on_step_begin(self, args, state, control, **kwargs):
        self.micro = 0

    def check(self, loss: Any, inputs: Any) -> None:
        self.micro += 1
        value = loss.detach().float() if isinstance(loss, torch.Tensor) else torch.tensor(float(loss))
        if bool(torch.isfinite(value).all()):
            return
        value = float(value.reshape(-1)[0])
        state = self.trainer.state
        step = state.global_step + 1
        sources = inputs.get("sources") if hasattr(inputs, "get") else None
        accum = getattr(self.trainer.args, "gradient_accumulation_steps", 1)
        micro = f", micro-batch {self.micro} of {accum}" if accum > 1 else ""
        lines = ", ".join(sources) if sources else \
            "unknown (DistillCollator(..., with_sources=True) names them)"
        raise NonFiniteLossError(
            f"non-finite loss ({'nan' if math.isnan(value) else value}) at optimizer step {step}{micro}, "
            f"before its update: the weights are those of step {state.global_step}. Data lines of the batch: "
            f"{lines}. Usual causes: a learning rate too high (diverged weights), a teacher or student that "
            f"already outputs NaN, fp16 overflow", step, list(sources) if sources else None, value)
