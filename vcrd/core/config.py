"""The loss options as one dataclass (SPEC §9), with the presets ``kd``, ``discord`` and ``vcrd``.

Every default below is vcrd's own choice (the papers give no numbers); docs/spec.md labels them so.
Invalid values raise ``ValueError`` when the config is built, before any tensor is touched.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Literal, Optional, Union

DIVERGENCE_NAMES = ("fkl", "rkl", "jsd")  # every divergence (formulas: reference.divergence, backends.divergences)
Divergence = Literal["fkl", "rkl", "jsd"]
Validity = Optional[Literal["argmax", "expected"]]
GEMM_PRECISIONS = ("auto", "exact", "head")  # the fused-linear losses' LM-head GEMMs (loss.fused_linear.gemm_plan)

PRESETS = ("kd", "discord", "vcrd")


@dataclass(frozen=True)
class VCRDConfig:
    """Options of the VCRD loss; field names and defaults are those of SPEC §9.

    ``divergence`` picks D_r (§3), ``validity`` the validity gap g_r (§4), ``correction`` and
    ``window_steps`` the distribution-correction weight over the causal local window (§5),
    ``kd_weight``/``ce_weight``/``normalize`` the final sum (§6); ``student_logit_scale``,
    ``teacher_logit_scale``, ``student_softcap``, ``teacher_softcap`` each model's logit post-processing
    (§1: the softmax sees ``c·tanh(a·z/c)``, ``a·z`` without a cap); ``gemm_precision`` the LM-head
    GEMMs of the fused-linear losses (``"exact"``: fp32 from heads converted once per call; ``"head"``: in
    the heads' own bf16/fp16; ``"auto"``: ``"head"`` for bf16 heads, and fp16 heads on CUDA, else exact).
    """

    divergence: Divergence = "fkl"
    beta: float = 0.5
    temperature: float = 1.0
    validity: Validity = "argmax"
    validity_floor: float = 0.1
    validity_margin: float = 0.5
    validity_tau: float = 0.25
    correction: bool = True
    window_steps: Optional[int] = 4
    correction_bias: float = 0.0
    correction_tau: float = 1.0
    kd_weight: float = 1.0
    ce_weight: float = 0.0
    normalize: Literal["tokens", "weights"] = "weights"
    ignore_index: int = -100
    student_logit_scale: float = 1.0
    teacher_logit_scale: float = 1.0
    student_softcap: Optional[float] = None
    teacher_softcap: Optional[float] = None
    gemm_precision: Literal["auto", "exact", "head"] = "auto"

    def __post_init__(self) -> None:
        def bad(name: str, expected: str) -> ValueError:
            return ValueError(f"VCRDConfig.{name}: expected {expected}, got {getattr(self, name)!r}")

        if self.divergence not in DIVERGENCE_NAMES:
            raise bad("divergence", "one of " + ", ".join(map(repr, DIVERGENCE_NAMES)))
        if self.validity not in ("argmax", "expected", None):
            raise bad("validity", "'argmax', 'expected' or None")
        if self.normalize not in ("tokens", "weights"):
            raise bad("normalize", "'tokens' or 'weights'")
        if self.gemm_precision not in GEMM_PRECISIONS:
            raise bad("gemm_precision", "one of " + ", ".join(map(repr, GEMM_PRECISIONS)))
        for name in ("beta", "temperature", "validity_floor", "validity_margin", "validity_tau",
                     "correction_bias", "correction_tau", "kd_weight", "ce_weight"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
                raise bad(name, "a real number")
        if not 0.0 <= self.beta <= 1.0:
            raise bad("beta", "a number in [0, 1]")
        if self.temperature <= 0:
            raise bad("temperature", "a number > 0")
        if not 0.0 <= self.validity_floor <= 1.0:
            raise bad("validity_floor", "a number in [0, 1]")
        if self.validity_tau <= 0:
            raise bad("validity_tau", "a number > 0")
        if self.correction_tau <= 0:
            raise bad("correction_tau", "a number > 0")
        if self.kd_weight < 0 or self.ce_weight < 0:
            raise bad("kd_weight" if self.kd_weight < 0 else "ce_weight", "a number >= 0")
        if not isinstance(self.correction, bool):
            raise bad("correction", "True or False")
        if self.window_steps is not None and (
            isinstance(self.window_steps, bool) or not isinstance(self.window_steps, int) or self.window_steps < 0
        ):
            raise bad("window_steps", "an int >= 0 or None")
        if isinstance(self.ignore_index, bool) or not isinstance(self.ignore_index, int):
            raise bad("ignore_index", "an int")
        for name in ("student_logit_scale", "teacher_logit_scale"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
                raise bad(name, "a finite number > 0")
        for name in ("student_softcap", "teacher_softcap"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                      or not 0 < value < math.inf):
                raise bad(name, "None or a finite number > 0")

    @classmethod
    def preset(cls, name: str, **overrides) -> VCRDConfig:
        """A named preset (``kd``, ``discord`` or ``vcrd``), with any field overridden.

        ``kd``: forward KL, no weights, mean over tokens. ``discord``: forward KL with per-token
        distribution correction. ``vcrd``: the defaults (argmax validity, correction over a 4-step
        window). The weighted presets normalise by the weights (``normalize="weights"``), so the
        weights move emphasis between tokens without shrinking the step (SPEC §6).
        """
        base = {
            "kd": dict(validity=None, correction=False, normalize="tokens"),
            "discord": dict(validity=None, correction=True, window_steps=None),
            "vcrd": {},
        }
        if name not in base:
            raise ValueError(f"preset: expected one of {PRESETS}, got {name!r}")
        return cls(**{**base[name], **overrides})

    def replace(self, **changes) -> VCRDConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    @property
    def effective_divergence(self) -> Divergence:
        """The divergence actually computed: ``jsd`` with beta 0 is ``fkl``, with beta 1 ``rkl``."""
        if self.divergence == "jsd" and self.beta in (0.0, 1.0):
            return "fkl" if self.beta == 0.0 else "rkl"
        return self.divergence


def resolve_config(config: Union[VCRDConfig, str, None], **overrides) -> VCRDConfig:
    """``None`` → the ``vcrd`` preset; a string → that preset; a ``VCRDConfig`` → itself; then any
    field in ``overrides`` replaced (``resolve_config("kd", temperature=2.0)``)."""
    if config is None:
        cfg = VCRDConfig()
    elif isinstance(config, str):
        cfg = VCRDConfig.preset(config)
    elif isinstance(config, VCRDConfig):
        cfg = config
    else:
        raise TypeError(f"config: expected a VCRDConfig, a preset name or None, got {type(config).__name__}")
    if not overrides:
        return cfg
    unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(VCRDConfig)})
    if unknown:
        raise TypeError(f"unexpected option(s) {unknown}: expected fields of VCRDConfig "
                        f"({', '.join(f.name for f in dataclasses.fields(VCRDConfig))})")
    return cfg.replace(**overrides)
