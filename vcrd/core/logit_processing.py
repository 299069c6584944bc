"""What a model family does to its LM head's output before the softmax (SPEC §1), read from its config.

Some families scale the logits or soft-cap them; a loss computed from ``h @ W^T + b`` must apply the
same, or it trains the student on another distribution than the model's own. The attributes and
their order are TRL's (``DistillationTrainer``), so a model means the same to both libraries:

- scale ``a``: ``logit_scale`` (Cohere; ``None`` means unscaled), else ``output_multiplier``, else
  ``lm_head_multiplier`` (Falcon-H1), else ``logits_scaling`` — divided by it (Granite, MiniCPM3),
  multiplied by it for ``model_type == "hyperclovax"``; default 1.0;
- soft-cap ``c``: ``final_logit_softcapping`` (Gemma 2/3); default None.

The model's logits are then ``c · tanh(a · z / c)`` (``a · z`` without a cap), before the temperature.
Multimodal configs keep these on ``get_text_config()``, which is read when present.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Tuple

SCALE_ATTRIBUTES = ("logit_scale", "output_multiplier", "lm_head_multiplier", "logits_scaling")
SOFTCAP_ATTRIBUTE = "final_logit_softcapping"


@dataclass(frozen=True)
class LogitProcessing:
    """``scale`` (a) and ``softcap`` (c, None: no cap) of one model, and where each came from."""

    scale: float = 1.0
    softcap: Optional[float] = None
    scale_source: Optional[str] = None
    softcap_source: Optional[str] = None

    @property
    def is_identity(self) -> bool:
        """True when the model's logits are the LM head's output unchanged."""
        return self.scale == 1.0 and self.softcap is None

    def describe(self) -> str:
        """E.g. ``config.logits_scaling=8.0 (logits divided by it), config.final_logit_softcapping=30.0``."""
        parts = [p for p in (self.scale_source, self.softcap_source) if p]
        return ", ".join(parts) if parts else "none"


def text_config(config: Any) -> Any:
    """``config.get_text_config()`` where it exists (multimodal models), else ``config``."""
    get_text = getattr(config, "get_text_config", None)
    return get_text() if callable(get_text) else config


def read_scale(config: Any) -> Tuple[float, Optional[str]]:
    """The logit scale by TRL's rules and the attribute it came from (None: unscaled by default)."""
    for name in SCALE_ATTRIBUTES:
        value = getattr(config, name, None)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"config.{name}: expected a number, got {type(value).__name__} {value!r}")
        if name == "logits_scaling":
            if getattr(config, "model_type", None) == "hyperclovax":
                return float(value), f"config.logits_scaling={value!r} (logits multiplied by it, HyperCLOVA X)"
            if value == 0:
                raise ValueError("config.logits_scaling: expected a non-zero divisor, got 0")
            return 1.0 / float(value), f"config.logits_scaling={value!r} (logits divided by it)"
        return float(value), f"config.{name}={value!r}"
    return 1.0, None


def logit_processing(config: Any) -> LogitProcessing:
    """The scale and soft-cap of a model from its (text) config, by TRL's rules (module docstring)."""
    config = text_config(config)
    scale, scale_source = read_scale(config)
    cap = getattr(config, SOFTCAP_ATTRIBUTE, None)
    if cap is not None:
        if isinstance(cap, bool) or not isinstance(cap, (int, float)) or not cap > 0:
            raise ValueError(f"config.{SOFTCAP_ATTRIBUTE}: expected None or a number > 0, got {cap!r}")
        cap = float(cap)
    return LogitProcessing(scale, cap, scale_source,
                           f"config.{SOFTCAP_ATTRIBUTE}={cap!r}" if cap is not None else None)
