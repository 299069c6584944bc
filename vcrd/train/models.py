"""A causal LM as the fused-linear loss sees it: final hidden states and LM head through the model's
own ``forward`` (so DDP, FSDP2, autocast and other wrappers take effect), with the checks that the
logits are ``h @ W^T + b`` after the family's own scale and soft-cap (:mod:`vcrd.core.logit_processing`;
:func:`config_for_models` passes them to the loss)."""

from __future__ import annotations

import inspect
import math
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn

from ..core.config import VCRDConfig
from ..core.logit_processing import LogitProcessing, logit_processing
from ..core.logit_transform import ModelTransform

# |model logits - h @ W^T - b| must stay within this fraction of max |h @ W^T + b| (bf16 autocast: ~1 %)
_HEAD_CHECK_RTOL = 0.05



def unwrap_model(model: nn.Module) -> nn.Module:
    """The model inside its wrappers: ``.module`` (DDP, DataParallel, FSDP1, DeepSpeed),
    ``._orig_mod`` (``torch.compile``) and ``get_base_model()`` (PEFT), repeatedly."""
    seen = set()
    while id(model) not in seen:
        seen.add(id(model))
        for attr in ("_orig_mod", "module"):
            inner = getattr(model, attr, None)
            if isinstance(inner, nn.Module):
                model = inner
                break
        else:
            get_base = getattr(model, "get_base_model", None)
            base = get_base() if callable(get_base) else None
            if isinstance(base, nn.Module):
                model = base
    return model


def model_processing(model: nn.Module) -> LogitProcessing:
    """The scale and soft-cap the (unwrapped) model applies to its LM head's output, from its config by
    TRL's rules (:func:`vcrd.core.logit_processing.logit_processing`)."""
    return logit_processing(getattr(unwrap_model(model), "config", None))


def config_for_models(cfg: VCRDConfig, student: nn.Module, teacher: Optional[nn.Module] = None) -> VCRDConfig:
    """``cfg`` with each model's own logit post-processing (SPEC §1) in ``student_logit_scale``,
    ``student_softcap``, ``teacher_logit_scale``, ``teacher_softcap`` (``teacher=None``: a cached teacher,
    stored after its own). A field left at its default takes the model's value; a field set to another
    value than the model's raises ``ValueError`` naming both (the loss would train another distribution
    than the model's own)."""
    changes: Dict[str, Any] = {}
    for role, model in (("student", student), ("teacher", teacher)):
        if model is None:
            continue
        p, name = model_processing(model), type(unwrap_model(model)).__name__
        for field, value, source, default in ((f"{role}_logit_scale", p.scale, p.scale_source, 1.0),
                                              (f"{role}_softcap", p.softcap, p.softcap_source, None)):
            given = getattr(cfg, field)
            if given == value or (given is not None and value is not None and math.isclose(given, value,
                                                                                          rel_tol=1e-12)):
                continue
            if given != default:
                raise ValueError(f"{field}={given!r} disagrees with the {role} model {name}: its config gives "
                                 f"{source or 'neither a scale nor a soft-cap attribute'}, so its own "
                                 f"distribution uses {value!r}; leave {field} at its default ({default!r}) to take "
                                 f"the model's value")
            changes[field] = value
    if not changes:
        return cfg
    try:
        return cfg.replace(**changes)
    except ValueError as e:
        raise ValueError(f"{e} (read from the model's config: {', '.join(f'{k}={v!r}' for k, v in changes.items())})") \
            from None


def check_causal_lm(model: nn.Module, role: str = "model") -> Tuple[nn.Module, Dict[str, Any]]:
    """Check that ``model`` (possibly wrapped) is a causal LM the fused-linear loss can reproduce.

    Returns ``(head, forward_kwargs)``: the LM head of the unwrapped model (a module with a
    ``[V, H]`` ``weight`` and an optional ``[V]`` ``bias``) and the keyword arguments that make its
    ``forward`` return the final hidden states without full logits. Raises ``TypeError`` for a
    non-module, ``ValueError`` for a model without an LM head, whose ``forward`` cannot limit the
    logits, or whose config holds a malformed logit scale or soft-cap. A model that scales or soft-caps
    its logits (:func:`model_processing`) is accepted: the loss applies the same post-processing (SPEC §1).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"{role}: expected a torch.nn.Module (a causal LM), got {type(model).__name__}")
    inner = unwrap_model(model)
    name = type(inner).__name__
    logit_processing(getattr(inner, "config", None))  # a malformed scale or soft-cap is refused here, naming it
    get_head = getattr(inner, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    weight = getattr(head, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError(f"{role}: expected a causal LM whose get_output_embeddings() returns an LM head with a "
                         f"[V, H] weight, got {name} with head {type(head).__name__}")
    bias = getattr(head, "bias", None)
    if bias is not None and (not isinstance(bias, torch.Tensor) or bias.shape != weight.shape[:1]):
        raise ValueError(f"{role}: expected the LM head's bias to be None or shape [{weight.shape[0]}], "
                         f"got {getattr(bias, 'shape', type(bias).__name__)}")
    try:
        params = inspect.signature(inner.forward).parameters
    except (TypeError, ValueError):  # pragma: no cover - builtins without a signature
        params = {}
    kwargs: Dict[str, Any] = {"output_hidden_states": _last_hidden_state_selector()}
    if "logits_to_keep" in params:
        kwargs["logits_to_keep"] = 1
    elif "num_logits_to_keep" in params:  # transformers < 4.50
        kwargs["num_logits_to_keep"] = 1
    else:
        raise ValueError(f"{role}: {name}.forward takes no logits_to_keep argument, so it would compute [B, T, V] "
                         f"logits at every position; expected a transformers causal LM (transformers >= 4.46)")
    if "use_cache" in params:
        kwargs["use_cache"] = False
    return head, kwargs


def _last_hidden_state_selector():
    """``[-1]`` where transformers can capture only the last hidden state (5.x), else ``True``
    (every layer's output is returned; the last is still ``hidden_states[-1]``)."""
    try:
        from transformers.utils.output_capturing import selected_hidden_states  # noqa: F401
    except ImportError:
        return True
    return [-1]


def final_hidden(model: nn.Module, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor],
                 role: str = "model", checked: Optional[Tuple[nn.Module, Dict[str, Any]]] = None,
                 ) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """Run ``model`` (through its wrappers' ``forward``) and return ``(hidden [B, T, H], weight [V, H],
    bias [V] or None)``: the final hidden states after the last norm and the unwrapped model's LM head.

    The model is asked for its hidden states and the logits of the last position only; those logits
    must equal ``hidden[:, -1] @ weight^T + bias`` (to 5 % of their scale: autocast rounds them),
    which catches models whose ``hidden_states[-1]`` is not the LM head's input or whose logits are
    scaled or capped otherwise than its config declares. ``checked``: the result of
    :func:`check_causal_lm` if already computed.
    """
    head, kwargs = checked if checked is not None else check_causal_lm(model, role)
    with _decoder_output(model) as captured:
        outputs = model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
    states = getattr(outputs, "hidden_states", None)
    hidden = states[-1] if isinstance(states, (tuple, list)) and len(states) else captured.get("hidden")
    _unshard_head(model, head)  # FSDP2: the full LM head weight, as the model's own forward sees it
    name = type(unwrap_model(model)).__name__
    if not isinstance(hidden, torch.Tensor):
        raise ValueError(f"{role}: {name}.forward(output_hidden_states=...) returned no hidden states "
                         f"(got {type(states).__name__}); expected a transformers causal LM")
    if hidden.shape[:2] != input_ids.shape or hidden.shape[-1] != head.weight.shape[1]:
        expected = (*input_ids.shape, head.weight.shape[1])
        raise ValueError(f"{role}: expected final hidden states of shape {expected} from {name}, "
                         f"got {tuple(hidden.shape)}")
    logits = getattr(outputs, "logits", None)
    if isinstance(logits, torch.Tensor) and logits.dim() == 3 and logits.shape[-1] == head.weight.shape[0]:
        _check_head(role, name, hidden, head, logits, model_processing(model))
    return hidden, head.weight, getattr(head, "bias", None)


def _fsdp_owners(model: nn.Module, weight: torch.Tensor) -> List[nn.Module]:
    """The FSDP2 modules (``fully_shard``) whose parameters include ``weight`` (a DTensor), deepest first:
    the first is the one that manages it (``fully_shard`` is applied bottom-up). Empty without FSDP2."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch without FSDP2
        return []
    modules = [m for m in unwrap_model(model).modules() if isinstance(m, FSDPModule)]
    return [m for m in reversed(modules) if any(p is weight for p in m.parameters())]


def _is_dtensor(t) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover
        return False
    return isinstance(t, DTensor)


def _unshard_head(model: nn.Module, head: nn.Module) -> None:
    """Under FSDP2 the LM head weight outside ``forward`` may be the rank's shard (a DTensor: a root with
    ``reshard_after_forward=True``, or an LM head wrapped on its own). The fused-linear loss needs the
    full ``[V, H]`` weight: unshard the FSDP module that manages it, through FSDP's own
    :meth:`FSDPModule.unshard`. The head's gradient then accumulates into the unsharded parameter and
    FSDP's end-of-backward callback reduce-scatters and reshards it like any gradient from ``forward``
    (without a backward, :func:`distill_loss` reshards it itself). Plain tensors: nothing to do."""
    weight = getattr(head, "weight", None)
    owners = _fsdp_owners(model, weight) if isinstance(weight, torch.Tensor) else []
    if not owners:
        return
    if torch.is_grad_enabled() and weight.requires_grad and not _under_fsdp_root(unwrap_model(model), owners[0]):
        owner = owners[0]
        raise ValueError(f"LM head: it is managed by a separate FSDP2 root ({type(owner).__name__}) whose forward "
                         f"output does not reach the loss, so FSDP would never reduce-scatter its gradient. Apply "
                         f"fully_shard to the whole model last (fully_shard(model) after the layers and any "
                         f"sub-modules), so one root's backward covers the head")
    if not _is_dtensor(weight):
        return
    for owner in owners:
        owner.unshard()
        if not _is_dtensor(head.weight):
            return
    raise ValueError(f"LM head: its weight is a DTensor {tuple(weight.shape)} placed {weight.placements} that no "
                     f"FSDP2 module of the model can unshard; the fused-linear loss needs the full [V, H] weight "
                     f"(tensor-parallel heads: compute logit shards, then vcrd.distributed.vocab_parallel_vcrd_loss)")


def _under_fsdp_root(inner: nn.Module, owner: nn.Module) -> bool:
    """Whether FSDP2's end-of-backward callback of the root covering the model's forward also covers
    ``owner``: ``owner`` is that root, or sits inside one (``fully_shard`` on an ancestor)."""
    from torch.distributed.fsdp import FSDPModule

    if owner is inner:
        return True
    ancestors = [m for m in inner.modules() if isinstance(m, FSDPModule) and m is not owner
                 and any(sub is owner for sub in m.modules())]
    return bool(ancestors)


def reshard_head(model: nn.Module, head: nn.Module) -> None:
    """Give back the memory of a head :func:`_unshard_head` gathered when no backward will (FSDP2)."""
    weight = getattr(head, "weight", None)
    if weight is None or _is_dtensor(weight):
        return
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover
        return
    for module in reversed(list(unwrap_model(model).modules())):
        if isinstance(module, FSDPModule) and any(p is weight for p in module.parameters()):
            module.reshard()
            return


class _decoder_output:
    """``with _decoder_output(model) as captured``: ``captured["hidden"]`` is the decoder's
    ``last_hidden_state`` when the decoder was wrapped by FSDP2's ``fully_shard`` (which swaps its class
    to ``FSDP<Name>``, so transformers' class-keyed output capturing returns no hidden states); a plain
    forward hook, removed on exit. Nothing is registered for other models."""

    def __init__(self, model: nn.Module) -> None:
        self.captured: Dict[str, torch.Tensor] = {}
        self.handle = None
        inner = unwrap_model(model)
        get_decoder = getattr(inner, "get_decoder", None)
        try:
            from torch.distributed.fsdp import FSDPModule
            decoder = get_decoder() if callable(get_decoder) else None
        except Exception:  # noqa: BLE001 - no FSDP2 or no decoder lookup: nothing to capture
            return
        if isinstance(decoder, FSDPModule) and decoder is not inner:
            self.handle = decoder.register_forward_hook(self._hook)

    def _hook(self, module, args, output) -> None:
        hidden = getattr(output, "last_hidden_state", None)
        if hidden is None and isinstance(output, (tuple, list)) and output:
            hidden = output[0]
        if isinstance(hidden, torch.Tensor):
            self.captured["hidden"] = hidden

    def __enter__(self) -> Dict[str, torch.Tensor]:
        return self.captured

    def __exit__(self, *exc) -> None:
        if self.handle is not None:
            self.handle.remove()


@torch.no_grad()
def _check_head(role: str, name: str, hidden: torch.Tensor, head: nn.Module, logits: torch.Tensor,
                processing: LogitProcessing) -> None:
    """The model's own last-position logits against ``hidden[:, -1] @ W^T + b`` after the model's own scale
    and soft-cap (``processing``), in the head's dtype (no fp32 copy of a bf16 head: its rounding is far
    inside the tolerance)."""
    weight = head.weight
    with torch.autocast(hidden.device.type, enabled=False):
        ref = (hidden[:, -1].to(weight.dtype) @ weight.T).float()
        if getattr(head, "bias", None) is not None:
            ref = ref + head.bias.float()
        if not processing.is_identity:
            ref = ModelTransform(processing.scale, processing.softcap).apply(ref)
    err = (logits[:, -1].float() - ref).abs().max()
    tol = _HEAD_CHECK_RTOL * ref.abs().max() + 1e-4
    if bool(err > tol):  # NaN compares False: a diverged model is reported by the loss, not here
        raise ValueError(f"{role}: {name}'s logits are not hidden_states[-1] @ lm_head.weight^T (+ bias): max "
                         f"difference {float(err):.3g} at the last position, expected <= {float(tol):.3g}. vcrd needs "
                         f"the LM head applied to the final hidden states (hidden_states[-1] after the final norm), "
                         f"then only the scale and soft-cap its config declares ({processing.describe()})")
