"""The teacher cache's on-disk format (SPEC §10; docs/offline.md): one record per loss row

    topk_ids int32 [K]   topk_logprobs float16 [K]   tail_logprob float32

in numpy ``.npy`` shards of whole examples, plus ``manifest.json`` (format, tokenizer identity, model, K, V,
dtypes, per-example token-id hashes and row offsets, shards with sizes and sha256). What the writer
(:mod:`vcrd.train.teacher_cache_writer`) and the reader (:mod:`vcrd.train.teacher_cache`) share: the
names, the record dtype, the hashes, the shard plan and the JSON files.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Dict, List, Sequence

import numpy as np

from .data import DistillCollator, Example
from .files import atomic_file

FORMAT = "vcrd-teacher-cache"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
PROBE = "The quick brown fox, 0123456789 +-*/=()?!\n\tÄé中"  # ids of this string identify the tokenizer
DTYPES = {"topk_ids": "int32", "topk_logprobs": "float16", "tail_logprob": "float32"}
# what must agree between an existing --out and a new run for the run to continue it
RESUME_KEYS = ("format", "version", "model", "tokenizer", "K", "V", "max_length", "max_step_tokens", "shard_rows",
               "n_examples", "n_rows", "row_offsets", "token_sha256", "shards")


class CacheError(ValueError):
    """A teacher cache that cannot be used (or continued): names the file, the row and the example."""


def record_dtype(k: int) -> np.dtype:
    """One record per token row: the three fields of SPEC §10, packed (``6k + 4`` bytes)."""
    return np.dtype([("topk_ids", "<i4", (k,)), ("topk_logprobs", "<f2", (k,)), ("tail_logprob", "<f4")])


def token_sha256(ids: Sequence[int]) -> str:
    """sha256 of a row's input ids as little-endian int64 (the ids the teacher saw)."""
    return hashlib.sha256(np.asarray(ids, dtype="<i8").tobytes()).hexdigest()


def tokenizer_identity(tokenizer) -> Dict[str, Any]:
    """What identifies a tokenizer's ids: vocabulary size and hash, special ids, the ids of a probe
    string; ``class`` is informational (a slow and a fast tokenizer with the same ids agree)."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: (kv[1], kv[0]))
    return {"class": type(tokenizer).__name__, "vocab_size": len(tokenizer),
            "vocab_sha256": hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode("utf-8")).hexdigest(),
            "special_ids": {name: getattr(tokenizer, f"{name}_token_id", None) for name in ("bos", "eos", "pad")},
            "probe_ids": [int(i) for i in tokenizer(PROBE, add_special_tokens=False)["input_ids"]]}


def compare_tokenizers(stored: Dict[str, Any], current: Dict[str, Any]) -> List[str]:
    """The differences between two :func:`tokenizer_identity` records, one line each (none: the same ids)."""
    keys = ("vocab_size", "vocab_sha256", "special_ids", "probe_ids")
    return [f"{key}: cache {stored.get(key)!r}, now {current.get(key)!r}"
            for key in keys if stored.get(key) != current.get(key)]


def loss_rows(labels: Sequence[int]) -> List[int]:
    """Positions ``t`` whose logits carry a loss: ``labels[t + 1] != -100`` (the shifted labels)."""
    return [t for t in range(len(labels) - 1) if labels[t + 1] != -100]


def plan(examples: Sequence[Example], collator: DistillCollator, shard_rows: int):
    """``(token hashes, row offsets [n + 1], shards [(first, end) example ranges])``: whole examples per
    shard, at most ``shard_rows`` rows each unless one example alone has more."""
    hashes, offsets = [], [0]
    for e in examples:
        ids, labels, _ = collator.encode(e)
        hashes.append(token_sha256(ids))
        offsets.append(offsets[-1] + len(loss_rows(labels)))
    shards, first = [], 0
    for i in range(1, len(examples) + 1):
        if i == len(examples) or (offsets[i + 1] - offsets[first] > shard_rows and i > first):
            shards.append((first, i))
            first = i
    return hashes, offsets, shards


def write_json(path: Path, obj: Any) -> None:
    """Atomically (:func:`vcrd.train.files.atomic_file`); compact: two entries per example."""
    with atomic_file(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, separators=(",", ":"), allow_nan=False)


def shard_name(s: int) -> str:
    """The file name of shard ``s``."""
    return f"shard-{s:05d}.npy"


def read_json(path: Path, what: str) -> Any:
    """A JSON file's content, or :class:`CacheError` naming the file and ``what`` it should hold."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise CacheError(f"{path}: unreadable {what} ({e})") from None


__all__ = ["DTYPES", "FORMAT", "FORMAT_VERSION", "MANIFEST", "PROBE", "RESUME_KEYS", "CacheError", "compare_tokenizers",
           "loss_rows", "plan", "read_json", "record_dtype", "shard_name", "token_sha256", "tokenizer_identity",
           "write_json"]
