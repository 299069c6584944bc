"""vcrd's teacher cache (:mod:`vcrd.train.teacher_cache`) from a served teacher's vLLM ``prompt_logprobs``.

The dump: JSON lines, one per example of the training data, in its order::

    {"token_ids": [1, 17, 5, ...], "prompt_logprobs": [null, {"17": -0.31, "4": -1.9}, {"5": {"logprob": -0.02,
     "rank": 1, "decoded_token": "a"}, ...}, ...]}

- ``token_ids``: the ids served to the teacher, exactly ``DistillCollator(tokenizer, max_length,
  max_step_tokens).encode(example)[0]`` (the ids vcrd trains on: checked);
- ``prompt_logprobs``: vLLM's ``RequestOutput.prompt_logprobs`` for them
  (``SamplingParams(prompt_logprobs=K, max_tokens=1)``), one entry per token: ``null`` first, then
  ``{token_id: value}`` with the value a log-prob number or vLLM's ``Logprob`` as a dict
  (``"logprob"``, optional ``"rank"``, ``"decoded_token"``). Entry ``i`` is the teacher's
  distribution of token ``i`` given the tokens before it, and holds token ``token_ids[i]`` (vLLM adds
  the actual token when it is not in its top-K: checked, so a dump shifted by one is refused).

For each loss row ``t`` of an example (``labels[t + 1] != -100``: the row predicting token ``t + 1``)
the cache stores ``SparseTeacher.from_vllm([prompt_logprobs[t + 1]], k)``: the ``k`` most probable
entries, the rest of the mass (the actual token at rank > k included) in the tail
(:mod:`vcrd.core.vllm_logprobs`). ``k`` defaults to the fewest entries of any loss row. The
manifest, shards and checks are the teacher cache's, read by :class:`TeacherCache` like any other:
its ``model`` is the folder giving the tokenizer and ``V`` (config.json's ``vocab_size``); the
served model's weights are never loaded. The log-probs are the served model's own distribution at
T = 1 (its logit scale and soft-cap applied by vLLM), as a cache stores them (SPEC §10).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional, Tuple, Union

import numpy as np
import torch

from ..core.sparse_teacher import SparseTeacher
from .data import DistillCollator, open_for_reading, read_jsonl
from .files import atomic_file, check_writable
from .teacher_cache import TeacherCache
from .teacher_cache_format import (
    DTYPES,
    FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    loss_rows,
    plan,
    record_dtype,
    tokenizer_identity,
)

DumpLine = Tuple[str, List[int], List[Optional[Mapping[str, Any]]]]


def read_vllm_dump(path: Union[str, Path]) -> Iterator[DumpLine]:
    """``(where "FILE:LINE", token_ids, prompt_logprobs)`` per non-blank line, streamed; ``ValueError``
    naming the line for one that is not the format of the module docstring."""
    with open_for_reading(path, "--from-vllm") as f:
        for number, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            where = f"{path}:{number}"
            try:
                line = json.loads(raw)
            except (ValueError, UnicodeDecodeError) as e:
                raise ValueError(f"{where}: not JSON ({e})") from None
            if not isinstance(line, dict) or not {"token_ids", "prompt_logprobs"} <= set(line):
                raise ValueError(f"{where}: expected an object with 'token_ids' and 'prompt_logprobs', got "
                                 f"{sorted(line) if isinstance(line, dict) else type(line).__name__}")
            ids, positions = line["token_ids"], line["prompt_logprobs"]
            if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
                raise ValueError(f"{where}: token_ids: expected a list of ints")
            if not isinstance(positions, list) or len(positions) != len(ids):
                raise ValueError(f"{where}: prompt_logprobs: expected a list of {len(ids)} entries (one per token), "
                                 f"got {len(positions) if isinstance(positions, list) else type(positions).__name__}")
            yield where, ids, positions


def loss_positions(where: str, ids: List[int], positions: List[Any], want_ids: List[int],
                   labels: List[int]) -> List[Mapping[str, Any]]:
    """The dump's entries of an example's loss rows (``prompt_logprobs[t + 1]``), after checking the
    line's ids against the collator's ``want_ids`` and that entry ``t + 1`` holds token ``ids[t + 1]``."""
    if ids != want_ids:
        first = next((i for i, (a, b) in enumerate(zip(ids, want_ids)) if a != b), min(len(ids), len(want_ids)))
        raise ValueError(f"{where}: token_ids differ from the data example's ids at position {first} "
                         f"({len(ids)} ids, the collator gives {len(want_ids)}); serve the teacher exactly "
                         f"DistillCollator(tokenizer, max_length, max_step_tokens).encode(example)[0]")
    out = []
    for t in loss_rows(labels):
        entry = positions[t + 1]
        if not isinstance(entry, Mapping) or not entry:
            raise ValueError(f"{where}: prompt_logprobs[{t + 1}]: expected a non-empty {{token_id: logprob}} dict "
                             f"(a loss row), got {entry!r}")
        if str(ids[t + 1]) not in entry and ids[t + 1] not in entry:
            raise ValueError(f"{where}: prompt_logprobs[{t + 1}] does not hold the token at that position "
                             f"({ids[t + 1]}); vLLM's entry i includes token_ids[i], so the dump is misaligned "
                             f"(keep the leading null)")
        out.append(entry)
    return out


def dump_rows(dump: Union[str, Path], encoded: List[Tuple[List[int], List[int]]]
              ) -> Iterator[Tuple[str, List[Mapping[str, Any]]]]:
    """``(where, the loss rows' entries)`` per example, one dump line each (:func:`loss_positions`);
    ``ValueError`` when the dump has fewer or more lines than there are examples."""
    lines = read_vllm_dump(dump)
    for ids, labels in encoded:
        line = next(lines, None)
        if line is None:
            raise ValueError(f"--from-vllm: {dump} has fewer lines than the data's {len(encoded)} examples")
        yield line[0], loss_positions(*line, ids, labels)
    extra = next(lines, None)
    if extra is not None:
        raise ValueError(f"{extra[0]}: the dump has more lines than the data's {len(encoded)} examples")


def stored_rows(where: str, entries: List[Mapping[str, Any]], k: int, V: int) -> SparseTeacher:
    """:meth:`SparseTeacher.from_vllm` of one example's loss rows, checked as a reader will check them
    (log-probs rounded to float16, ids in ``[0, V)``); errors name the dump line."""
    if not entries:  # an example without a loss row
        return SparseTeacher(torch.zeros(0, k, dtype=torch.long), torch.zeros(0, k), torch.zeros(0))
    try:
        rows = SparseTeacher.from_vllm(entries, k)
        SparseTeacher(rows.topk_ids, rows.topk_logprobs.to(torch.float16), rows.tail_logprob)
    except (TypeError, ValueError) as e:
        raise type(e)(f"{where}: {e} (positions[r] is the line's r-th loss row)") from None
    if int(rows.topk_ids.max()) >= V:
        raise ValueError(f"{where}: token id {int(rows.topk_ids.max())} outside the vocabulary [0, {V})")
    return rows


def cache_from_vllm(dump: Union[str, Path], data: Union[str, Path], model_dir: Union[str, Path],
                    out: Union[str, Path], top_k: Optional[int] = None, *, shard_rows: int = 65536,
                    max_length: int = 512, max_step_tokens: int = 256) -> Path:
    """Write the teacher cache of ``data`` (jsonl) to ``out`` (new or empty) from the vLLM dump ``dump``
    (one line per example, module docstring); ``model_dir``: a local folder with the teacher's tokenizer
    and config.json (``vocab_size``); ``top_k``: default the fewest entries of any loss row. Returns
    ``out``. ``ValueError`` naming the dump line for a mismatch with the data or a malformed entry;
    every line is read and checked before anything is written."""
    from transformers import AutoConfig, AutoTokenizer

    for name, value, low in (("--top-k", top_k, 1), ("--shard-rows", shard_rows, 1), ("--max-length", max_length, 2)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < low):
            raise ValueError(f"{name}: expected an int >= {low}, got {value!r}")
    model_dir, out = Path(model_dir), Path(out)
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"--model: expected a local folder with config.json and the tokenizer, "
                                f"got {str(model_dir)!r}")
    config = AutoConfig.from_pretrained(model_dir, local_files_only=True)
    V = getattr(config.get_text_config() if hasattr(config, "get_text_config") else config, "vocab_size", None)
    if not isinstance(V, int) or V < 1:
        raise ValueError(f"--model: {model_dir / 'config.json'} gives no vocab_size (got {V!r})")
    if top_k is not None and top_k > V:
        raise ValueError(f"--top-k: K={top_k} exceeds the teacher's vocabulary V={V}")
    examples = read_jsonl(data)
    if not examples:
        raise ValueError(f"data: {data} holds no examples")
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    collator = DistillCollator(tokenizer, max_length, max_step_tokens)
    encoded = [collator.encode(e)[:2] for e in examples]
    k = top_k
    if k is None:  # a first pass over the dump: the fewest entries of any loss row
        k = min((len(entry) for _, entries in dump_rows(dump, encoded) for entry in entries), default=None)
        if k is None:
            raise ValueError(f"data: {data} has no loss rows (no response tokens)")
    rows = [stored_rows(where, entries, k, V) for where, entries in dump_rows(dump, encoded)]
    manifest = {"format": FORMAT, "version": FORMAT_VERSION, "complete": True, "model": str(model_dir.resolve()),
                "data": str(data), "source": {"vllm_dump": str(dump)}, "tokenizer": tokenizer_identity(tokenizer),
                "K": k, "V": V, "temperature": 1.0, "dtypes": DTYPES, "record_bytes": record_dtype(k).itemsize,
                "max_length": max_length, "max_step_tokens": max_step_tokens, "shard_rows": shard_rows,
                "n_examples": len(examples)}
    return write_cache(out, rows, manifest, plan(examples, collator, shard_rows))


def write_cache(out: Path, rows: List[SparseTeacher], manifest: Dict[str, Any], planned) -> Path:
    """The shards (``planned = (token hashes, row offsets, example ranges)`` of :func:`plan`) and then
    the manifest, each atomically, into ``out`` (new or empty); the result is opened and verified."""
    hashes, offsets, ranges = planned
    check_writable(out, "--out")
    out.mkdir(parents=True, exist_ok=True)
    if any(out.iterdir()):
        raise ValueError(f"--out: {out} is not empty; a cache from a vLLM dump is written into a new or empty folder")
    shards = []
    for s, (a, b) in enumerate(ranges):
        array = np.zeros(offsets[b] - offsets[a], dtype=record_dtype(manifest["K"]))
        for i in range(a, b):
            r0, r1 = offsets[i] - offsets[a], offsets[i + 1] - offsets[a]
            array["topk_ids"][r0:r1] = rows[i].topk_ids.numpy()
            array["topk_logprobs"][r0:r1] = rows[i].topk_logprobs.to(torch.float16).numpy()
            array["tail_logprob"][r0:r1] = rows[i].tail_logprob.numpy()
        path = out / f"shard-{s:05d}.npy"
        with atomic_file(path) as tmp, open(tmp, "wb") as f:
            np.save(f, array, allow_pickle=False)
        shards.append({"file": path.name, "examples": [a, b], "first_row": offsets[a], "rows": int(array.shape[0]),
                       "bytes": path.stat().st_size, "sha256": hashlib.sha256(path.read_bytes()).hexdigest()})
    manifest = {**manifest, "n_rows": offsets[-1], "row_offsets": offsets, "token_sha256": hashes, "shards": shards}
    with atomic_file(out / MANIFEST) as tmp, open(tmp, "w", encoding="utf-8") as f:
        json.dump(manifest, f, separators=(",", ":"), allow_nan=False)
    TeacherCache(out)  # read back: every shard's size, sha256 and record checked
    return out
