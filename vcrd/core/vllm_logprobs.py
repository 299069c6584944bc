"""A served teacher's per-position top-K, as vLLM returns it, turned into top-K rows (SPEC §10).

vLLM's ``prompt_logprobs`` (``SamplingParams(prompt_logprobs=K)``) is one entry per prompt token:
``None`` for the first token (nothing predicts it), then ``{token_id: Logprob}`` with the K most
probable tokens at that position **plus the prompt's actual token when it is not among them** (so K
or K + 1 entries). A ``Logprob`` has ``.logprob`` (the natural-log probability, normalised over the
whole vocabulary), ``.rank`` and ``.decoded_token``. JSON dumps of it write ``{"1234": {"logprob":
-0.1, "rank": 1, "decoded_token": "x"}}`` or ``{"1234": -0.1}``: all three forms are read.

Alignment: entry ``i`` is the distribution of token ``i`` given tokens ``< i``, i.e. the row that
predicts label ``token_ids[i]``. vcrd's row ``r`` predicts label ``r`` of the shifted sequence
(``labels = token_ids[1:]``), so the rows are ``prompt_logprobs[1:]``.

What vcrd keeps of each position (:func:`topk_rows`):

- the ``k`` entries of highest log-prob (ties: the lower token id first), sorted by decreasing
  log-prob; an extra entry beyond them (vLLM's actual prompt token, rank > k) is **not** kept as its
  own entry: its mass joins the tail, like every token outside the top-``k``;
- the tail ``log Σ_{v∉top-k} q_v = log(1 - Σ_top-k q)``, in float64 from the kept log-probs
  (``log(-expm1(logsumexp))``); ``-inf`` when the kept entries hold all the mass (within float
  rounding); the loss then completes it uniformly over the other ``V - k`` ids (SPEC §10), where
  MaxText's ``other_bucket`` keeps it as one extra class and ``renormalize`` drops it;
- a position with fewer than ``k`` entries is refused (``ValueError`` naming it): vcrd does not
  invent entries; pass a smaller ``k`` (the default is the smallest count in the dump).
"""

from __future__ import annotations

import math
from typing import Any, List, Mapping, Optional, Sequence, Tuple

import torch

MASS_ROUNDING = 1e-6  # Σ top-k q above 1 - this: the tail is taken as empty (-inf)


def entry_logprob(value: Any, where: str) -> float:
    """The log-prob of one entry: a vLLM ``Logprob`` (``.logprob``), a dict with ``"logprob"``, or a number."""
    if hasattr(value, "logprob"):
        value = value.logprob
    elif isinstance(value, Mapping):
        if "logprob" not in value:
            raise ValueError(f"{where}: expected a Logprob, a dict with 'logprob' or a number, "
                             f"got keys {sorted(value)}")
        value = value["logprob"]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{where}: expected a float log-prob, got {type(value).__name__} {value!r}")
    value = float(value)
    if math.isnan(value) or value > 0:
        raise ValueError(f"{where}: expected a log-probability (<= 0, not NaN), got {value}")
    return value


def entry_id(key: Any, where: str) -> int:
    """A token id key: an int, or a string of digits (JSON object keys are strings)."""
    if isinstance(key, bool):
        raise TypeError(f"{where}: expected an int token id, got {key!r}")
    if isinstance(key, int):
        token = key
    elif isinstance(key, str) and key.strip().lstrip("-").isdigit():
        token = int(key)
    else:
        raise TypeError(f"{where}: expected an int token id (or a string of digits), got {key!r}")
    if token < 0:
        raise ValueError(f"{where}: expected a token id >= 0, got {token}")
    return token


def topk_rows(positions: Sequence[Optional[Mapping[Any, Any]]], k: Optional[int] = None
              ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(topk_ids [N, k] int64, topk_logprobs [N, k] fp32, tail_logprob [N] fp32)`` from N positions.

    Args:
        positions: one ``{token_id: Logprob | {"logprob": x} | x}`` per row (vLLM's
            ``prompt_logprobs[1:]``; a ``None`` entry is refused with its index).
        k: entries kept per row; default the smallest number of entries over the positions.
    """
    if isinstance(positions, (str, bytes, Mapping)) or not isinstance(positions, Sequence):
        raise TypeError(f"positions: expected a sequence of per-position dicts, got {type(positions).__name__}")
    if len(positions) == 0:
        raise ValueError("positions: expected at least one position, got an empty sequence")
    for i, pos in enumerate(positions):
        if pos is None:
            raise ValueError(f"positions[{i}]: got None (vLLM's first prompt position predicts nothing: "
                             f"pass prompt_logprobs[1:])")
        if not isinstance(pos, Mapping) or len(pos) == 0:
            raise ValueError(f"positions[{i}]: expected a non-empty dict {{token_id: logprob}}, got {pos!r}")
    fewest = min(len(pos) for pos in positions)
    if k is None:
        k = fewest
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k: expected an int >= 1, got {k!r}")
    ids: List[List[int]] = []
    lps: List[List[float]] = []
    tails: List[float] = []
    for i, pos in enumerate(positions):
        if len(pos) < k:
            raise ValueError(f"positions[{i}]: has {len(pos)} entries, fewer than k={k} (pass k <= {fewest})")
        entries = sorted(((entry_logprob(v, f"positions[{i}][{key!r}]"), entry_id(key, f"positions[{i}]"))
                          for key, v in pos.items()), key=lambda e: (-e[0], e[1]))
        kept = entries[:k]
        if len({t for _, t in kept}) < k:
            raise ValueError(f"positions[{i}]: a token id appears twice among the kept entries {[t for _, t in kept]}")
        mass = math.fsum(math.exp(lp) for lp, _ in kept)
        tails.append(math.log1p(-mass) if mass < 1 - MASS_ROUNDING else -math.inf)
        ids.append([t for _, t in kept])
        lps.append([lp for lp, _ in kept])
    return (torch.tensor(ids, dtype=torch.int64), torch.tensor(lps, dtype=torch.float32),
            torch.tensor(tails, dtype=torch.float32))
