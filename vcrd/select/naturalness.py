"""Local naturalness (LALP) and global naturalness (GALP) of responses under a causal LM (SPEC §8).

A response is split into reasoning steps; step i is scored with only the prompt and the previous
``window`` steps in context: ``ℓ_i`` = mean log-prob of the step's ids (after dropping the first
``drop_first``), ``LALP = mean_i ℓ_i``. ``GALP`` = mean log-prob of all response ids with the full
context. Every piece (prompt, each step) is tokenised on its own, so a step has the same ids in
every context.

Exact sharing, then batching (the scores equal one plain forward per window, see ``naive_score``):

- the prompt is the same prefix of every window of a response: its KV cache (all ids but the last)
  is computed once per distinct prompt and reused, gathered into each batch, by every window and the
  GALP sequence of the responses that have it (right-padded prefixes are masked out and each row's
  positions continue after its own prompt). Models with sliding-window or
  hybrid layers run each window with its whole prompt instead;
- the windows of steps ``1..k+1`` are prefixes of the GALP sequence (prompt ++ every earlier step),
  so their step scores are read from the GALP forward; only steps ``k+2..P`` get a forward of
  their own (prompt cache ++ last prompt id ++ ``k`` steps ++ the step); with ``k >= P`` one
  forward per response gives every score;
- the remaining sequences of a group (below) are sorted by length and batched, at most ``token_budget``
  padded (prefix + suffix) tokens each. Llama-family decoders (``packed_forward_supported``: Llama,
  Mistral, Qwen2, Qwen3 with full attention) run each batch through :func:`packed_forward`: tokens
  end to end without padding in the GEMMs, the first layer's norm and projections once per distinct
  id, the last layer in full only at the rows that predict a scored id (elsewhere only its keys
  and values), and each sequence only up to its last such row (later ids change no score); on CPU a
  batch then holds at most ``CPU_BATCH_TOKENS`` tokens. Other decoders run one padded
  ``torch.inference_mode`` Hugging Face forward per batch, without a new KV cache. On CUDA
  with ``flash_attn`` and a model loaded with ``attn_implementation="flash_attention_2"`` the
  sequences are packed back to back through Hugging Face's position-id packing instead (flash-attn
  varlen; no prompt cache on that path).

Log-probs of the scored ids come from the final hidden states and the LM head (cast to fp32 once
per call), once per scored position (the GALP sequence's rows also give the step scores read from
it), ``chunk_rows`` rows at a time (the Triton label log-prob kernel on CUDA), never a
``[tokens, V]`` log-softmax.

Groups, the unit of work: the responses, sorted by prompt, form groups of at most ``GROUP_BATCHES``
batch budgets of distinct prompt tokens and as many of suffix tokens (the batch budget: ``token_budget``,
on CPU's unpadded path at most ``CPU_BATCH_TOKENS``; a response is never split). Each group runs on its
own (its prompt caches, which live only while it runs, and its batches), so a response's scores depend
only on its group, which depends only on the whole input. ``shard=(rank, world)`` runs only the groups
:func:`_deal` gives ``rank``: the union over the ranks of a world is bitwise the unsharded result
(``vcrd score`` under ``torchrun``, :mod:`vcrd.distributed.scoring`).

On CPU the groups run side by side (:func:`vcrd.select.threads.map_batches`): one Python thread per
intra-op thread torch has, each running whole groups with ONE intra-op thread, largest group first.
A small model's forward over a few hundred tokens uses several intra-op threads poorly (the work
between its matrix products runs on short tensors, and every operator forks and joins), so whole
groups per thread use the cores better; and every group is computed on one thread whatever the
thread count, so the scores are bitwise the same at any thread count.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch

from ..core.logit_processing import logit_processing
from ..core.progress import progress as progress_bar
from .limits import check_lengths, model_positions
from .model_io import in_dtype, parse_dtype
from .packed_forward import packed_forward, packed_forward_supported
from .steps import split_steps
from .threads import map_batches

Response = Union[str, Sequence[str]]

# On CPU the unpadded path runs at most this many tokens per forward: GEMMs of a few hundred rows
# already run at full speed, the elementwise work between them (norms, RoPE, SiLU) stays in cache, and
# the tensors stay small enough for the C allocator to reuse their memory instead of mapping (and
# page-faulting in) fresh memory on every call (the benchmark's vocabulary-300 case, 1 thread, under
# load: 512 tokens per batch took ~0.85x the CPU time of 2048, 1 thousand page faults per call instead
# of 200 thousand).
CPU_BATCH_TOKENS = 512
# ... and computes the LM head's logits this many rows at a time (8664 rows, V = 32000, 1 thread,
# under load: 2.5 s with 256-row chunks, 3.7 s with 1024, whose 131 MB logits are mapped afresh each time).
CPU_HEAD_ROWS = 256
# The unit of work (and of sharding) is a group of responses: at most this many batch budgets of distinct
# prompt tokens and of suffix tokens (see the module docstring). Each group ends with a partial batch and
# computes its own prompt caches (benches/bench_naturalness.py, 16-token prompts: 53 batches instead of 48,
# the same tokens); timings under load did not separate that cost from the allocator's page-fault noise
# (up to ~10% either way between runs).
GROUP_BATCHES = 4


@dataclass
class ResponseScore:
    """Scores of one response: ``lalp``, ``galp`` (NaN when there is nothing to score),
    ``step_scores`` (``ℓ_i``, NaN for a step with no scored ids), ``n_steps``, ``n_tokens`` (response ids)."""

    lalp: float
    galp: float
    step_scores: List[float] = field(default_factory=list)
    n_steps: int = 0
    n_tokens: int = 0


def _ids(tokenizer, text: str) -> List[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _batch_ids(tokenizer, texts: List[str]) -> List[List[int]]:
    """``_ids`` of each text (each tokenised on its own), in one call of the tokenizer."""
    if not texts:
        return []
    return [list(i) for i in tokenizer(texts, add_special_tokens=False)["input_ids"]]


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


Owner = Tuple[int, int]  # (response index, step index; -1 for GALP)


@dataclass
class _Item:
    """One sequence to run after a shared prefix (the prompt's KV cache, ``prefix`` ids long).

    ``ids`` is the suffix; ``spans`` are ``(start, stop, owner)``: suffix positions ``start..stop-1``
    are scored for ``owner``, each predicted by the hidden state one position before (so ``start >= 1``)."""

    prefix_key: Tuple[int, ...]
    ids: List[int]
    spans: List[Tuple[int, int, Owner]]


def _items(prompt_ids: List[int], step_ids: List[List[int]], window: int, drop_first: int, r: int,
           share_prompt: bool) -> List[_Item]:
    """The sequences that score one response (SPEC §8, exact sharing).

    With ``share_prompt`` every sequence starts after ``prompt_ids[:-1]`` (computed once, its KV cache
    reused); the suffix starts with the prompt's last id, whose hidden state predicts the first id
    after the prompt. The "full" sequence (prompt ++ all steps) gives GALP and also the step scores of
    steps ``0..window`` (0-based), whose windows are its prefixes (context = prompt ++ all earlier
    steps). Each later step ``i`` gets its own sequence: prompt ++ steps ``i-window..i``."""
    if share_prompt and prompt_ids:
        key, lead = tuple(prompt_ids[:-1]), prompt_ids[-1:]
    else:
        key, lead = (), list(prompt_ids)
    out = []
    full, spans, off = lead + [t for s in step_ids for t in s], [], len(lead)
    if prompt_ids and len(full) > len(lead):
        spans.append((len(lead), len(full), (r, -1)))
    for i, ids in enumerate(step_ids):
        start = off if i <= window else len(lead) + sum(len(s) for s in step_ids[i - window:i])
        if len(ids) > drop_first and start > 0:  # a step with no context at all is not scored
            if i <= window:
                spans.append((start + drop_first, start + len(ids), (r, i)))
            else:
                context = lead + [t for s in step_ids[i - window:i] for t in s]
                out.append(_Item(key, context + ids, [(len(context) + drop_first, len(context) + len(ids), (r, i))]))
        off += len(ids)
    if spans:
        out.append(_Item(key, full, spans))
    return out


def _batches(items: List[_Item], token_budget: int, flat_budget: Optional[int] = None) -> List[List[_Item]]:
    """Padded batches sorted by suffix length (then prefix length); a batch's padded size
    ``rows * (longest prefix + longest suffix)`` stays within ``token_budget`` and, with ``flat_budget``,
    its suffix tokens within ``flat_budget`` (a longer item runs alone)."""
    batches, current, lp, ls, n = [], [], 0, 0, 0
    for it in sorted(items, key=lambda it: (len(it.ids), len(it.prefix_key))):
        p, s = max(lp, len(it.prefix_key)), max(ls, len(it.ids))
        if current and ((len(current) + 1) * (p + s) > token_budget
                        or (flat_budget is not None and n + len(it.ids) > flat_budget)):
            batches.append(current)
            current, p, s, n = [], len(it.prefix_key), len(it.ids), 0
        current.append(it)
        lp, ls, n = p, s, n + len(it.ids)
    if current:
        batches.append(current)
    return batches


def _groups(items: List[List[_Item]], budget: int) -> List[List[int]]:
    """Response indices in groups, in prompt order (responses with the same prompt adjacent, so they share
    its cache): a group takes the next response while its distinct prompt prefixes and its suffixes each
    stay within ``budget`` tokens (a response alone may exceed it; a response is never split)."""
    order = sorted(range(len(items)), key=lambda r: items[r][0].prefix_key if items[r] else ())
    groups, current, seen, cached, suffix = [], [], set(), 0, 0
    for r in order:
        keys = {it.prefix_key for it in items[r]}
        new, size = sum(len(k) for k in keys - seen), sum(len(it.ids) for it in items[r])
        if current and (cached + new > budget or suffix + size > budget):
            groups.append(current)
            current, seen, cached, suffix, new = [], set(), 0, 0, sum(len(k) for k in keys)
        current.append(r)
        seen |= keys
        cached, suffix = cached + new, suffix + size
    if current:
        groups.append(current)
    return groups


def _deal(sizes: Sequence[int], world: int) -> List[int]:
    """The rank (of ``world``) that runs each unit of work ``g`` of size ``sizes[g]``: units dealt largest
    first (ties: the earlier unit) to the rank with the least work so far (ties: the lowest rank)."""
    load, owner = [0] * world, [0] * len(sizes)
    for g in sorted(range(len(sizes)), key=lambda g: (-sizes[g], g)):
        owner[g] = min(range(world), key=lambda r: (load[r], r))
        load[owner[g]] += sizes[g]
    return owner


def _decoder_and_head(model):
    processing = logit_processing(getattr(model, "config", None))
    if not processing.is_identity:
        raise ValueError(f"model: {type(model).__name__} post-processes its logits ({processing.describe()}); the "
                         f"scorer takes log-probs straight from the LM head, so its scores would not be the "
                         f"model's: models with a logit scale or soft-cap are not supported yet")
    head = model.get_output_embeddings()
    if head is None or not hasattr(head, "weight"):
        raise ValueError(f"model: expected a causal LM with an output embedding (LM head), got {type(model).__name__}")
    return model.get_decoder(), head


def _varlen_available(model, device: torch.device) -> bool:
    """Padding-free packing (flash-attn varlen through Hugging Face's position-id packing): CUDA, the
    ``flash_attn`` package importable, and the model loaded with ``attn_implementation="flash_attention_2"``."""
    if device.type != "cuda" or getattr(getattr(model, "config", None), "_attn_implementation", None) != \
            "flash_attention_2":
        return False
    import importlib.util

    return importlib.util.find_spec("flash_attn") is not None


def _prompt_sharing_supported(model) -> bool:
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


class _PrefixCaches:
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


def _run_batch(decoder, batch: List[_Item], caches: Optional[_PrefixCaches], device, pad: int):
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


def _wanted_positions(item: _Item) -> List[int]:
    """The positions whose final hidden states score ``item``'s spans (each span's ids, one position
    earlier), sorted, each once (the GALP span covers the step spans read from the same sequence)."""
    return sorted({p for start, stop, _ in item.spans for p in range(start - 1, stop - 1)})


def _run_unpadded(decoder, batch: List[_Item], wanted: List[List[int]], caches: Optional[_PrefixCaches]):
    """Final hidden states ``[rows, H]`` at the ``wanted`` positions of each item (in order), through
    :func:`packed_forward` (no padding in the GEMMs, the last layer in full only at those rows). Each
    item runs only up to its last wanted position: later ids (at least its last id, which predicts
    nothing) are attended by no wanted row, so they change no result."""
    prefix, P = caches.padded([it.prefix_key for it in batch]) if caches is not None else ([], 0)
    return packed_forward(decoder, [it.ids[:ps[-1] + 1] for it, ps in zip(batch, wanted)], wanted,
                          prefix=prefix if P else None, prefix_len=[len(it.prefix_key) for it in batch])[0]


def _run_varlen(decoder, batch: List[_Item], device):
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


def _packed_batches(items: List[_Item], token_budget: int) -> List[List[_Item]]:
    batches, current, n = [], [], 0
    for it in sorted(items, key=lambda it: len(it.ids)):
        if current and n + len(it.ids) > token_budget:
            batches.append(current)
            current, n = [], 0
        current.append(it)
        n += len(it.ids)
    if current:
        batches.append(current)
    return batches


@torch.inference_mode()
def score_responses(
    model,
    tokenizer,
    prompts: Sequence[str],
    responses: Sequence[Response],
    *,
    window: int = 4,
    drop_first: int = 0,
    max_step_tokens: int = 256,
    token_budget: int = 8192,
    progress: bool = False,
    shard: Tuple[int, int] = (0, 1),
    dtype: Union[None, str, torch.dtype] = None,
) -> List[Optional[ResponseScore]]:
    """LALP and GALP of each ``responses[j]`` to ``prompts[j]`` under ``model`` (SPEC §8).

    ``responses[j]`` is a string (split by :func:`split_steps`) or a list of steps. ``model`` is a
    Hugging Face causal LM, ``tokenizer`` its tokenizer (a BOS is put first when it has one).
    ``shard=(rank, world)``: score only the groups of responses dealt to ``rank`` (see the module
    docstring); the other responses' entries are ``None`` (never with the default ``(0, 1)``). Each
    response is scored by exactly one rank of a world, bitwise as without ``shard``.
    ``dtype``: ``None`` (the model's own), ``"float32"`` (exact) or ``"bfloat16"`` (the decoder in bf16, the
    head's log-softmax in fp32; a model in another dtype is scored through a cast copy, see
    :mod:`vcrd.select.model_io`).
    """
    if len(prompts) != len(responses):
        raise ValueError(f"responses: expected one per prompt ({len(prompts)}), got {len(responses)}")
    checks = (("window", window, 0), ("drop_first", drop_first, 0), ("max_step_tokens", max_step_tokens, 1),
              ("token_budget", token_budget, 1))
    for name, value, low in checks:
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name}: expected an int >= {low}, got {value!r}")
    if not (isinstance(shard, tuple) and len(shard) == 2 and all(isinstance(v, int) and not isinstance(v, bool)
                                                                  for v in shard) and 0 <= shard[0] < shard[1]):
        raise ValueError(f"shard: expected a tuple (rank, world) of ints with 0 <= rank < world, got {shard!r}")
    model = in_dtype(model, parse_dtype(dtype))
    decoder, head = _decoder_and_head(model)
    device = head.weight.device
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    varlen = _varlen_available(model, device)
    share = not varlen and _prompt_sharing_supported(model)
    unpadded = not varlen and packed_forward_supported(model)
    flat_budget = min(token_budget, CPU_BATCH_TOKENS) if unpadded and device.type == "cpu" else None

    texts, n_steps = [], []  # every prompt, then its steps, tokenised below in one call
    for r, (prompt, response) in enumerate(zip(prompts, responses)):
        if not isinstance(prompt, str):
            raise TypeError(f"prompts[{r}]: expected a string, got {type(prompt).__name__}")
        if isinstance(response, str):
            steps = split_steps(response, tokenizer, max_step_tokens)
        elif isinstance(response, (list, tuple)) and all(isinstance(s, str) for s in response):
            steps = list(response)
        else:
            raise TypeError(f"responses[{r}]: expected a string or a list of strings, got {type(response).__name__}")
        texts += [prompt, *steps]
        n_steps.append(len(steps))
    ids = iter(_batch_ids(tokenizer, texts))
    all_steps, items, n_tokens, lengths = [], [], [], []
    for r, n in enumerate(n_steps):
        prompt_ids = bos + next(ids)
        step_ids = [next(ids) for _ in range(n)]
        all_steps.append(step_ids)
        n_tokens.append(sum(len(s) for s in step_ids))
        lengths.append(len(prompt_ids) + n_tokens[-1])
        items.append(_items(prompt_ids, step_ids, window, drop_first, r, share))
    check_lengths(lengths, model_positions(model), [f"responses[{r}]" for r in range(len(lengths))])  # limits.py

    groups = _groups(items, GROUP_BATCHES * (flat_budget or token_budget))
    sizes = [sum(len(it.ids) for r in group for it in items[r]) for group in groups]
    rank, world = shard
    mine = [g for g, owner in enumerate(_deal(sizes, world)) if owner == rank]
    weight = head.weight.float()  # cast once per call
    bias = getattr(head, "bias", None)
    bias = None if bias is None else bias.float()
    def score_group(group: List[int]) -> Dict[Owner, Tuple[float, int]]:
        """``owner -> (sum of log-probs, count)`` for one group: its prompt caches, its batches, their log-probs."""
        group_items = [it for r in group for it in items[r]]
        part: Dict[Owner, Tuple[float, int]] = {}
        caches = None
        if share and any(it.prefix_key for it in group_items):
            caches = _PrefixCaches(decoder, [it.prefix_key for it in group_items], flat_budget or token_budget, device,
                                   pad, unpadded)
        batches = (_packed_batches(group_items, token_budget) if varlen else
                   _batches(group_items, token_budget, flat_budget))
        for batch in batches:
            wanted = [_wanted_positions(it) for it in batch]
            if unpadded:
                hidden = _run_unpadded(decoder, batch, wanted, caches)
            else:
                hidden = (_run_varlen(decoder, batch, device) if varlen
                          else _run_batch(decoder, batch, caches, device, pad))
                L = hidden.shape[1]
                rows = torch.tensor([b * L + p for b, ps in enumerate(wanted) for p in ps], dtype=torch.long)
                hidden = hidden.reshape(-1, hidden.shape[-1])[rows.to(device)]
            labels = torch.tensor([it.ids[p + 1] for it, ps in zip(batch, wanted) for p in ps], dtype=torch.long)
            lp = label_logprobs(hidden, head, labels.to(device), CPU_HEAD_ROWS if device.type == "cpu" else 1024,
                                weight=weight, bias=bias).double().cpu()
            offset = 0
            for it, ps in zip(batch, wanted):
                for start, stop, owner in it.spans:
                    i = offset + bisect.bisect_left(ps, start - 1)
                    total, count = part.get(owner, (0.0, 0))
                    part[owner] = (total + float(lp[i:i + stop - start].sum()), count + stop - start)
                offset += len(ps)
        return part

    sums: Dict[Owner, Tuple[float, int]] = {}  # a response's owners all come from its one group
    bar = None
    if progress:
        bar = progress_bar(sum(sizes[g] for g in mine), unit="tok", desc="scoring")
    # CPU: the groups run side by side, one per intra-op thread, each on one thread (``map_batches``),
    # largest first (the last to finish are then small); a group's result does not depend on the order
    workers = torch.get_num_threads() if device.type == "cpu" else 1
    order = sorted(mine, key=lambda g: (-sizes[g], g))
    for g, part in zip(order, map_batches(score_group, [groups[g] for g in order], workers)):
        sums.update(part)
        if bar is not None:
            bar.update(sizes[g])
    if bar is not None:
        bar.close()

    scored_here = {r for g in mine for r in groups[g]}
    results: List[Optional[ResponseScore]] = []
    for r, step_ids in enumerate(all_steps):
        if r not in scored_here:
            results.append(None)
            continue
        step_scores = []
        for i in range(len(step_ids)):
            total, count = sums.get((r, i), (0.0, 0))
            step_scores.append(total / count if count else math.nan)
        scored = [x for x in step_scores if not math.isnan(x)]
        total, count = sums.get((r, -1), (0.0, 0))
        results.append(ResponseScore(
            lalp=sum(scored) / len(scored) if scored else math.nan,
            galp=total / count if count else math.nan,
            step_scores=step_scores, n_steps=len(step_ids), n_tokens=n_tokens[r]))
    return results


def naive_score(model, tokenizer, prompt: str, steps: List[str], window: int = 4, drop_first: int = 0
                ) -> Tuple[float, float, List[float]]:
    """The same scores with one plain forward per window (the test oracle): ``(lalp, galp, step_scores)``."""
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    prompt_ids = bos + _ids(tokenizer, prompt)
    step_ids = [_ids(tokenizer, s) for s in steps]

    def mean_logprob(context: List[int], ids: List[int]) -> Optional[float]:
        if not ids:
            return None
        full = torch.tensor([context + ids])
        with torch.inference_mode():
            logp = torch.log_softmax(model(input_ids=full).logits[0].double(), -1)
        pos = range(len(context), len(context) + len(ids))
        return sum(float(logp[p - 1, full[0, p]]) for p in pos) / len(ids)

    scores = []
    for i, ids in enumerate(step_ids):
        context = prompt_ids + [t for s in step_ids[max(0, i - window):i] for t in s] + ids[:drop_first]
        value = mean_logprob(context, ids[drop_first:])
        scores.append(math.nan if value is None else value)
    scored = [x for x in scores if not math.isnan(x)]
    galp = mean_logprob(prompt_ids, [t for s in step_ids for t in s])
    return (sum(scored) / len(scored) if scored else math.nan, math.nan if galp is None else galp, scores)
