"""Reasoning steps of a response (SPEC §8): the default splitter the scorer, its length checks and the
collator share."""

from __future__ import annotations

import re
from typing import List


def _sentences(text: str) -> List[str]:
    """Split after sentence ends (``.``, ``!``, ``?`` followed by whitespace), keeping the whitespace."""
    return [p for p in re.split(r"(?<=[.!?])(?=\s)", text) if p]


def split_steps(response: str, tokenizer, max_step_tokens: int = 256) -> List[str]:
    """SPEC §8 default splitter: on blank lines, each step keeping its trailing separator; a step
    longer than ``max_step_tokens`` ids is split further at sentence ends (greedily, sentences
    kept whole). Concatenating the steps gives back the response."""
    steps = [m for m in re.findall(r".*?(?:\n\s*\n|$)", response, flags=re.S) if m]
    out: List[str] = []
    for step in steps:
        if len(tokenizer(step, add_special_tokens=False)["input_ids"]) <= max_step_tokens:
            out.append(step)
            continue
        piece = ""
        for sentence in _sentences(step):
            if piece and len(tokenizer(piece + sentence, add_special_tokens=False)["input_ids"]) > max_step_tokens:
                out.append(piece)
                piece = ""
            piece += sentence
        out.append(piece)
    return out
