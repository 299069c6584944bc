"""The precision the scorer runs a model in (``score_responses(dtype=...)``, ``vcrd score --dtype``).

``float32`` is exact (the default: the scores equal one plain fp32 forward per window). ``bfloat16``
runs the decoder's matrix products in bf16 (4–5× faster GEMMs on this project's CPUs, see
docs/benchmarks.md); the LM head's logits and their log-softmax stay fp32 (the head's weight is cast to
fp32 once per call), so only the hidden states carry bf16 rounding."""

from __future__ import annotations

from typing import Optional, Union

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def parse_dtype(dtype: Union[None, str, torch.dtype], what: str = "dtype") -> Optional[torch.dtype]:
    """``None`` (keep the model's own), or one of :data:`DTYPES` by name or as a ``torch.dtype``;
    anything else raises ``ValueError`` naming ``what``, what is accepted and what came."""
    if dtype is None:
        return None
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    raise ValueError(f"{what}: expected one of {sorted(DTYPES)} (or None: the model's own), got {dtype!r}")


def model_dtype(model) -> torch.dtype:
    """The dtype of the model's floating-point parameters (the first one found; fp32 if none)."""
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def in_dtype(model, dtype: Optional[torch.dtype]):
    """``model`` itself when ``dtype`` is ``None`` or already its dtype; else a copy cast to ``dtype``
    (the caller's model is never changed: casting fp32 weights to bf16 in place could not be undone).
    The copy costs a model's memory for the call (briefly two: the deep copy, then the cast); load the
    model in ``dtype`` to avoid it (``vcrd score --dtype`` does)."""
    if dtype is None or model_dtype(model) == dtype:
        return model
    import copy

    return copy.deepcopy(model).to(dtype)


def chat_prompt(tokenizer, messages) -> str:
    """The text of ``messages`` (``[{"role", "content"}]``, or one user message as a string) rendered by the
    tokenizer's chat template with the assistant's turn opened (``add_generation_prompt``), for the scorer and
    the collator, which tokenise a prompt with ``add_special_tokens=False`` and put the tokenizer's BOS first:
    a template that itself starts with the BOS text (SmolLM2: ``<|im_start|>``) loses that one copy here, so
    ``[bos] + ids(text)`` are exactly the template's ids. ``ValueError`` when the tokenizer has no template."""
    if isinstance(messages, str):
        messages = [{"role": "user", "content": messages}]
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"tokenizer: expected a chat template (tokenizer.chat_template), got none "
                         f"({type(tokenizer).__name__})")
    text = tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
    bos = getattr(tokenizer, "bos_token", None)
    if bos and tokenizer.bos_token_id is not None and text.startswith(bos):
        text = text[len(bos):]
    return text
