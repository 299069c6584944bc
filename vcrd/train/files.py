"""Writing files so that a crash never leaves a half-written one: the one atomic-write mechanism of
``vcrd train``, ``vcrd score`` and ``vcrd cache-teacher``."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator, Union


def new_file_mode(path: Union[str, Path]) -> int:
    """The mode ``path`` keeps if it exists, else the one ``open(path, "w")`` would give (0666 & ~umask)."""
    try:
        return os.stat(path).st_mode & 0o7777
    except OSError:
        mask = os.umask(0)
        os.umask(mask)
        return 0o666 & ~mask


def fsync_dir(folder: Path) -> None:
    """fsync a folder, so a rename inside it survives a power cut (best effort)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_file(path: Union[str, Path]) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` to write; when the block ends normally the file is
    fsync'ed, given the mode of a normal new file (or of the file it replaces), renamed over ``path``
    and the folder fsync'ed. On any exception (``KeyboardInterrupt`` and ``SystemExit`` included:
    run under :func:`vcrd.train.checkpoints.signals_exit` for SIGTERM/SIGHUP) the temporary file is
    removed and ``path`` is untouched."""
    path = Path(path)
    tmp = path.parent / f".{path.name}.{os.getpid()}.tmp"
    mode = new_file_mode(path)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)
