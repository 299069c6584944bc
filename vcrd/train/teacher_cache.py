"""Reading the teacher cache (SPEC §10; docs/offline.md): :class:`TeacherCache`.

The manifest is read at once, the shards are memory-mapped on first use (never read whole);
:meth:`TeacherCache.rows_for` gives one example's rows as a :class:`SparseTeacher`;
:meth:`TeacherCache.verify` checks, before training, that the cache belongs to this tokenizer and these
token ids and that every record is valid (errors name the file, the row and the example). The format is
:mod:`vcrd.train.teacher_cache_format`, the writer :mod:`vcrd.train.teacher_cache_writer`, the collator
that adds the cached teacher to DistillCollator's batches :mod:`vcrd.train.teacher_cache_collator`.
"""

from __future__ import annotations

import bisect
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from ..loss.sparse import TAIL_TOLERANCE, SparseTeacher
from .data import DistillCollator, Example
from .files import file_sha256
from .teacher_cache_format import (
    DTYPES,
    FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    CacheError,
    compare_tokenizers,
    loss_rows,
    read_json,
    record_dtype,
    token_sha256,
    tokenizer_identity,
)

SCAN_ROWS = 65536  # rows per chunk when a whole shard is checked (bounded memory)


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
        m = read_json(path, "manifest")
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
            if check_hashes and file_sha256(file) != sh["sha256"]:
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


__all__ = ["SCAN_ROWS", "CacheError", "TeacherCache"]
