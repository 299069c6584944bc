"""Writing files so that a crash never leaves a half-written one, and a hostile folder never redirects a
write: the one atomic-write mechanism of ``vcrd train``, ``vcrd score`` and ``vcrd cache-teacher``.

- :func:`atomic_file`: the temporary file is created by :func:`tempfile.mkstemp` in the target's folder
  (an unpredictable name, ``O_CREAT | O_EXCL``: a pre-planted symlink or file is never opened), then
  renamed over the target (a symlink at the target is replaced, never followed).
- :func:`new_file_mode`: reads the umask without changing it (no ``umask(0)`` window for other threads).
- :func:`open_private_file`: ``O_NOFOLLOW``, regular file with a single link, else :class:`UnsafeFileError`.
- :func:`check_output_file`: an ``--out`` file that is an input, or exists and is not a regular file,
  is refused before any work.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import stat
import tempfile
from pathlib import Path
from typing import Iterable, Iterator, List, Union

PathLike = Union[str, Path]
TEMP_SUFFIX = ".tmp"


class UnsafeFileError(ValueError):
    """A path that a write would have to follow (a symlink, a hard link, a device): refused, untouched."""


def file_sha256(path: PathLike) -> str:
    """sha256 of a file's bytes, read 1 MiB at a time."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def current_umask() -> int:
    """The process umask, read without changing it: Linux's ``/proc/self/status`` (``Umask:``), else the
    mode a probe file created with 0666 gets (``os.umask`` would have to set it briefly, racing threads)."""
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    folder = tempfile.gettempdir()
    for _ in range(100):
        probe = os.path.join(folder, f".vcrd-umask-{os.getpid()}-{os.urandom(6).hex()}")
        try:
            fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o666)
        except FileExistsError:
            continue
        try:
            return 0o777 & ~os.fstat(fd).st_mode
        finally:
            os.close(fd)
            os.unlink(probe)
    return 0o022


def new_file_mode(path: PathLike) -> int:
    """The mode ``path`` keeps if it is an existing regular file, else the one ``open(path, "w")`` would
    give a new file (``0666 & ~umask``). A symlink is not followed (the rename replaces the link)."""
    try:
        st = os.stat(path, follow_symlinks=False)
        if stat.S_ISREG(st.st_mode):
            return st.st_mode & 0o7777
    except OSError:
        pass
    return 0o666 & ~current_umask()


def fsync_dir(folder: Path) -> None:
    """fsync a folder, so a rename inside it survives a power cut (best effort)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def temp_glob(name_glob: str) -> str:
    """The glob matching :func:`atomic_file`'s temporary files for targets matching ``name_glob`` (the
    names of older vcrd versions, ``.{name}.{pid}.tmp``, match it too)."""
    return f".{name_glob}.*{TEMP_SUFFIX}"


def remove_stale_temps(folder: PathLike, name_globs: Iterable[str]) -> List[Path]:
    """Remove the temporary files :func:`atomic_file` left in ``folder`` (a killed run) for targets matching
    ``name_globs``; returns them. Call only while holding the folder's lock. A symlink is removed, not
    followed; a folder of that name is left alone."""
    removed = []
    for pattern in name_globs:
        for stale in Path(folder).glob(temp_glob(pattern)):
            with contextlib.suppress(OSError):
                if not stat.S_ISDIR(os.lstat(stale).st_mode):
                    os.unlink(stale)
                    removed.append(stale)
    return removed


@contextlib.contextmanager
def atomic_file(path: PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` to write; when the block ends normally the file is
    fsync'ed, given the mode of a normal new file (or of the file it replaces), renamed over ``path``
    and the folder fsync'ed. On any exception (``KeyboardInterrupt`` and ``SystemExit`` included:
    run under :func:`vcrd.train.signals.signals_exit` for SIGTERM/SIGHUP) the temporary file is
    removed and ``path`` is untouched.

    The temporary file (``.{name}.XXXXXXXX.tmp``) is created by :func:`tempfile.mkstemp`: an
    unpredictable name, created exclusively, so nothing planted in the folder is ever written through;
    its mode is set on the open descriptor. A symlink at ``path`` is replaced by the file, never followed.
    """
    path = Path(path)
    mode = new_file_mode(path)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
    tmp = Path(name)
    try:
        yield tmp
        os.fsync(fd)
        os.fchmod(fd, mode)
        os.close(fd)
        fd = -1
        os.replace(tmp, path)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def open_private_file(path: PathLike, flags: int, mode: int = 0o644, what: str = "file") -> int:
    """``os.open(path, flags | O_NOFOLLOW | O_CLOEXEC, mode)`` for a file vcrd owns in an output folder (a
    lock): :class:`UnsafeFileError` naming ``what`` and ``path`` if it is a symlink, not a regular file, or
    has another hard link (writing would change a file elsewhere). Returns the descriptor."""
    try:
        fd = os.open(path, flags | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
                     | getattr(os, "O_NONBLOCK", 0), mode)
    except OSError:
        if os.path.islink(path):
            raise UnsafeFileError(f"{what}: {str(path)!r} is a symbolic link (to {os.readlink(path)!r}); vcrd never "
                                  f"writes through one: remove it and rerun") from None
        raise
    st = os.fstat(fd)
    problem = "is not a regular file" if not stat.S_ISREG(st.st_mode) else \
        f"has {st.st_nlink} hard links (it is also a file elsewhere)" if st.st_nlink > 1 else None
    if problem:
        os.close(fd)
        raise UnsafeFileError(f"{what}: {str(path)!r} {problem}; vcrd never writes into it: remove it and rerun")
    os.set_blocking(fd, True)
    return fd


def check_output_file(out: PathLike, inputs: Iterable[PathLike] = (), what: str = "--out") -> Path:
    """Before any work: ``ValueError`` unless ``out`` names a file that may be (re)placed: not a folder,
    not an existing non-regular file (a device, a FIFO, a socket: never replaced by a file), and not one of
    ``inputs`` (``--out`` equal to ``--data`` would replace the input; symlinks and hard links are seen
    through). Returns ``Path(out)``."""
    text = str(out)
    out = Path(out)
    if text.endswith((os.sep, "/")) or out.is_dir():
        raise ValueError(f"{what}: {text!r} is a directory, expected a file name (e.g. "
                         f"{text.rstrip('/')}/selected.jsonl)")
    try:
        st = os.stat(out)
    except FileNotFoundError:
        st = None
    except OSError as e:
        raise ValueError(f"{what}: cannot use {text!r}: {e.strerror or e}") from None
    if st is not None and not stat.S_ISREG(st.st_mode):
        raise ValueError(f"{what}: {text!r} exists and is not a regular file (a device, FIFO or socket); expected "
                         f"a new or regular file name")
    for given in inputs:
        if given is None:
            continue
        try:
            same = st is not None and os.path.samefile(out, given)
        except OSError:
            same = False
        if same or os.path.realpath(out) == os.path.realpath(given):
            raise ValueError(f"{what}: {text!r} is the input {str(given)!r}; writing it would replace the input. "
                             f"Choose another output file")
    return out



def check_writable(folder: os.PathLike, what: str = "output_dir") -> None:
    """``ValueError`` unless ``folder`` (or, if it does not exist yet, its nearest existing parent)
    is a directory this process can create files in; probed with a real file (``os.access`` lies
    for root and on some network file systems), which is removed at once."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{what}: {str(folder)!r} exists and is not a directory")
    probe_dir = folder
    while not probe_dir.exists():
        probe_dir = probe_dir.parent
    if not probe_dir.is_dir():
        raise ValueError(f"{what}: cannot create {str(folder)!r}: {str(probe_dir)!r} is not a directory")
    try:  # an unpredictable name, created exclusively: a planted symlink is never followed
        fd, probe = tempfile.mkstemp(prefix=".vcrd-write-probe-", dir=probe_dir)
    except OSError as e:
        raise ValueError(f"{what}: cannot write in {str(probe_dir)!r}: {e.strerror or e}") from None
    os.close(fd)
    with contextlib.suppress(OSError):
        os.unlink(probe)


__all__ = ["UnsafeFileError", "atomic_file", "check_output_file", "check_writable", "current_umask", "file_sha256",
           "fsync_dir", "new_file_mode", "open_private_file", "remove_stale_temps", "temp_glob"]
