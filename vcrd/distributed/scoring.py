"""Sharded naturalness scoring (``vcrd score`` under ``torchrun``): each rank scores its share of the responses.

The scorer's unit of work is a group of responses (:func:`vcrd.select.naturalness.score_responses`:
formed from the whole input, in prompt order, within a token budget; each group runs on its own, with
its own prompt caches and batches). Every rank forms the same groups and the same deal (largest group
first to the rank with the least suffix tokens so far; ties: the lowest rank), without communication,
and runs ``score_responses(..., shard=(rank, world))``: only its groups. ONE ``all_gather_object``
brings every rank's scores (or its error: then every rank raises) to every rank, put back in input
order. A response's scores depend only on its group, so they are bitwise those of the single-process
run (on CPU at any thread count: every group runs on one thread; see docs/distributed.md).
"""

from __future__ import annotations

from typing import List, Sequence

import torch.distributed as dist

from ..select.naturalness import Response, ResponseScore, score_responses
from .ranks import agreed, gather, launch_info


def score_responses_sharded(model, tokenizer, prompts: Sequence[str], responses: Sequence[Response],
                            **options) -> List[ResponseScore]:
    """:func:`vcrd.select.naturalness.score_responses` of all responses, each rank of the default process
    group scoring its share (``shard=(rank, world)``); every rank returns every score, in input order (one
    process: the plain call). ``options``: those of ``score_responses`` but ``shard``."""
    rank, world, _ = launch_info()
    if world == 1:
        return score_responses(model, tokenizer, prompts, responses, **options)
    if not (dist.is_available() and dist.is_initialized()):  # the gather below would bring back this rank's share only
        raise RuntimeError(f"score_responses_sharded: WORLD_SIZE is {world} but no process group is initialised; "
                           f"call vcrd.distributed.ranks.init_from_launcher() first")
    mine = agreed(lambda: score_responses(model, tokenizer, prompts, responses, shard=(rank, world), **options))
    out: List[ResponseScore] = [None] * len(prompts)  # type: ignore[list-item]
    for part in gather({i: score for i, score in enumerate(mine) if score is not None}):
        for i, score in part.items():
            out[i] = score
    return out


__all__ = ["score_responses_sharded"]
