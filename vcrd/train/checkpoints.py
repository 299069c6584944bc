"""Atomic checkpoints for ``vcrd train``: a ``checkpoint-N`` folder (and ``final``) is either complete or absent.

:class:`AtomicCheckpointMixin` (mixed into the ``transformers.Trainer``): each ``checkpoint-N`` is written
into ``.checkpoint-N.tmp-PID/``, gets a manifest (``vcrd_checkpoint.json``: every file's size and sha256, the
run's config, data hash and preset) written last, is fsync'ed and then renamed into place
(:mod:`vcrd.train.checkpoint_folders`). A failed write (disk full, permission) raises
:class:`CheckpointWriteError` saying what failed and where, removes the partial folder and lists the earlier
checkpoints, which are untouched. :func:`save_final` does the same for ``final``. Resuming:
:mod:`vcrd.train.resume`; the run's lock: :mod:`vcrd.train.run_lock`.

Under ``torchrun`` (several ranks, one shared folder) rank 0 writes the shared files; each stage of a save
ends on every rank with :func:`vcrd.distributed.ranks.agreed`, a barrier that fails all ranks when one fails.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Dict, Optional

from ..distributed.ranks import agreed
from .checkpoint_folders import MANIFEST, checkpoints, commit_folder, fsync_tree
from .files import file_sha256
from .run_errors import CheckpointWriteError


class AtomicCheckpointMixin:
    """Mixed into a ``transformers.Trainer`` (before it in the bases): atomic, verified checkpoints.

    ``run_manifest`` (a JSON-able dict: config, data hash, preset, world size) is stored in every
    checkpoint's ``vcrd_checkpoint.json``.

    Under a launcher (``torchrun``: several ranks, one shared folder) the Trainer's save runs on every
    rank: rank 0 (``args.should_save``) creates the staging folder, writes the weights, optimizer,
    scheduler and trainer state, every rank its ``rng_state_<rank>.pth``; then rank 0 alone writes the
    manifest and renames the folder into place. Each stage ends with :func:`vcrd.distributed.ranks.agreed`
    (a barrier carrying failures), so a failed write raises :class:`CheckpointWriteError` on every rank.
    ``staging_id`` (rank 0's pid on every rank) names the shared staging folder.
    """

    run_manifest: Dict[str, Any] = {}
    staging_id: Optional[int] = None
    _vcrd_staging: Optional[str] = None

    def _get_output_dir(self, trial):  # the Trainer writes checkpoint-N under this folder
        if self._vcrd_staging is not None:
            return self._vcrd_staging
        return super()._get_output_dir(trial)

    def _save_checkpoint(self, model, trial) -> None:
        run_dir = Path(super()._get_output_dir(trial))
        name = f"checkpoint-{self.state.global_step}"
        staging = run_dir / f".{name}.tmp-{self.staging_id or os.getpid()}"
        writer = self.args.should_save
        save = super()._save_checkpoint

        def stage(action: Callable[[], None]) -> None:  # on every rank, then fail together
            try:
                agreed(action, catch=(OSError,))
            except OSError as e:
                raise CheckpointWriteError(self._write_failure(e, name, staging, run_dir)) from e

        def fresh() -> None:
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True)

        def commit() -> None:
            written = staging / name
            paths = [p for p in sorted(written.rglob("*")) if p.is_file()]
            files = {str(p.relative_to(written)): p.stat().st_size for p in paths}
            hashes = {str(p.relative_to(written)): file_sha256(p) for p in paths}  # content, not only size
            with open(written / MANIFEST, "w", encoding="utf-8") as f:
                json.dump({"format": 1, "step": self.state.global_step, "run": self.run_manifest, "files": files,
                           "sha256": hashes}, f, indent=1)
            fsync_tree(written)
            commit_folder(written, run_dir / name)

        try:
            stage(fresh if writer else lambda: None)
            self._vcrd_staging = str(staging)
            stage(lambda: save(model, trial))  # -> staging/checkpoint-N
            stage(commit if writer else lambda: None)
        finally:
            self._vcrd_staging = None
            if writer:
                shutil.rmtree(staging, ignore_errors=True)

    @staticmethod
    def _write_failure(e: OSError, name: str, staging: Path, run_dir: Path) -> str:
        target = e.filename
        if not target:  # e.g. raised inside torch.save: name the newest file of the partial folder
            partial = [p for p in staging.rglob("*") if p.is_file()] if staging.exists() else []
            target = max(partial, key=lambda p: p.stat().st_mtime_ns) if partial else staging
        earlier = [p.name for _, p in checkpoints(run_dir) if p.name != name]
        kept = f"the earlier checkpoints are intact: {', '.join(reversed(earlier))}" if earlier else \
            "no earlier checkpoint exists"
        reason = e.strerror or str(e)
        hint = " (the disk is full)" if e.errno == errno.ENOSPC else \
            " (permission denied)" if e.errno in (errno.EACCES, errno.EPERM) else ""
        return (f"saving {name} failed{hint}: {reason} while writing {target} (into {run_dir}); the partial "
                f"folder was removed and {kept}. Free space / fix permissions, then rerun with --resume")


def save_final(trainer, tokenizer, out: Path, staging_id: Optional[int] = None) -> Path:
    """``trainer.save_model`` + the tokenizer into ``out/final``, atomically (staged, then renamed). Under a
    launcher every rank calls it (the Trainer decides who writes; rank 0 renames), ``staging_id`` naming
    the shared staging folder; a failure raises on every rank."""
    final = out / "final"
    staging = out / f".final.tmp-{staging_id or os.getpid()}"
    writer = trainer.args.should_save

    def write() -> None:
        if writer:
            shutil.rmtree(staging, ignore_errors=True)
        trainer.save_model(str(staging))
        if writer:
            tokenizer.save_pretrained(str(staging))
            fsync_tree(staging)
            commit_folder(staging, final)

    try:
        agreed(write, catch=(OSError,))
    except OSError as e:
        where = e.filename or staging
        raise CheckpointWriteError(f"saving the final model failed: {e.strerror or e} while writing {where}; "
                                   f"the checkpoints in {out} are intact") from e
    finally:
        if writer:
            shutil.rmtree(staging, ignore_errors=True)
    return final


__all__ = ["AtomicCheckpointMixin", "save_final"]
