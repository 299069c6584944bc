"""The prompts' KV caches of a group of responses, computed once and reused by every sequence that starts
with the prompt (SPEC §8, exact sharing; :mod:`vcrd.select.naturalness`)."""

from __future__ import annotations

from typing import List, Tuple

import torch

from .packed_forward import packed_forward


def prompt_sharing_supported(model) -> bool:
    """Prompt KV caches are reused only for plain full-attention caches (no sliding-window or
    hybrid layers, whose caches drop or transform keys)."""
    config = getattr(model, "config", None)
    if config is None:
        return False
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    types = getattr(text, "layer_types", None)
    if types is not None and any(t != "full_attention" for t in types):
        return False
    return not getattr(text, "sliding_window", None) or not getattr(text, "use_sliding_window", True)


class PrefixCaches:
    """Per-layer keys and values of the distinct prompt prefixes of a group of responses, computed
    in batches of at most ``token_budget`` tokens (padded for Hugging Face's forward, end to end for
    :func:`packed_forward`, which stops at the last layer's keys and values)."""

    def __init__(self, decoder, keys: List[Tuple[int, ...]], token_budget: int, device, pad: int, packed: bool):
        self.kv = {}  # key -> [(k, v) per layer], each [kv heads, length, head dim]
        todo = sorted({k for k in keys if k}, key=len)
        i = 0
        while i < len(todo):
            n = max(1, min(len(todo) - i, token_budget // len(todo[i])))
            while n > 1 and n * len(todo[i + n - 1]) > token_budget:
                n -= 1
            group, L = todo[i:i + n], len(todo[i + n - 1])
            if packed:
                _, layers = packed_forward(decoder, group, [[] for _ in group], keep_kv=True)
                start = 0
                for k in group:
                    self.kv[k] = [(kk[start:start + len(k)].transpose(0, 1), vv[start:start + len(k)].transpose(0, 1))
                                  for kk, vv in layers]
                    start += len(k)
                i += n
                continue
            ids = torch.full((n, L), pad, dtype=torch.long)
            mask = torch.zeros((n, L), dtype=torch.long)
            for b, k in enumerate(group):
                ids[b, :len(k)] = torch.tensor(k)
                mask[b, :len(k)] = 1
            cache = decoder(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=True).past_key_values
            layers = ([(layer.keys, layer.values) for layer in cache.layers] if hasattr(cache, "layers")
                      else list(zip(cache.key_cache, cache.value_cache)))  # transformers < 4.56
            for b, k in enumerate(group):
                self.kv[k] = [(kk[b, :, :len(k)], vv[b, :, :len(k)]) for kk, vv in layers]
            i += n

    def padded(self, keys: List[Tuple[int, ...]]) -> Tuple[List[Tuple[torch.Tensor, torch.Tensor]], int]:
        """Per layer ``(K, V)`` ``[rows, kv heads, P, d]``: row ``b`` holds ``keys[b]``'s prefix, right-padded
        with zeros to the longest, ``P``."""
        P = max(len(k) for k in keys)
        if P == 0:
            return [], 0
        layers = []
        for li, (k0, v0) in enumerate(self.kv[next(k for k in keys if k)]):
            K = k0.new_zeros((len(keys), k0.shape[0], P, k0.shape[-1]))
            V = v0.new_zeros((len(keys), v0.shape[0], P, v0.shape[-1]))
            for b, k in enumerate(keys):
                if k:
                    K[b, :, :len(k)], V[b, :, :len(k)] = self.kv[k][li]
            layers.append((K, V))
        return layers, P

    def batch(self, keys: List[Tuple[int, ...]]):
        """A ``DynamicCache`` holding each row's prefix, right-padded to the longest."""
        from transformers import DynamicCache

        layers, P = self.padded(keys)
        if P == 0:
            return None, 0
        cache = DynamicCache()
        for li, (K, V) in enumerate(layers):
            cache.update(K, V, li)
        return cache, P


__all__ = ["PrefixCaches", "prompt_sharing_supported"]
