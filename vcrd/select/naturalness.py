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
:func:`vcrd.select.scoring_plan.deal_groups` gives ``rank``: the union over the ranks of a world is bitwise
the unsharded result (``vcrd score`` under ``torchrun``, :mod:`vcrd.distributed.scoring`).

On CPU the groups run side by side (:func:`vcrd.select.threads.map_batches`): one Python thread per
intra-op thread torch has, each running whole groups with ONE intra-op thread, largest group first.
A small model's forward over a few hundred tokens uses several intra-op threads poorly (the work
between its matrix products runs on short tensors, and every operator forks and joins), so whole
groups per thread use the cores better; and every group is computed on one thread whatever the
thread count, so the scores are bitwise the same at any thread count.

The pieces, one file each: the plan (:mod:`vcrd.select.scoring_plan`: sequences, batches, groups, the deal),
the prompt caches (:mod:`vcrd.select.prefix_caches`), the forwards and the label log-probs
(:mod:`vcrd.select.scoring_forward`), one group's scores (:mod:`vcrd.select.group_scorer`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple, Union

import torch

from ..core.progress import progress as progress_bar
from .group_scorer import GroupScorer, Sums
from .limits import check_lengths, model_positions
from .model_io import in_dtype, parse_dtype
from .scoring_plan import ScoredSequence, deal_groups, group_responses, response_sequences
from .steps import split_steps
from .threads import map_batches

Response = Union[str, Sequence[str]]

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


def check_score_arguments(prompts: Sequence[str], responses: Sequence[Response], window: int, drop_first: int,
                          max_step_tokens: int, token_budget: int, shard: Tuple[int, int]) -> None:
    """``ValueError`` naming the first argument of :func:`score_responses` out of its range."""
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


def _ids(tokenizer, text: str) -> List[int]:
    """The ids of ``text`` tokenised on its own, without special tokens."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def tokenized_responses(tokenizer, prompts: Sequence[str], responses: Sequence[Response], max_step_tokens: int
                        ) -> List[Tuple[List[int], List[List[int]]]]:
    """``(BOS + prompt ids, ids of each step)`` per response, each piece tokenised on its own, all in one call
    of the tokenizer (``TypeError`` naming a prompt or response of the wrong type)."""
    texts, n_steps = [], []
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
    ids = iter([list(i) for i in tokenizer(texts, add_special_tokens=False)["input_ids"]] if texts else [])
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    return [(bos + next(ids), [next(ids) for _ in range(n)]) for n in n_steps]


def run_groups(scorer: GroupScorer, groups: List[List[ScoredSequence]], sizes: List[int], progress: bool) -> Sums:
    """The sums of every group's owners. On CPU the groups run side by side, one per intra-op thread, each on
    one thread (``map_batches``), largest first (the last to finish are then small); a group's result does
    not depend on the order."""
    sums: Sums = {}  # a response's owners all come from its one group
    bar = progress_bar(sum(sizes), unit="tok", desc="scoring") if progress else None
    workers = torch.get_num_threads() if scorer.device.type == "cpu" else 1
    order = sorted(range(len(groups)), key=lambda g: (-sizes[g], g))
    for g, part in zip(order, map_batches(scorer.score, [groups[g] for g in order], workers)):
        sums.update(part)
        if bar is not None:
            bar.update(sizes[g])
    if bar is not None:
        bar.close()
    return sums


def response_score(sums: Sums, r: int, step_ids: List[List[int]]) -> ResponseScore:
    """Response ``r``'s scores from the sums of its owners: each step's mean, their mean (LALP), GALP."""
    step_scores = []
    for i in range(len(step_ids)):
        total, count = sums.get((r, i), (0.0, 0))
        step_scores.append(total / count if count else math.nan)
    scored = [x for x in step_scores if not math.isnan(x)]
    total, count = sums.get((r, -1), (0.0, 0))
    return ResponseScore(lalp=sum(scored) / len(scored) if scored else math.nan,
                         galp=total / count if count else math.nan, step_scores=step_scores,
                         n_steps=len(step_ids), n_tokens=sum(len(s) for s in step_ids))


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
    check_score_arguments(prompts, responses, window, drop_first, max_step_tokens, token_budget, shard)
    model = in_dtype(model, parse_dtype(dtype))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    scorer = GroupScorer.for_model(model, pad, token_budget)
    tokenized = tokenized_responses(tokenizer, prompts, responses, max_step_tokens)
    items = [response_sequences(p, steps, window, drop_first, r, scorer.share)
             for r, (p, steps) in enumerate(tokenized)]
    lengths = [len(p) + sum(len(s) for s in steps) for p, steps in tokenized]
    check_lengths(lengths, model_positions(model), [f"responses[{r}]" for r in range(len(lengths))])  # limits.py

    groups = group_responses(items, GROUP_BATCHES * scorer.batch_budget)
    sizes = [sum(len(it.ids) for r in group for it in items[r]) for group in groups]
    rank, world = shard
    mine = [g for g, owner in enumerate(deal_groups(sizes, world)) if owner == rank]
    sums = run_groups(scorer, [[it for r in groups[g] for it in items[r]] for g in mine], [sizes[g] for g in mine],
                      progress)
    scored_here = {r for g in mine for r in groups[g]}
    return [response_score(sums, r, steps) if r in scored_here else None for r, (_, steps) in enumerate(tokenized)]


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
