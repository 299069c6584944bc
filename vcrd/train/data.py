"""The jsonl data format shared by ``vcrd score`` and the trainer.

One JSON object per line: ``prompt`` (non-empty string), ``response`` (string), optional
``teacher`` (string) and optional ``steps`` (list of strings, the response already split into
reasoning steps). A bad line raises ``ValueError`` naming the file and line before anything is
written anywhere.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Union

import torch


@dataclass
class Example:
    prompt: str
    response: str
    teacher: Optional[str] = None
    steps: Optional[List[str]] = None
    extra: Dict[str, object] = field(default_factory=dict)

    def to_json(self) -> Dict[str, object]:
        row = {"prompt": self.prompt, "response": self.response, **self.extra}
        if self.teacher is not None:
            row["teacher"] = self.teacher
        if self.steps is not None:
            row["steps"] = self.steps
        return row


def parse_row(row: object, where: str) -> Example:
    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}")
    for name in ("prompt", "response"):
        if name not in row:
            raise ValueError(f"{where}: missing field {name!r}")
        if not isinstance(row[name], str):
            raise ValueError(f"{where}: field {name!r} must be a string, got {type(row[name]).__name__}")
    if not row["prompt"].strip():
        raise ValueError(f"{where}: field 'prompt' is empty")
    teacher = row.get("teacher")
    if teacher is not None and not isinstance(teacher, str):
        raise ValueError(f"{where}: field 'teacher' must be a string, got {type(teacher).__name__}")
    steps = row.get("steps")
    if steps is not None and (not isinstance(steps, list) or not all(isinstance(s, str) for s in steps)):
        raise ValueError(f"{where}: field 'steps' must be a list of strings")
    extra = {k: v for k, v in row.items() if k not in ("prompt", "response", "teacher", "steps")}
    return Example(row["prompt"], row["response"], teacher, steps, extra)


def read_jsonl(path: Union[str, Path]) -> List[Example]:
    """All examples of a jsonl file (blank lines skipped); a bad line raises ``ValueError`` with its number."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data: no such file {str(path)!r}")
    examples = []
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not valid JSON ({e.msg})") from None
            examples.append(parse_row(row, where))
    return examples


def write_jsonl(path: Union[str, Path], rows: Iterable[Dict[str, object]]) -> None:
    """Write rows atomically: to a temporary file beside ``path``, then renamed over it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


class DistillCollator:
    """Examples → a padded batch for :func:`vcrd.train.trainer.distill_loss`.

    Tokens: a BOS (if the tokenizer has one), the prompt, then each step (``example.steps`` or the
    response split by SPEC §8's splitter), each piece tokenised on its own, and an EOS (if any) at
    the end of the last step. ``labels`` are the ids with ``-100`` on the prompt and the padding;
    ``step_ids`` number the steps from 1 (0 on the prompt; padding repeats the last step, so ids
    never decrease). Sequences longer than ``max_length`` are cut at the end.
    """

    def __init__(self, tokenizer, max_length: int = 512, max_step_tokens: int = 256) -> None:
        if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
            raise ValueError(f"max_length: expected an int >= 2, got {max_length!r}")
        self.tokenizer, self.max_length, self.max_step_tokens = tokenizer, max_length, max_step_tokens

    def encode(self, example: Example):
        from ..select.naturalness import split_steps

        tok = self.tokenizer
        ids = ([tok.bos_token_id] if tok.bos_token_id is not None else []) + \
            list(tok(example.prompt, add_special_tokens=False)["input_ids"])
        labels, steps = [-100] * len(ids), [0] * len(ids)
        pieces = example.steps if example.steps is not None else split_steps(example.response, tok,
                                                                             self.max_step_tokens)
        for i, piece in enumerate(pieces, 1):
            piece_ids = list(tok(piece, add_special_tokens=False)["input_ids"])
            if i == len(pieces) and tok.eos_token_id is not None:
                piece_ids.append(tok.eos_token_id)
            ids += piece_ids
            labels += piece_ids
            steps += [i] * len(piece_ids)
        return ids[: self.max_length], labels[: self.max_length], steps[: self.max_length]

    def __call__(self, examples) -> Dict[str, torch.Tensor]:
        import torch

        encoded = [self.encode(e if isinstance(e, Example) else parse_row(e, "example")) for e in examples]
        T = max(len(ids) for ids, _, _ in encoded)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        batch = {k: torch.full((len(encoded), T), v, dtype=torch.long)
                 for k, v in (("input_ids", pad), ("labels", -100), ("attention_mask", 0), ("step_ids", 0))}
        for b, (ids, labels, steps) in enumerate(encoded):
            n = len(ids)
            batch["input_ids"][b, :n] = torch.tensor(ids)
            batch["labels"][b, :n] = torch.tensor(labels)
            batch["attention_mask"][b, :n] = 1
            batch["step_ids"][b, :n] = torch.tensor(steps)
            batch["step_ids"][b, n:] = steps[-1]
        return batch
