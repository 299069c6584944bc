"""The jsonl data format shared by ``vcrd score`` and the trainer.

One JSON object per line: ``prompt`` (non-empty string), ``response`` (string), optional
``teacher`` (string) and optional ``steps`` (list of strings, the response already split into
reasoning steps). A bad line (not JSON, not UTF-8, a wrong field) raises ``ValueError`` naming the
file and line before anything is written anywhere; a directory or an unreadable file raises
``ValueError`` saying so (no bare ``PermissionError`` traceback). Each example remembers its
``FILE:LINE`` (``Example.where``) so that later errors and warnings can name it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Union

import torch

from .files import atomic_file


@dataclass
class Example:
    prompt: str
    response: str
    teacher: Optional[str] = None
    steps: Optional[List[str]] = None
    extra: Dict[str, object] = field(default_factory=dict)
    where: Optional[str] = field(default=None, compare=False, repr=False)  # "FILE:LINE" it was read from

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
    for name, text in [("prompt", row["prompt"]), ("response", row["response"]), ("teacher", teacher or ""),
                       *((f"steps[{i}]", s) for i, s in enumerate(steps or []))]:
        _check_unicode(text, where, name)
    extra = {k: v for k, v in row.items() if k not in ("prompt", "response", "teacher", "steps")}
    return Example(row["prompt"], row["response"], teacher, steps, extra, where)


def _check_unicode(text: str, where: str, name: str) -> None:
    """``ValueError`` naming ``where`` and the field if ``text`` holds a lone surrogate (JSON's ``"\\ud800"``
    escape decodes to one): no tokenizer can encode it."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"{where}: field {name!r} holds a lone surrogate (U+{ord(text[e.start]):04X} at character "
                         f"{e.start + 1}), which is not valid Unicode text; fix or drop the line") from None


def open_for_reading(path: Union[str, Path], what: str = "data"):
    """``path`` opened in binary; ``ValueError`` (not a traceback) for a missing file, a directory or a
    file this process may not read."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{what}: {str(path)!r} is a directory, expected a file")
    if not path.exists():
        raise FileNotFoundError(f"{what}: no such file {str(path)!r}")
    try:
        return path.open("rb")
    except PermissionError:
        raise ValueError(f"{what}: cannot read {str(path)!r}: permission denied") from None
    except OSError as e:
        raise ValueError(f"{what}: cannot read {str(path)!r}: {e.strerror or e}") from None


def decode_line(raw: bytes, where: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{where}: not UTF-8 text (byte 0x{raw[e.start]:02x} at column {e.start + 1}); "
                         f"re-encode the file as UTF-8") from None


def read_jsonl(path: Union[str, Path]) -> List[Example]:
    """All examples of a jsonl file (blank lines skipped); a bad line raises ``ValueError`` with its number."""
    path = Path(path)
    examples = []
    with open_for_reading(path) as f:
        for number, raw in enumerate(_lines(f, path), 1):
            where = f"{path}:{number}"
            line = decode_line(raw, where)
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not valid JSON ({e.msg})") from None
            examples.append(parse_row(row, where))
    return examples


def _lines(f, path: Path):
    try:
        yield from f
    except OSError as e:  # e.g. EIO on a failing disk
        raise ValueError(f"data: cannot read {str(path)!r}: {e.strerror or e}") from None


def finite_or_none(value):
    """``value`` with every non-finite float (NaN, ±inf) replaced by ``None`` (JSON ``null``), recursively."""
    if isinstance(value, float):
        return value if value == value and value not in (float("inf"), float("-inf")) else None
    if isinstance(value, dict):
        return {k: finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(v) for v in value]
    return value


def write_jsonl(path: Union[str, Path], rows: Iterable[Dict[str, object]]) -> None:
    """Write rows atomically: to a temporary file beside ``path``, then renamed over it.

    The temporary file is removed on any exception, ``KeyboardInterrupt`` and ``SystemExit`` (run
    under :func:`vcrd.train.signals.signals_exit` so that SIGTERM/SIGHUP raise ``SystemExit``
    too); the result has the permissions of a normal new file (``0666 & ~umask``, or the mode of
    the file it replaces), not ``mkstemp``'s 0600. Strict JSON: a NaN or infinite float raises
    ``ValueError`` (use :func:`finite_or_none` to write them as ``null``).
    """
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"--out: {str(path)!r} is a directory, expected a file name")
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False, allow_nan=False) + "\n")


class DistillCollator:
    """Examples → a padded batch for :func:`vcrd.train.trainer.distill_loss`.

    Tokens: a BOS (if the tokenizer has one), the prompt, then each step (``example.steps`` or the
    response split by SPEC §8's splitter), each piece tokenised on its own, and an EOS (if any) at
    the end of the last step. ``labels`` are the ids with ``-100`` on the prompt and the padding;
    ``step_ids`` number the steps from 1 (0 on the prompt; padding repeats the last step, so ids
    never decrease). Sequences longer than ``max_length`` are cut at the end. Padding is always on the
    right (whatever ``tokenizer.padding_side`` says: the step ids and labels are laid out from the left).
    ``chat_template=True``: the prompt is the user turn of the tokenizer's chat template with the
    assistant's turn opened (:func:`vcrd.select.model_io.chat_prompt`; BOS once), the response its
    answer, ended by the EOS (SmolLM2's ``<|im_end|>``).
    ``with_sources=True`` adds ``batch["sources"]``: each example's ``FILE:LINE`` (a list of strings,
    so only for loops that ignore non-tensor keys, as :class:`VCRDTrainer` does); the trainer's
    non-finite-loss stop names them.
    """

    def __init__(self, tokenizer, max_length: int = 512, max_step_tokens: int = 256,
                 with_sources: bool = False, chat_template: bool = False) -> None:
        if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
            raise ValueError(f"max_length: expected an int >= 2, got {max_length!r}")
        if chat_template and not getattr(tokenizer, "chat_template", None):
            raise ValueError(f"chat_template: expected a tokenizer with a chat template, got "
                             f"{type(tokenizer).__name__} without one")
        self.chat_template = bool(chat_template)
        self.tokenizer, self.max_length, self.max_step_tokens = tokenizer, max_length, max_step_tokens
        self.with_sources = with_sources

    def encode(self, example: Example):
        ids, labels, steps = self.encode_full(example)
        return ids[: self.max_length], labels[: self.max_length], steps[: self.max_length]

    def encode_full(self, example: Example):
        """``(ids, labels, step_ids)`` before the cut at ``max_length``."""
        from ..select.steps import split_steps

        tok = self.tokenizer
        prompt = example.prompt
        if self.chat_template:
            from ..select.model_io import chat_prompt

            prompt = chat_prompt(tok, prompt)
        ids = ([tok.bos_token_id] if tok.bos_token_id is not None else []) + \
            list(tok(prompt, add_special_tokens=False)["input_ids"])
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
        return ids, labels, steps

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
        if self.with_sources:
            batch["sources"] = [getattr(e, "where", None) or f"example {i}" for i, e in enumerate(examples)]
        return batch


@dataclass
class DataReport:
    """What :func:`check_examples` found: rows that carry no loss (``(where, why)``), rows cut at
    ``max_length``, and the largest token id (with its row)."""
    no_loss: List[tuple]
    truncated: List[str]
    max_id: int
    max_id_where: str
    n_rows: int


def check_examples(examples: List[Example], collator: DistillCollator) -> DataReport:
    """Tokenise every example as the collator will and report the rows that can carry no loss (no
    label survives the cut at ``max_length``: an empty response, or a prompt filling ``max_length``),
    the rows cut at ``max_length`` and the largest token id the models will see, each with its
    ``FILE:LINE``."""
    cap = collator.max_length
    no_loss, truncated, max_id, max_where = [], [], -1, ""
    for i, e in enumerate(examples):
        where = e.where or f"example {i}"
        ids, labels, _ = collator.encode_full(e)
        if len(ids) > cap:
            truncated.append(where)
        if ids[:cap] and max(ids[:cap]) > max_id:
            max_id, max_where = max(ids[:cap]), where
        if not any(label != -100 for label in labels[1:cap]):
            n_prompt = next((t for t, label in enumerate(labels) if label != -100), len(labels))
            why = "empty response" if n_prompt == len(labels) else \
                f"its prompt is {n_prompt} tokens, >= max_length={cap}"
            no_loss.append((where, why))
    return DataReport(no_loss, truncated, max_id, max_where, len(examples))
