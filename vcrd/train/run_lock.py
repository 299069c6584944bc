"""One ``vcrd train`` run per output folder (also one ``vcrd cache-teacher`` run per cache folder).

:class:`RunLock`: an exclusive ``flock`` on ``output_dir/.vcrd-train.lock`` holding the owner's pid. A second
run fails at once naming that pid; a lock file left by a dead run (the kernel has already released its
``flock``) is taken over with a message. Under ``torchrun`` rank 0 holds it.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import time
from pathlib import Path
from typing import Any, Callable, Dict, Optional

from .files import open_private_file
from .run_errors import RunError, RunLockedError

LOCK_NAME = ".vcrd-train.lock"


def _alive(pid: int) -> bool:
    """Whether a process ``pid`` exists on this machine."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunLock:
    """``with RunLock(folder, say):`` one ``vcrd train`` run per output folder (see the module doc)."""

    def __init__(self, folder: os.PathLike, say: Callable[[str], None] = print) -> None:
        self.folder, self.say = Path(folder), say
        self.path = self.folder / LOCK_NAME
        self.fd: Optional[int] = None

    @staticmethod
    def _read(fd: int) -> Dict[str, Any]:
        os.lseek(fd, 0, os.SEEK_SET)
        raw = os.read(fd, 4096)
        try:
            info = json.loads(raw.decode("utf-8"))
            return info if isinstance(info, dict) else {}
        except (ValueError, UnicodeDecodeError):
            return {}

    def acquire(self) -> RunLock:
        import fcntl

        while True:
            try:  # never through a symlink or into a hard-linked file (UnsafeFileError, a ValueError)
                fd = open_private_file(self.path, os.O_RDWR | os.O_CREAT, 0o644, "output_dir: the lock file")
            except OSError as e:
                raise RunError(f"output_dir: cannot create the lock file {self.path}: {e.strerror or e}") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    os.close(fd)
                    raise
                info = self._read(fd)
                os.close(fd)
                raise RunLockedError(
                    f"output_dir {str(self.folder)!r} is in use by another vcrd train run (pid {info.get('pid', '?')}"
                    f" on {info.get('host', '?')}, since {info.get('started', '?')}; lock file {self.path}). "
                    f"Wait for it to finish, stop it, or use another output_dir") from None
            try:  # the file we locked must still be the one at the path (a releasing run unlinks it)
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        old = self._read(fd)
        pid = old.get("pid")
        if isinstance(pid, int) and pid != os.getpid():
            state = "no longer running" if not _alive(pid) or old.get("host") != socket.gethostname() \
                else "running but not holding the lock"
            self.say(f"taking over the stale lock of pid {pid} ({state}) in {self.folder}")
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                 "started": time.strftime("%Y-%m-%d %H:%M:%S")}).encode())
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is None:
            return
        with contextlib.suppress(OSError):
            os.unlink(self.path)
        os.close(self.fd)  # closing releases the flock
        self.fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


__all__ = ["LOCK_NAME", "RunLock"]
