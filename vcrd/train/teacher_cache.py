"""The sparse (top-K) teacher cache on disk (SPEC §10): write it once, train from it without the teacher.

Writing (:func:`build_cache`, ``vcrd cache-teacher``): the teacher runs over the (prompt, response)
pairs of a jsonl file, tokenised exactly as :class:`vcrd.train.data.DistillCollator` does, and for
every row that carries a loss (``labels[t + 1] != -100``: the logits at position ``t`` predict the
trace token ``t + 1``) one record is stored, in order of ``t``, example after example:

    topk_ids int32 [K]   topk_logprobs float16 [K]   tail_logprob float32

i.e. :meth:`SparseTeacher.from_logits` of the teacher's logits at T=1 (normalised over its full
vocabulary ``V``). Records live in numpy ``.npy`` files (a structured dtype, one record per row,
``6K + 4`` bytes) of about ``shard_rows`` rows each, whole examples per shard, plus
``manifest.json`` (format, tokenizer identity, model, K, V, dtypes, per-example token-id hashes and
row offsets, shards with sizes and sha256). Every file is written to a temporary name, fsync'ed and
renamed; a shard is finished when its ``shard-NNNNN.json`` record exists, so a killed run restarts
at the first unfinished shard. See docs/offline.md.

Reading (:class:`TeacherCache`): the manifest is read at once, the shards are memory-mapped on first
use (never read whole); :meth:`TeacherCache.rows_for` gives one example's rows as a
:class:`SparseTeacher`; :meth:`TeacherCache.verify` checks, before training, that the cache belongs
to this tokenizer and these token ids and that every record is valid (errors name the file, the row
and the example); :class:`TeacherCacheCollator` adds the cached teacher to DistillCollator's batches.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import math
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from ..core.progress import progress as progress_bar
from ..loss.sparse import TAIL_TOLERANCE, SparseTeacher
from .data import DistillCollator, Example
from .devices import check_device
from .files import atomic_file, remove_stale_temps

FORMAT = "vcrd-teacher-cache"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
PROBE = "The quick brown fox, 0123456789 +-*/=()?!\n\tÄé中"  # ids of this string identify the tokenizer
DTYPES = {"topk_ids": "int32", "topk_logprobs": "float16", "tail_logprob": "float32"}
SCAN_ROWS = 65536  # rows per chunk when a whole shard is checked (bounded memory)
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


# ------------------------------------------------------------------------------------------ files
def _write_json(path: Path, obj: Any) -> None:
    """Atomically (:func:`vcrd.train.files.atomic_file`); compact: two entries per example."""
    with atomic_file(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, separators=(",", ":"), allow_nan=False)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _shard_name(s: int) -> str:
    return f"shard-{s:05d}.npy"


def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise CacheError(f"{path}: unreadable {what} ({e})") from None


# ------------------------------------------------------------------------------------------ writing
def _teacher_rows(model, checked, batch: Dict[str, torch.Tensor], k: int, chunk: int = 1024) -> List[SparseTeacher]:
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


def _write_shard(path: Path, rows: int, k: int, fill: Callable[[np.ndarray], None]) -> Tuple[int, str]:
    """Write one shard atomically (:func:`vcrd.train.files.atomic_file`); return its ``(bytes, sha256)``.
    ``fill(memmap)`` writes the records."""
    with atomic_file(path) as tmp:
        array = np.lib.format.open_memmap(tmp, mode="w+", dtype=record_dtype(k), shape=(rows,))
        fill(array)
        array.flush()
        del array
    return path.stat().st_size, _sha256(path)


def _shard_done(out: Path, s: int, entry: Dict[str, Any], say: Callable[[str], None]) -> Optional[Dict[str, Any]]:
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
    if size != record.get("bytes") or _sha256(path) != record.get("sha256"):
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

    from .checkpoints import LOCK_NAME, RunLock, RunLockedError, check_model_folder, check_writable
    from .data import read_jsonl
    from .models import check_causal_lm

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
                "shards": [{"file": _shard_name(s), "examples": [a, b], "first_row": offsets[a],
                            "rows": offsets[b] - offsets[a]} for s, (a, b) in enumerate(ranges)]}
    check_writable(out, "--out")
    out.mkdir(parents=True, exist_ok=True)
    try:
        with RunLock(out, say):
            return _build(model_dir, out, manifest, examples, collator, batch_size, device, progress, say,
                          AutoModelForCausalLM, check_causal_lm)
    except RunLockedError:
        raise CacheError(f"--out: {out} is in use by another vcrd cache-teacher run (lock file "
                         f"{out / LOCK_NAME}); wait for it or use another --out") from None


def _build(model_dir, out, manifest, examples, collator, batch_size, device, progress, say, auto_model,
           check_causal_lm) -> Path:
    path = out / MANIFEST
    if path.exists():
        stored = _read_json(path, "manifest")
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
        _write_json(path, manifest)
    # atomic_file's temporary shards and records left by a killed run (we hold the lock)
    for stale in remove_stale_temps(out, ("shard-*.npy", "shard-*.json", MANIFEST)):
        say(f"removed {stale.name}: a temporary file left by an interrupted run")

    K, shards = manifest["K"], manifest["shards"]
    done = [_shard_done(out, s, entry, say) for s, entry in enumerate(shards)]  # finished shards are kept
    todo = [s for s, d in enumerate(done) if d is None]
    if complete and not todo:
        say(f"{out}: the cache is already complete ({manifest['n_rows']} rows); nothing to do")
        return out
    if complete is not None:
        say(f"{out}: continuing an unfinished cache at shard {todo[0]} of {len(shards)}" if todo else
            f"{out}: every shard is finished; writing the final manifest")
        if complete:  # a finished cache with a damaged shard: unfinished again until it is rewritten
            _write_json(path, manifest)
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
                    for i, st in zip(range(i0, i1), _teacher_rows(model, checked, {k: v.to(device) for k, v in
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

            size, digest = _write_shard(out / entry["file"], entry["rows"], K, fill)
            done[s] = {"examples": entry["examples"], "rows": entry["rows"], "bytes": size, "sha256": digest}
            _write_json(out / f"shard-{s:05d}.json", done[s])
        bar.close()
    final = {**manifest, "complete": True,
             "shards": [{**entry, "bytes": d["bytes"], "sha256": d["sha256"]} for entry, d in zip(shards, done)]}
    _write_json(path, final)
    return out


# ------------------------------------------------------------------------------------------ reading
class TeacherCache:
    """A finished teacher cache, opened read-only: the manifest now, each shard memory-mapped on first use.

    ``CacheError`` (a ``ValueError``) at once for a missing or unfinished manifest, an unknown format,
    K > V, or a shard file that is missing or not the size the manifest records (truncated); and, with
    ``verify=True`` (the default), for a shard whose sha256 differs from the manifest's or that holds an
    invalid record (:meth:`verify` without examples): every reader sees a damaged cache before it reads a
    row. ``verify=False`` for a caller that runs :meth:`verify` with its examples right away.
    """

    def __init__(self, folder: Union[str, Path], *, verify: bool = True) -> None:
        self.folder = Path(folder)
        path = self.folder / MANIFEST
        if not path.is_file():
            raise CacheError(f"{path}: no teacher cache manifest (build the cache with vcrd cache-teacher)")
        m = _read_json(path, "manifest")
        if not isinstance(m, dict) or m.get("format") != FORMAT:
            raise CacheError(f"{path}: not a vcrd teacher cache manifest")
        if m.get("version") != FORMAT_VERSION:
            raise CacheError(f"{path}: format version {m.get('version')!r}, this vcrd reads {FORMAT_VERSION}")
        if not m.get("complete"):
            raise CacheError(f"{path}: the cache is unfinished (its writer stopped); rerun the same vcrd cache-teacher "
                             f"command to finish it")
        if m.get("dtypes") != DTYPES:
            raise CacheError(f"{path}: record dtypes {m.get('dtypes')}, expected {DTYPES}")
        self.manifest, self.k, self.vocab = m, int(m["K"]), int(m["V"])
        if self.k > self.vocab:
            raise CacheError(f"{path}: K={self.k} exceeds the vocabulary V={self.vocab}")
        self.offsets: List[int] = m["row_offsets"]
        self.shards: List[Dict[str, Any]] = m["shards"]
        if len(self.offsets) != m["n_examples"] + 1 or len(m["token_sha256"]) != m["n_examples"]:
            raise CacheError(f"{path}: row_offsets/token_sha256 do not match n_examples={m['n_examples']}")
        self._firsts = [sh["examples"][0] for sh in self.shards]
        self._maps: Dict[int, np.ndarray] = {}
        for sh in self.shards:
            file = self.folder / sh["file"]
            try:
                size = file.stat().st_size
            except FileNotFoundError:
                raise CacheError(f"{file}: missing shard (rows {sh['first_row']}..{sh['first_row'] + sh['rows'] - 1},"
                                 f" examples {sh['examples'][0]}..{sh['examples'][1] - 1})") from None
            if size != sh["bytes"]:
                raise CacheError(f"{file}: truncated or damaged shard: {size} bytes, the manifest records "
                                 f"{sh['bytes']} (rows {sh['first_row']}..{sh['first_row'] + sh['rows'] - 1})")
        if verify:
            self.verify()

    def __len__(self) -> int:
        return self.manifest["n_examples"]

    @property
    def n_rows(self) -> int:
        return self.manifest["n_rows"]

    def _shard(self, s: int) -> np.ndarray:
        if s not in self._maps:
            sh, file = self.shards[s], self.folder / self.shards[s]["file"]
            try:
                array = np.load(file, mmap_mode="r", allow_pickle=False)
            except (OSError, ValueError) as e:
                raise CacheError(f"{file}: unreadable shard ({e})") from None
            if array.dtype != record_dtype(self.k) or array.shape != (sh["rows"],):
                raise CacheError(f"{file}: holds {array.shape} records of {array.dtype}, the manifest says "
                                 f"({sh['rows']},) of {record_dtype(self.k)}")
            self._maps[s] = array
        return self._maps[s]

    def locate(self, example_index: int) -> Tuple[int, int, int]:
        """``(shard, first row in the shard, end row)`` of an example's records."""
        if not 0 <= example_index < len(self):
            raise IndexError(f"example {example_index}: the cache holds {len(self)} examples")
        s = bisect.bisect_right(self._firsts, example_index) - 1
        base = self.shards[s]["first_row"]
        return s, self.offsets[example_index] - base, self.offsets[example_index + 1] - base

    def rows_for(self, example_index: int) -> SparseTeacher:
        """Example ``example_index``'s rows (its loss positions in order) as a ``SparseTeacher [R, K]``."""
        s, r0, r1 = self.locate(example_index)
        records = self._shard(s)[r0:r1]  # a few pages of the memmap, copied
        fields = [torch.from_numpy(np.ascontiguousarray(records[name])) for name in DTYPES]
        try:
            return SparseTeacher(*fields)
        except ValueError as e:
            raise CacheError(f"{self.folder / self.shards[s]['file']}: example {example_index} (shard rows "
                             f"{r0}..{r1 - 1}): {e}") from None

    def _where(self, global_row: int, examples: Optional[Sequence[Example]] = None) -> str:
        i = bisect.bisect_right(self.offsets, global_row) - 1
        src = getattr(examples[i], "where", None) if examples is not None and i < len(examples) else None
        return f"example {i}" + (f" ({src})" if src else "")

    def verify(self, examples: Optional[Sequence[Example]] = None, collator: Optional[DistillCollator] = None, *,
               vocab_size: Optional[int] = None, check_hashes: bool = True, check_values: bool = True,
               progress: bool = False) -> None:
        """Before training: ``CacheError`` naming the file, the row and the example unless the cache was
        built with ``collator``'s tokenizer (and ``max_length``) over exactly these ``examples``, every
        shard is intact (sha256), and every record is valid: ids in ``[0, V)`` (and ``[0, vocab_size)``,
        the student's vocabulary, when given), log-probs not NaN and ``<= 0`` in decreasing order, and the
        tail consistent with the top-K mass. Reads the shards in chunks of ``SCAN_ROWS`` rows."""
        m = self.manifest
        if collator is not None:
            diffs = compare_tokenizers(m["tokenizer"], tokenizer_identity(collator.tokenizer))
            if diffs:
                raise CacheError(f"{self.folder / MANIFEST}: built with another tokenizer ({m['tokenizer']['class']}, "
                                 f"now {type(collator.tokenizer).__name__}): {'; '.join(diffs)}")
            if (collator.max_length, collator.max_step_tokens) != (m["max_length"], m["max_step_tokens"]):
                raise CacheError(f"{self.folder / MANIFEST}: built with max_length={m['max_length']}, "
                                 f"max_step_tokens={m['max_step_tokens']}; the training collator uses "
                                 f"{collator.max_length}, {collator.max_step_tokens}")
        if examples is not None:
            if len(examples) != len(self):
                raise CacheError(f"{self.folder / MANIFEST}: the cache holds {len(self)} examples, the training data "
                                 f"{len(examples)}")
            if collator is None:
                raise ValueError("verify: examples need the collator that tokenises them")
            for i, e in enumerate(examples):
                self.check_example(i, *collator.encode(e)[:2], where=getattr(e, "where", None))
        if vocab_size is not None and self.k > vocab_size:
            raise CacheError(f"{self.folder / MANIFEST}: K={self.k} exceeds the student's vocabulary V={vocab_size}")
        limit = self.vocab if vocab_size is None else min(self.vocab, vocab_size)
        for s, sh in enumerate(self.shards):
            file = self.folder / sh["file"]
            if check_hashes and _sha256(file) != sh["sha256"]:
                raise CacheError(f"{file}: damaged shard: its sha256 differs from the manifest's")
            if check_values:
                self._scan(s, file, limit, examples)

    def check_example(self, i: int, ids: Sequence[int], labels: Sequence[int], where: Optional[str] = None) -> None:
        """``CacheError`` unless example ``i`` tokenises to the ids the cache was built from."""
        name = f"example {i}" + (f" ({where})" if where else "")
        if token_sha256(ids) != self.manifest["token_sha256"][i]:
            raise CacheError(f"{self.folder / MANIFEST}: {name}: its token ids differ from those the cache was built "
                             f"from (another data line, tokenizer or max_length); rebuild the cache")
        rows = len(loss_rows(labels))
        if rows != self.offsets[i + 1] - self.offsets[i]:
            raise CacheError(f"{self.folder / MANIFEST}: {name}: {rows} loss rows, the cache has "
                             f"{self.offsets[i + 1] - self.offsets[i]}")

    def _scan(self, s: int, file: Path, limit: int, examples) -> None:
        array, base = self._shard(s), self.shards[s]["first_row"]
        for r0 in range(0, array.shape[0], SCAN_ROWS):
            chunk = array[r0:r0 + SCAN_ROWS]
            ids, lp = chunk["topk_ids"], chunk["topk_logprobs"].astype(np.float64)
            tail = chunk["tail_logprob"].astype(np.float64)

            def fail(mask: np.ndarray, what: str, r0: int = r0) -> None:
                r = r0 + int(np.flatnonzero(mask)[0])
                raise CacheError(f"{file}: row {r} (cache row {base + r}, {self._where(base + r, examples)}): {what}; "
                                 f"rebuild the cache")

            bad = ((ids < 0) | (ids >= limit)).any(-1)
            if bad.any():
                r = int(np.flatnonzero(bad)[0])
                fail(bad, f"token id {int(ids[r][(ids[r] < 0) | (ids[r] >= limit)][0])} outside [0, {limit})")
            bad = (np.isnan(lp) | (lp > 0)).any(-1) | np.isnan(tail) | (tail > 0)
            if bad.any():
                fail(bad, "a log-probability that is NaN or positive")
            bad = (np.diff(lp, axis=-1) > 0).any(-1)
            if bad.any():
                fail(bad, "top-K log-probabilities not in decreasing order")
            with np.errstate(divide="ignore", invalid="ignore"):
                total = np.logaddexp(np.logaddexp.reduce(lp, axis=-1), tail)
            bad = ~(np.abs(total) <= TAIL_TOLERANCE)
            if bad.any():
                r = int(np.flatnonzero(bad)[0])
                fail(bad, f"the top-K mass and the tail sum to exp({total[r]:.4g}), not 1 (tolerance {TAIL_TOLERANCE})")


# ------------------------------------------------------------------------------------------ collating
def filler(k: int, vocab: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A valid, finite teacher row for positions without a loss (prompt, padding, the last position):
    the uniform distribution (ids ``0..K-1`` at ``-log V``, the tail ``log(1 - K/V)``, ``-inf`` at K = V).
    Every completed log-prob is finite, so no NaN can arise on those rows (their weight is zero)."""
    ids = torch.arange(k, dtype=torch.int32)
    lp = torch.full((k,), -math.log(vocab), dtype=torch.float16)
    tail = torch.tensor(math.log1p(-k / vocab) if k < vocab else -math.inf, dtype=torch.float32)
    return ids, lp, tail


class IndexedExamples:
    """``examples`` as a dataset of ``(index, example)`` pairs, for :class:`TeacherCacheCollator`."""

    def __init__(self, examples: Sequence[Example]) -> None:
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> Tuple[int, Example]:
        return i, self.examples[i]


class TeacherCacheCollator:
    """:class:`DistillCollator`'s batch plus the cached teacher, aligned with the shifted labels.

    Items are ``(dataset index, Example)`` pairs (:class:`IndexedExamples`). Adds
    ``teacher_topk_ids [B, T, K]`` (int32), ``teacher_topk_logprobs [B, T, K]`` (float16) and
    ``teacher_tail_logprob [B, T]`` (float32): position ``t`` holds the teacher's view of the token
    ``t + 1`` (so ``teacher_*[:, :-1]`` pairs with ``labels[:, 1:]`` and the student's ``h[:, :-1]``);
    positions without a loss hold :func:`filler`. Each example's token ids are checked against the
    cache's hash (``CacheError`` naming the example) before its rows are used.
    """

    def __init__(self, collator: DistillCollator, cache: TeacherCache) -> None:
        if not isinstance(collator, DistillCollator):
            raise TypeError(f"collator: expected a DistillCollator, got {type(collator).__name__}")
        self.collator, self.cache = collator, cache

    def __call__(self, items) -> Dict[str, Any]:
        pairs = [item if isinstance(item, tuple) else (item["index"], item["example"]) for item in items]
        examples = [e for _, e in pairs]
        batch = self.collator(examples)
        B, T = batch["input_ids"].shape
        K = self.cache.k
        ids, lp, tail = filler(K, self.cache.vocab)
        out_ids = ids.expand(B, T, K).clone()
        out_lp = lp.expand(B, T, K).clone()
        out_tail = tail.expand(B, T).clone()
        for b, (index, example) in enumerate(pairs):
            full_ids, full_labels, _ = self.collator.encode(example)
            self.cache.check_example(int(index), full_ids, full_labels, getattr(example, "where", None))
            pos = (batch["labels"][b, 1:] != -100).nonzero().squeeze(1)
            teacher = self.cache.rows_for(int(index))
            out_ids[b, pos] = teacher.topk_ids
            out_lp[b, pos] = teacher.topk_logprobs
            out_tail[b, pos] = teacher.tail_logprob
        batch.update(teacher_topk_ids=out_ids, teacher_topk_logprobs=out_lp, teacher_tail_logprob=out_tail)
        return batch


def sparse_teacher_of(batch: Dict[str, torch.Tensor]) -> SparseTeacher:
    """The cached teacher of a collated batch for the shifted rows (``[B, T - 1, K]``)."""
    return SparseTeacher(batch["teacher_topk_ids"][:, :-1], batch["teacher_topk_logprobs"][:, :-1],
                         batch["teacher_tail_logprob"][:, :-1])
