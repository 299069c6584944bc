"""Unpadded packed forward of a Llama-family decoder for the LALP scorer (exact, inference only).

Many sequences run as one: their tokens lie end to end, ``[T, H]``, so every projection and MLP
is one GEMM over the real tokens (no padding rows); only the attention gathers each sequence's
queries and keys into a padded ``[B, heads, L, d]`` view (``scaled_dot_product_attention`` with
a boolean mask: causal within the sequence, after its own prompt prefix). Sequence ``b`` may
continue a prompt whose per-layer keys and values were computed before (``prefix``, right-padded
``[B, kv heads, P, d]``, ``prefix_len[b]`` real); its positions then start at ``prefix_len[b]``.

The last layer is computed in full only at the rows whose final hidden states are wanted
(``out_rows``, the positions predicting scored ids); at every other row it only needs its keys and
values (``k_proj``/``v_proj``), which those rows attend to. With no wanted row it stops there
(prompt caches).

The model's own modules do the work (``embed_tokens``, ``rotary_emb``, each layer's norms,
``q/k/v/o_proj``, ``q_norm``/``k_norm`` when present, ``mlp``, the final ``norm``); the rotation is
the rotate-half RoPE these architectures use. Supported: ``model_type`` in :data:`SUPPORTED`
with full attention only (:func:`packed_forward_supported`); any other model keeps Hugging Face's
own padded forward in the scorer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

SUPPORTED = ("llama", "mistral", "qwen2", "qwen3")
LayerKV = Tuple[torch.Tensor, torch.Tensor]


def packed_forward_supported(model) -> bool:
    """``model_type`` in :data:`SUPPORTED`, every layer full attention (no sliding window), and the
    decoder laid out as those architectures lay it out (pre-norm layers, separate q/k/v/o projections)."""
    config = getattr(model, "config", None)
    if getattr(config, "model_type", None) not in SUPPORTED or model.training:
        return False
    types = getattr(config, "layer_types", None)
    if types is not None and any(t != "full_attention" for t in types):
        return False
    if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True):
        return False
    decoder = model.get_decoder()
    if not all(hasattr(decoder, a) for a in ("embed_tokens", "layers", "norm", "rotary_emb")):
        return False
    parts = ("input_layernorm", "post_attention_layernorm", "mlp", "self_attn")
    projections = ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim", "scaling")
    return all(all(hasattr(layer, a) for a in parts) and all(hasattr(layer.self_attn, a) for a in projections)
               for layer in decoder.layers)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE: ``x * cos + rotate_half(x) * sin``; ``x [T, heads, d]``, ``cos``/``sin [T, d]``
    (one new buffer: the halves' rotated terms are added in place)."""
    half = x.shape[-1] // 2
    cos, sin = cos[:, None], sin[:, None]
    out = x * cos
    out[..., :half].addcmul_(x[..., half:], sin[..., :half], value=-1.0)
    out[..., half:].addcmul_(x[..., :half], sin[..., half:])
    return out


def _norm(module, x: torch.Tensor) -> torch.Tensor:
    """``module(x)`` for an RMSNorm with ``weight`` and ``variance_epsilon`` (Llama, Mistral, Qwen2/3:
    ``weight * x / sqrt(mean(x²) + eps)`` in fp32), as one ``F.rms_norm``; any other norm: the module."""
    weight, eps = getattr(module, "weight", None), getattr(module, "variance_epsilon", None)
    if weight is None or eps is None or "RMSNorm" not in type(module).__name__ or x.dtype != torch.float32 \
            or weight.dtype != torch.float32:
        return module(x)
    return F.rms_norm(x, (x.shape[-1],), weight, eps)


def _is_silu(act) -> bool:
    if isinstance(act, torch.nn.SiLU):
        return True
    try:
        from transformers.activations import SiLUActivation
    except ImportError:  # an older transformers: nn.SiLU only
        return False
    return isinstance(act, SiLUActivation)


def _mlp(mlp, h: torch.Tensor) -> torch.Tensor:
    """``mlp(h)`` = ``down_proj(silu(gate_proj(h)) * up_proj(h))``, with the SiLU and the product formed in
    place in the gate's output (two fewer ``[T, intermediate]`` buffers to allocate and fault in); any
    other activation: the module itself."""
    if not (_is_silu(getattr(mlp, "act_fn", None)) and all(hasattr(mlp, a) for a in ("gate_proj", "up_proj",
                                                                                       "down_proj"))):
        return mlp(h)
    gate = F.silu(mlp.gate_proj(h), inplace=True)
    return mlp.down_proj(gate.mul_(mlp.up_proj(h)))


@dataclass
class _Queries:
    """Where rows go in the padded attention view: ``slot`` = ``b * width + i`` per row, ``mask``
    ``[B, 1, width, P + L]`` (keys: the real prefix, then the sequence up to the query's own position)."""

    rows: Optional[torch.Tensor]  # flat rows of these queries (None: all rows)
    slot: torch.Tensor
    width: int
    mask: torch.Tensor


def _queries(seq: torch.Tensor, t: torch.Tensor, n_seq: int, prefix_mask: torch.Tensor, L: int,
             rows: Optional[torch.Tensor]) -> _Queries:
    """Queries of rows with sequence index ``seq [R]`` and in-sequence position ``t [R]``, in order."""
    device = seq.device
    counts = torch.bincount(seq, minlength=n_seq)
    first = torch.cumsum(counts, 0) - counts
    index = torch.arange(seq.shape[0], device=device) - first[seq]
    width = max(int(counts.max()), 1) if seq.numel() else 1
    slot = seq * width + index
    position = torch.zeros(n_seq * width, dtype=torch.long, device=device)  # padded slots: position 0
    position[slot] = t
    causal = torch.arange(L, device=device) <= position.view(n_seq, width, 1)
    mask = torch.cat((prefix_mask[:, None, :].expand(n_seq, width, -1), causal), dim=-1)[:, None]
    return _Queries(rows, slot, width, mask)


def _padded(x: torch.Tensor, slot: torch.Tensor, n_seq: int, width: int) -> torch.Tensor:
    """``[R, heads, d]`` rows into a zero-padded ``[B, heads, width, d]`` view (row ``r`` at flat slot
    ``slot[r]`` of ``B * width``)."""
    out = x.new_zeros((n_seq * width,) + tuple(x.shape[1:]))
    out[slot] = x
    return out.view(n_seq, width, *x.shape[1:]).transpose(1, 2)


def packed_forward(decoder, ids: Sequence[Sequence[int]], out_positions: Sequence[Sequence[int]], *,
                   prefix: Optional[List[LayerKV]] = None, prefix_len: Optional[Sequence[int]] = None,
                   keep_kv: bool = False) -> Tuple[torch.Tensor, Optional[List[LayerKV]]]:
    """Final hidden states ``[R, H]`` at ``out_positions[b]`` of each sequence ``ids[b]`` (in order,
    sequence by sequence), and with ``keep_kv`` every layer's keys and values ``[T, kv heads, d]`` of
    all rows (sequences end to end, after RoPE). ``prefix``: per layer ``(K, V)`` of shape
    ``[B, kv heads, P, d]``, the first ``prefix_len[b]`` real for sequence ``b``."""
    device = decoder.embed_tokens.weight.device
    n_seq, lengths = len(ids), [len(s) for s in ids]
    L = max(lengths)
    plen = torch.tensor(list(prefix_len) if prefix is not None else [0] * n_seq, device=device)
    P = prefix[0][0].shape[2] if prefix is not None else 0
    seq = torch.repeat_interleave(torch.arange(n_seq, device=device), torch.tensor(lengths, device=device))
    t = torch.cat([torch.arange(n, device=device) for n in lengths])
    prefix_mask = torch.arange(P, device=device) < plen[:, None]
    every = _queries(seq, t, n_seq, prefix_mask, L, None)
    key_slot = seq * (P + L) + P + t  # keys: the prefix, then the sequence
    starts = [0]
    for n in lengths[:-1]:
        starts.append(starts[-1] + n)
    out_rows = torch.tensor([starts[b] + p for b, ps in enumerate(out_positions) for p in ps], dtype=torch.long,
                            device=device)
    wanted = _queries(seq[out_rows], t[out_rows], n_seq, prefix_mask, L, out_rows)

    # The first layer's input, its norm and projections depend on the token id alone: computed once
    # per distinct id of the batch, then gathered (``token``: each row's index among them).
    distinct, token = torch.unique(torch.tensor([i for s in ids for i in s], device=device), return_inverse=True)
    x = decoder.embed_tokens(distinct)
    cos, sin = (c[0] for c in decoder.rotary_emb(x[None], (plen[seq] + t)[None]))
    kept = [] if keep_kv else None
    last = len(decoder.layers) - 1
    for li, layer in enumerate(decoder.layers):
        attn, queries = layer.self_attn, (wanted if li == last else every)
        h = _norm(layer.input_layernorm, x)
        k = attn.k_proj(h).view(h.shape[0], -1, attn.head_dim)
        v = attn.v_proj(h).view(h.shape[0], -1, attn.head_dim)
        if hasattr(attn, "k_norm"):
            k = _norm(attn.k_norm, k)
        if li == 0:
            k, v = k[token], v[token]
        k = _rope(k, cos, sin)
        if kept is not None:
            kept.append((k, v))
        if queries.slot.numel() == 0:
            return x.new_zeros((0, x.shape[-1])), kept
        q_cos, q_sin = (cos, sin) if queries.rows is None else (cos[queries.rows], sin[queries.rows])
        if li > 0 and queries.rows is not None:  # the last layer: queries, attention and MLP at the wanted rows
            x, h = x[queries.rows], h[queries.rows]
        q = attn.q_proj(h).view(h.shape[0], -1, attn.head_dim)
        if hasattr(attn, "q_norm"):
            q = _norm(attn.q_norm, q)
        if li == 0:  # one row per distinct id so far: one per token (or per wanted row) from here on
            rows = token if queries.rows is None else token[queries.rows]
            x, q = x[rows], q[rows]
        q = _rope(q, q_cos, q_sin)
        K, V = _padded(k, key_slot, n_seq, P + L), _padded(v, key_slot, n_seq, P + L)
        if prefix is not None:
            K[:, :, :P], V[:, :, :P] = prefix[li]
        o = F.scaled_dot_product_attention(_padded(q, queries.slot, n_seq, queries.width), K, V,
                                           attn_mask=queries.mask, scale=attn.scaling,
                                           enable_gqa=q.shape[1] != k.shape[1])
        o = o.transpose(1, 2).reshape(n_seq * queries.width, -1)[queries.slot]
        x = x + attn.o_proj(o)  # a new tensor: the gathered inputs above stay untouched
        x += _mlp(layer.mlp, _norm(layer.post_attention_layernorm, x))
    return _norm(decoder.norm, x), kept
