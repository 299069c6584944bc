"""The scorer's forwards: final hidden states of a batch of sequences (padded through Hugging Face, unpadded
through :func:`vcrd.select.packed_forward.packed_forward`, or packed for flash-attn's varlen kernel), and the
log-probs of the scored ids from those hidden states and the LM head (:mod:`vcrd.select.naturalness`)."""

from __future__ import annotations

from typing import List, Optional

import torch

from ..core.logit_processing import logit_processing
from .packed_forward import packed_forward
from .prefix_caches import PrefixCaches
from .scoring_plan import ScoredSequence


def decoder_and_head(model):
    """``(decoder, LM head)`` of a causal LM whose logits are the head's own, else ``ValueError``."""
    processing = logit_processing(getattr(model, "config", None))
    if not processing.is_identity:
        raise ValueError(f"model: {type(model).__name__} post-processes its logits ({processing.describe()}); the "
                         f"scorer takes log-probs straight from the LM head, so its scores would not be the "
                         f"model's: models with a logit scale or soft-cap are not supported yet")
    head = model.get_output_embeddings()
    if head is None or not hasattr(head, "weight"):
        raise ValueError(f"model: expected a causal LM with an output embedding (LM head), got {type(model).__name__}")
    return model.get_decoder(), head


def varlen_available(model, device: torch.device) -> bool:
    """Padding-free packing (flash-attn varlen through Hugging Face's position-id packing): CUDA, the
    ``flash_attn`` package importable, and the model loaded with ``attn_implementation="flash_attention_2"``."""
    if device.type != "cuda" or getattr(getattr(model, "config", None), "_attn_implementation", None) != \
            "flash_attention_2":
        return False
    import importlib.util

    return importlib.util.find_spec("flash_attn") is not None


def label_logprobs(hidden: torch.Tensor, head: torch.nn.Module, labels: torch.Tensor, chunk_rows: int = 1024,
                   *, weight: Optional[torch.Tensor] = None, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``log softmax(head(hidden))[label]`` per row, fp32, ``chunk_rows`` rows of logits at a time.

    ``weight`` / ``bias``: the head's parameters already cast to fp32 (the scorer casts them once per
    call); by default they are taken from ``head`` and cast here, once per call of this function."""
    if weight is None:
        weight = head.weight.float()
        bias = getattr(head, "bias", None)
        bias = None if bias is None else bias.float()
    out = torch.empty(labels.shape[0], dtype=torch.float32, device=hidden.device)
    for r0 in range(0, labels.shape[0], chunk_rows):
        logits = hidden[r0:r0 + chunk_rows].float() @ weight.T
        if bias is not None:
            logits = logits + bias
        y = labels[r0:r0 + chunk_rows]
        if logits.is_cuda:
            from vcrd.kernels.label_logprob import label_logprob

            out[r0:r0 + chunk_rows] = label_logprob(logits, y)[1]
        else:
            out[r0:r0 + chunk_rows] = logits.gather(1, y[:, None]).squeeze(1) - torch.logsumexp(logits, -1)
    return out


def run_padded(decoder, batch: List[ScoredSequence], caches: Optional[PrefixCaches], device, pad: int):
    """Final hidden states ``[rows, longest suffix, H]`` of a padded batch of items."""
    L = max(len(it.ids) for it in batch)
    ids = torch.full((len(batch), L), pad, dtype=torch.long)
    for b, it in enumerate(batch):
        ids[b, :len(it.ids)] = torch.tensor(it.ids)
    past, P = (None, 0) if caches is None else caches.batch([it.prefix_key for it in batch])
    mask = torch.zeros((len(batch), P + L), dtype=torch.long)
    for b, it in enumerate(batch):
        mask[b, :len(it.prefix_key)] = 1
        mask[b, P:P + len(it.ids)] = 1
    if P:
        kwargs = dict(past_key_values=past, use_cache=True, position_ids=(
            torch.tensor([len(it.prefix_key) for it in batch])[:, None] + torch.arange(L)).to(device))
    else:
        kwargs = dict(use_cache=False)
    return decoder(input_ids=ids.to(device), attention_mask=mask.to(device), **kwargs).last_hidden_state


def run_unpadded(decoder, batch: List[ScoredSequence], wanted: List[List[int]], caches: Optional[PrefixCaches]):
    """Final hidden states ``[rows, H]`` at the ``wanted`` positions of each item (in order), through
    :func:`packed_forward` (no padding in the GEMMs, the last layer in full only at those rows). Each
    item runs only up to its last wanted position: later ids (at least its last id, which predicts
    nothing) are attended by no wanted row, so they change no result."""
    prefix, P = caches.padded([it.prefix_key for it in batch]) if caches is not None else ([], 0)
    return packed_forward(decoder, [it.ids[:ps[-1] + 1] for it, ps in zip(batch, wanted)], wanted,
                          prefix=prefix if P else None, prefix_len=[len(it.prefix_key) for it in batch])[0]


def run_varlen(decoder, batch: List[ScoredSequence], device):
    """Varlen path: the items back to back in one row, positions restarting at 0 for each, no padding
    and no attention mask (flash-attn's varlen kernel keeps them apart). Returns ``[rows, longest, H]``."""
    ids = torch.tensor([t for it in batch for t in it.ids])[None]
    pos = torch.cat([torch.arange(len(it.ids)) for it in batch])[None]
    hidden = decoder(input_ids=ids.to(device), position_ids=pos.to(device), use_cache=False).last_hidden_state[0]
    L = max(len(it.ids) for it in batch)
    out = hidden.new_zeros((len(batch), L, hidden.shape[-1]))
    start = 0
    for b, it in enumerate(batch):
        out[b, :len(it.ids)] = hidden[start:start + len(it.ids)]
        start += len(it.ids)
    return out


__all__ = ["decoder_and_head", "label_logprobs", "run_padded", "run_unpadded", "run_varlen", "varlen_available"]
