"""Sharded naturalness scoring (``vcrd score`` under ``torchrun``): each rank scores its share of the responses.

Shares: the responses are grouped by prompt (a prompt's responses share its KV cache in the scorer, so
they stay together on one rank); the groups are dealt out largest first (by characters of prompt and
responses) to the rank with the least work so far (ties: the lowest rank). The deal depends on the
inputs only, so every rank computes the same shares without communication. Each rank runs
:func:`vcrd.select.naturalness.score_responses` on its share; ONE ``all_gather_object`` brings every
rank's scores (or its error: then every rank raises) to every rank, put back in input order.

A response's score does not depend on which other responses share its rank when the scorer's results
do not depend on batch composition; where padded batches of different composition round differently,
the sharded scores differ from the single-process ones in the last bits only (see docs/distributed.md).
"""

from __future__ import annotations

from typing import List, Sequence

from ..select.naturalness import Response, ResponseScore, score_responses
from .ranks import agreed, gather, launch_info


def _size(prompt: str, response: Response) -> int:
    return len(prompt) + (len(response) if isinstance(response, str) else sum(len(s) for s in response))


def score_shares(prompts: Sequence[str], responses: Sequence[Response], world: int) -> List[List[int]]:
    """The response indices each of ``world`` ranks scores (ascending; together every index once)."""
    groups = {}
    for i, prompt in enumerate(prompts):
        groups.setdefault(prompt, []).append(i)
    work = [0] * world
    shares: List[List[int]] = [[] for _ in range(world)]
    sizes = {p: sum(_size(p, responses[i]) for i in idx) for p, idx in groups.items()}
    for prompt in sorted(groups, key=lambda p: (-sizes[p], groups[p][0])):
        rank = min(range(world), key=lambda r: (work[r], r))
        shares[rank] += groups[prompt]
        work[rank] += sizes[prompt]
    return [sorted(s) for s in shares]


def score_responses_sharded(model, tokenizer, prompts: Sequence[str], responses: Sequence[Response],
                            **options) -> List[ResponseScore]:
    """:func:`vcrd.select.naturalness.score_responses` of all responses, each rank of the default process
    group scoring its :func:`score_shares` share; every rank returns every score, in input order (one
    process: the plain call). ``options``: those of ``score_responses``."""
    rank, world, _ = launch_info()
    if world == 1:
        return score_responses(model, tokenizer, prompts, responses, **options)
    if len(prompts) != len(responses):  # the same refusal as score_responses, before the shares are cut
        raise ValueError(f"responses: expected one per prompt ({len(prompts)}), got {len(responses)}")
    mine = score_shares(prompts, responses, world)[rank]
    scores = agreed(lambda: score_responses(model, tokenizer, [prompts[i] for i in mine],
                                            [responses[i] for i in mine], **options) if mine else [])
    out: List[ResponseScore] = [None] * len(prompts)  # type: ignore[list-item]
    for indices, part in gather((mine, scores)):
        for i, score in zip(indices, part):
            out[i] = score
    return out


__all__ = ["score_responses_sharded", "score_shares"]
