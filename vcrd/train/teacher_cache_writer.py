"""Writing the teacher cache (:func:`build_cache`, ``vcrd cache-teacher``; SPEC §10, docs/offline.md).

The teacher runs over the (prompt, response) pairs of a jsonl file, tokenised exactly as
:class:`vcrd.train.data.DistillCollator` does, and for every row that carries a loss
(``labels[t + 1] != -100``: the logits at position ``t`` predict the trace token ``t + 1``) one record
is stored, in order of ``t``, example after example: :meth:`SparseTeacher.from_logits` of the teacher's
logits at T=1 (normalised over its full vocabulary ``V``), in the format of
:mod:`vcrd.train.teacher_cache_format`. Every file is written to a temporary name, fsync'ed and renamed;
a shard is finished when its ``shard-NNNNN.json`` record exists, so a killed run restarts at the first
unfinished shard.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import numpy as np
import torch

from ..core.progress import progress as progress_bar
from ..loss.sparse import SparseTeacher
from .data import DistillCollator
from .devices import check_device
from .files import atomic_file, file_sha256, remove_stale_temps
from .teacher_cache_format import (
    DTYPES,
    FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    RESUME_KEYS,
    CacheError,
    plan,
    read_json,
    record_dtype,
    shard_name,
    tokenizer_identity,
    write_json,
)


def teacher_rows(model, checked, batch: Dict[str, torch.Tensor], k: int, chunk: int = 1024) -> List[SparseTeacher]:
    """One :class:`SparseTeacher` per example of the batch: its loss rows, in order of position."""
    from ..core.logit_transform import ModelTransform
    from .models import final_hidden, model_processing

    processing = model_processing(model)  # stored after the model's own scale and soft-cap (SPEC §1, §10)
    transform = ModelTransform(processing.scale, processing.softcap)
    with torch.no_grad():
        h, w, b = final_hidden(model, batch["input_ids"], batch["attention_mask"], "teacher", checked)
        out = []
        for i in range(h.shape[0]):
            pos = (batch["labels"][i, 1:] != -100).nonzero().squeeze(1)  # row t predicts labels[t + 1]
            rows = h[i, pos]
            parts = []
            for r0 in range(0, rows.shape[0], chunk):  # never [B, T, V] logits: only the loss rows, in chunks
                logits = rows[r0:r0 + chunk].float() @ w.float().T
                if b is not None:
                    logits = logits + b.float()
                if not transform.is_identity:
                    logits = transform.apply(logits)
                parts.append(SparseTeacher.from_logits(logits, k))
            if not parts:  # an example without a loss row
                parts = [SparseTeacher(torch.zeros(0, k, dtype=torch.long), torch.zeros(0, k), torch.zeros(0))]
            out.append(SparseTeacher(*(torch.cat([getattr(p, f) for p in parts]) for f in DTYPES)))
        return out


def write_shard(path: Path, rows: int, k: int, fill: Callable[[np.ndarray], None]) -> Tuple[int, str]:
    """Write one shard atomically (:func:`vcrd.train.files.atomic_file`); return its ``(bytes, sha256)``.
    ``fill(memmap)`` writes the records."""
    with atomic_file(path) as tmp:
        array = np.lib.format.open_memmap(tmp, mode="w+", dtype=record_dtype(k), shape=(rows,))
        fill(array)
        array.flush()
        del array
    return path.stat().st_size, file_sha256(path)


def shard_done(out: Path, s: int, entry: Dict[str, Any], say: Callable[[str], None]) -> Optional[Dict[str, Any]]:
    """The record of a finished shard, or ``None`` when it must be (re)written."""
    record_path = out / f"shard-{s:05d}.json"
    try:
        record = json.loads(record_path.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    path = out / entry["file"]
    if record.get("examples") != entry["examples"] or record.get("rows") != entry["rows"]:
        return None
    try:
        size = path.stat().st_size
    except OSError:
        say(f"{path}: finished earlier but now missing; writing it again")
        return None
    if size != record.get("bytes") or file_sha256(path) != record.get("sha256"):
        say(f"{path}: finished earlier but now damaged ({size} bytes, recorded {record.get('bytes')}); "
            f"writing it again")
        return None
    return record


def build_cache(model_dir: Union[str, Path], data: Union[str, Path], out: Union[str, Path], top_k: int, *,
                batch_size: int = 8, shard_rows: int = 65536, max_length: int = 512, max_step_tokens: int = 256,
                device: str = "cpu", progress: bool = True, say: Callable[[str], None] = print) -> Path:
    """Run the teacher in ``model_dir`` over ``data`` and write its top-``top_k`` cache to ``out``
    (continuing an unfinished cache of the same settings there). Returns ``out``.

    Raises ``ValueError`` (bad arguments or data, K > V, an ``out`` holding another cache or other
    files: nothing is touched) and :class:`CacheError`.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from .data import read_jsonl
    from .files import check_writable
    from .model_files import check_model_folder
    from .models import check_causal_lm
    from .run_errors import RunLockedError
    from .run_lock import LOCK_NAME, RunLock

    for name, value, low in (("--top-k", top_k, 1), ("--batch-size", batch_size, 1), ("--shard-rows", shard_rows, 1),
                             ("--max-length", max_length, 2)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name}: expected an int >= {low}, got {value!r}")
    check_device(device)  # before anything is written (no unfinished manifest for a missing GPU)
    model_dir, out = Path(model_dir), Path(out)
    examples = read_jsonl(data)  # every line checked before anything is written
    if not examples:
        raise ValueError(f"data: {data} holds no examples")
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"--model: expected a local Hugging Face model folder with config.json, "
                                f"got {str(model_dir)!r}")
    check_model_folder(model_dir, "--model")
    config = AutoConfig.from_pretrained(model_dir, local_files_only=True)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    V = getattr(text, "vocab_size", None)
    if isinstance(V, int) and top_k > V:
        raise ValueError(f"--top-k: K={top_k} exceeds the teacher's vocabulary V={V}")
    positions = getattr(text, "max_position_embeddings", None)
    if isinstance(positions, int) and max_length > positions:
        raise ValueError(f"--max-length: {max_length} exceeds the teacher's max_position_embeddings={positions}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    except Exception as e:
        raise ValueError(f"--model: cannot load the tokenizer from {model_dir}: {e}") from None
    collator = DistillCollator(tokenizer, max_length, max_step_tokens)
    hashes, offsets, ranges = plan(examples, collator, shard_rows)
    manifest = {"format": FORMAT, "version": FORMAT_VERSION, "complete": False,
                "model": str(model_dir.resolve()), "data": str(data), "tokenizer": tokenizer_identity(tokenizer),
                "K": top_k, "V": V, "temperature": 1.0, "dtypes": DTYPES, "record_bytes": record_dtype(top_k).itemsize,
                "max_length": max_length, "max_step_tokens": max_step_tokens, "shard_rows": shard_rows,
                "n_examples": len(examples), "n_rows": offsets[-1], "row_offsets": offsets, "token_sha256": hashes,
                "shards": [{"file": shard_name(s), "examples": [a, b], "first_row": offsets[a],
                            "rows": offsets[b] - offsets[a]} for s, (a, b) in enumerate(ranges)]}
    check_writable(out, "--out")
    out.mkdir(parents=True, exist_ok=True)
    try:
        with RunLock(out, say):
            return write_missing_shards(model_dir, out, manifest, examples, collator, batch_size, device, progress, say,
                          AutoModelForCausalLM, check_causal_lm)
    except RunLockedError:
        raise CacheError(f"--out: {out} is in use by another vcrd cache-teacher run (lock file "
                         f"{out / LOCK_NAME}); wait for it or use another --out") from None


def write_missing_shards(model_dir, out, manifest, examples, collator, batch_size, device, progress, say, auto_model,
           check_causal_lm) -> Path:
    """Under ``out``'s lock: check an existing manifest against ``manifest`` (or write it into an empty folder),
    then write every shard not finished yet with the teacher's rows, and the final manifest. Returns ``out``."""
    path = out / MANIFEST
    if path.exists():
        stored = read_json(path, "manifest")
        stored = {k: v for k, v in stored.items()} if isinstance(stored, dict) else {}
        # a finished manifest carries shard sizes and hashes: compare the planned part only
        plan_of = lambda m: [{k: sh.get(k) for k in ("file", "examples", "first_row", "rows")}  # noqa: E731
                             for sh in m.get("shards", [])]
        diffs = [key for key in RESUME_KEYS
                 if (plan_of(stored) != plan_of(manifest) if key == "shards" else stored.get(key) != manifest.get(key))]
        if diffs:
            raise CacheError(f"--out: {out} holds a teacher cache built with other settings or data (differs in: "
                             f"{', '.join(diffs)}); nothing was changed. Use another --out, or remove {out} to "
                             f"rebuild")
        complete = bool(stored.get("complete"))
    else:
        others = [p.name for p in out.iterdir() if not p.name.startswith(".")]
        if others:
            raise CacheError(f"--out: {out} is not empty and holds no teacher cache ({', '.join(sorted(others)[:5])}); "
                             f"use an empty or new folder")
        complete = None
        write_json(path, manifest)
    # atomic_file's temporary shards and records left by a killed run (we hold the lock)
    for stale in remove_stale_temps(out, ("shard-*.npy", "shard-*.json", MANIFEST)):
        say(f"removed {stale.name}: a temporary file left by an interrupted run")

    K, shards = manifest["K"], manifest["shards"]
    done = [shard_done(out, s, entry, say) for s, entry in enumerate(shards)]  # finished shards are kept
    todo = [s for s, d in enumerate(done) if d is None]
    if complete and not todo:
        say(f"{out}: the cache is already complete ({manifest['n_rows']} rows); nothing to do")
        return out
    if complete is not None:
        say(f"{out}: continuing an unfinished cache at shard {todo[0]} of {len(shards)}" if todo else
            f"{out}: every shard is finished; writing the final manifest")
        if complete:  # a finished cache with a damaged shard: unfinished again until it is rewritten
            write_json(path, manifest)
    if todo:
        model = auto_model.from_pretrained(model_dir, local_files_only=True).to(device).eval()
        checked = check_causal_lm(model, "teacher")
        V = checked[0].weight.shape[0]
        if manifest["V"] is not None and V != manifest["V"]:
            raise CacheError(f"--model: the LM head has {V} rows but config.vocab_size is {manifest['V']}")
        skipped = sum(sh["examples"][1] - sh["examples"][0] for s, sh in enumerate(shards) if done[s] is not None)
        bar = progress_bar(len(examples), initial=skipped, unit="ex", desc="teacher top-K", disable=not progress)
        for s in todo:
            entry = shards[s]
            a, b = entry["examples"]

            def fill(array: np.ndarray, a=a, b=b, base=entry["first_row"]) -> None:
                for i0 in range(a, b, batch_size):
                    i1 = min(i0 + batch_size, b)
                    batch = collator(examples[i0:i1])
                    for i, st in zip(range(i0, i1), teacher_rows(model, checked, {k: v.to(device) for k, v in
                                                                                   batch.items()}, K)):
                        r0, r1 = manifest["row_offsets"][i] - base, manifest["row_offsets"][i + 1] - base
                        if st.topk_ids.shape[0] != r1 - r0:  # pragma: no cover - plan and collator disagree
                            raise CacheError(f"{examples[i].where}: {st.topk_ids.shape[0]} loss rows, "
                                             f"planned {r1 - r0}")
                        lp16 = st.topk_logprobs.to(torch.float16)
                        try:  # what a reader will check, on the stored 16-bit values
                            SparseTeacher(st.topk_ids, lp16, st.tail_logprob)
                        except ValueError as e:
                            raise CacheError(f"{examples[i].where}: the teacher's top-K would be stored invalid: {e}") \
                                from None
                        array["topk_ids"][r0:r1] = st.topk_ids.cpu().numpy()
                        array["topk_logprobs"][r0:r1] = lp16.cpu().numpy()
                        array["tail_logprob"][r0:r1] = st.tail_logprob.cpu().numpy()
                    bar.update(i1 - i0)

            size, digest = write_shard(out / entry["file"], entry["rows"], K, fill)
            done[s] = {"examples": entry["examples"], "rows": entry["rows"], "bytes": size, "sha256": digest}
            write_json(out / f"shard-{s:05d}.json", done[s])
        bar.close()
    final = {**manifest, "complete": True,
             "shards": [{**entry, "bytes": d["bytes"], "sha256": d["sha256"]} for entry, d in zip(shards, done)]}
    write_json(path, final)
    return out


__all__ = ["build_cache", "write_shard"]
