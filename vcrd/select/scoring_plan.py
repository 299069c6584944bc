"""The plan of a scoring call (SPEC §8, exact sharing): the sequences that score each response, their
batches, the groups of responses (the unit of work) and the deal of the groups to the ranks of a world.
See :mod:`vcrd.select.naturalness`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

Owner = Tuple[int, int]  # (response index, step index; -1 for GALP)


@dataclass
class ScoredSequence:
    """One sequence to run after a shared prefix (the prompt's KV cache, ``prefix`` ids long).

    ``ids`` is the suffix; ``spans`` are ``(start, stop, owner)``: suffix positions ``start..stop-1``
    are scored for ``owner``, each predicted by the hidden state one position before (so ``start >= 1``)."""

    prefix_key: Tuple[int, ...]
    ids: List[int]
    spans: List[Tuple[int, int, Owner]]


def response_sequences(prompt_ids: List[int], step_ids: List[List[int]], window: int, drop_first: int, r: int,
           share_prompt: bool) -> List[ScoredSequence]:
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
                span = (len(context) + drop_first, len(context) + len(ids), (r, i))
                out.append(ScoredSequence(key, context + ids, [span]))
        off += len(ids)
    if spans:
        out.append(ScoredSequence(key, full, spans))
    return out


def wanted_positions(item: ScoredSequence) -> List[int]:
    """The positions whose final hidden states score ``item``'s spans (each span's ids, one position
    earlier), sorted, each once (the GALP span covers the step spans read from the same sequence)."""
    return sorted({p for start, stop, _ in item.spans for p in range(start - 1, stop - 1)})


def padded_batches(items: List[ScoredSequence], token_budget: int,
                   flat_budget: Optional[int] = None) -> List[List[ScoredSequence]]:
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


def packed_batches(items: List[ScoredSequence], token_budget: int) -> List[List[ScoredSequence]]:
    """Batches for the varlen path, sorted by length: at most ``token_budget`` suffix tokens each, no padding."""
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


def group_responses(items: List[List[ScoredSequence]], budget: int) -> List[List[int]]:
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


def deal_groups(sizes: Sequence[int], world: int) -> List[int]:
    """The rank (of ``world``) that runs each unit of work ``g`` of size ``sizes[g]``: units dealt largest
    first (ties: the earlier unit) to the rank with the least work so far (ties: the lowest rank)."""
    load, owner = [0] * world, [0] * len(sizes)
    for g in sorted(range(len(sizes)), key=lambda g: (-sizes[g], g)):
        owner[g] = min(range(world), key=lambda r: (load[r], r))
        load[owner[g]] += sizes[g]
    return owner


__all__ = ["Owner", "ScoredSequence", "deal_groups", "group_responses", "packed_batches", "padded_batches",
           "response_sequences", "wanted_positions"]
