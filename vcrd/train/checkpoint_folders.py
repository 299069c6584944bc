"""The folders of a ``vcrd train`` run: ``checkpoint-N`` names and their listing, and the staging that makes a
folder appear whole or not at all (written as ``.NAME.tmp-PID/``, fsync'ed, then renamed into place;
leftovers of a killed run removed under the run's lock)."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Callable, List, Tuple

from .files import fsync_dir

MANIFEST = "vcrd_checkpoint.json"
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
STAGING_RE = re.compile(r"^\.(checkpoint-\d+|final)\.(tmp|old)-\d+$")


def checkpoints(folder: os.PathLike) -> List[Tuple[int, Path]]:
    """``(step, path)`` of every ``checkpoint-N`` folder, newest first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := CHECKPOINT_RE.match(p.name)) and p.is_dir()]
    return sorted(found, reverse=True)


def fsync_tree(folder: Path) -> None:
    """fsync every file and folder below ``folder`` (a staged folder, before its rename)."""
    for root, _, files in os.walk(folder):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(root))


def commit_folder(staging: Path, final: Path) -> None:
    """Rename a complete ``staging`` folder to ``final`` (replacing an existing one: it is moved
    aside first, then removed), fsync'ing the parent so the rename survives a power cut."""
    old = final.parent / f".{final.name}.old-{os.getpid()}"
    if final.exists():
        os.rename(final, old)
    os.rename(staging, final)
    fsync_dir(final.parent)
    if old.exists():
        shutil.rmtree(old, ignore_errors=True)


def remove_staging(folder: Path, say: Callable[[str], None]) -> None:
    """Remove the half-written ``.checkpoint-N.tmp-PID`` / ``.final.tmp-PID`` folders a killed run
    left (call only while holding the folder's :class:`RunLock`)."""
    if not folder.is_dir():
        return
    for child in sorted(folder.iterdir()):
        m = STAGING_RE.match(child.name)
        if m and m.group(2) == "old" and child.is_dir() and not (folder / m.group(1)).exists():
            say(f"restoring {m.group(1)} from {child.name} (a run was killed while replacing it)")
            os.rename(child, folder / m.group(1))
        elif m and child.is_dir():
            say(f"removing {child.name}: a half-written folder left by an interrupted run")
            shutil.rmtree(child, ignore_errors=True)


__all__ = ["CHECKPOINT_RE", "MANIFEST", "STAGING_RE", "checkpoints", "commit_folder", "fsync_tree", "remove_staging"]
