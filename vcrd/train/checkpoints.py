"""Crash-safe run folders for ``vcrd train``: one run per folder, atomic verified checkpoints.

- :class:`RunLock`: an exclusive ``flock`` on ``output_dir/.vcrd-train.lock`` holding the owner's
  pid. A second run fails at once naming that pid; a lock file left by a dead run (the kernel has
  already released its ``flock``) is taken over with a message.
- :class:`AtomicCheckpointMixin` (mixed into the ``transformers.Trainer``): each ``checkpoint-N`` is
  written into ``.checkpoint-N.tmp-PID/``, gets a manifest (``vcrd_checkpoint.json``: every file's
  size, the run's config, data hash and preset) written last, is fsync'ed and then renamed into
  place, so a ``checkpoint-N`` folder is either complete or absent. A failed write (disk full,
  permission) raises :class:`CheckpointWriteError` saying what failed and where, removes the
  partial folder and lists the earlier checkpoints, which are untouched.
- :func:`find_resume_checkpoint`: the newest checkpoint that passes :func:`verify_checkpoint`
  (manifest present, every file at its recorded size, the weights' safetensors structure intact,
  optimizer/scheduler/trainer state present); the others are reported and skipped.
- :func:`check_safetensors`: a truncated or damaged ``*.safetensors`` file, named, before any load.
- :func:`signals_exit`: SIGTERM/SIGHUP raise ``SystemExit`` so that ``finally`` blocks remove
  temporary files and locks.

Under ``torchrun`` (several ranks, one shared folder) rank 0 holds the lock and writes the shared
files; each stage of a save ends on every rank with :func:`vcrd.distributed.ranks.agreed`, a barrier
that fails all ranks when one fails (see :class:`AtomicCheckpointMixin`).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import signal
import socket
import struct
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

from ..distributed.ranks import agreed
from .files import file_sha256, fsync_dir, open_private_file

MANIFEST = "vcrd_checkpoint.json"
LOCK_NAME = ".vcrd-train.lock"
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
STAGING_RE = re.compile(r"^\.(checkpoint-\d+|final)\.(tmp|old)-\d+$")
# files the Trainer needs to resume exactly (weights are checked separately)
RESUME_FILES = ("optimizer.pt", "scheduler.pt", "trainer_state.json")


class RunError(RuntimeError):
    """A ``vcrd train`` failure with its exit code (2: refused before any work, 1: failed during it)."""

    exit_code = 1


class RunLockedError(RunError):
    exit_code = 2


class ResumeError(RunError):
    exit_code = 2


class CheckpointWriteError(RunError):
    exit_code = 1


# ----------------------------------------------------------------------------------------- signals
@contextlib.contextmanager
def signals_exit() -> Iterator[None]:
    """Within the block, SIGTERM and SIGHUP raise ``SystemExit(128 + signal)`` (SIGINT already raises
    ``KeyboardInterrupt``), so cleanup code runs; the previous handlers are restored afterwards. A
    no-op outside the main thread."""
    previous = {}

    def handler(signum, frame):
        raise SystemExit(128 + signum)

    try:
        for sig in (signal.SIGTERM, signal.SIGHUP):
            previous[sig] = signal.signal(sig, handler)
    except ValueError:  # not the main thread
        pass
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


# ------------------------------------------------------------------------------------------- files
def check_safetensors(path: os.PathLike) -> None:
    """``ValueError`` naming ``path`` unless it is a structurally complete safetensors file (the
    header parses and the file is exactly as long as the header says): catches truncation."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ValueError(f"{path}: truncated safetensors file ({size} bytes, not even a header)")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8:
                raise ValueError(f"{path}: truncated safetensors file ({size} bytes; its header alone "
                                 f"should be {n} bytes)")
            try:
                header = json.loads(f.read(n))
            except (ValueError, UnicodeDecodeError):
                raise ValueError(f"{path}: damaged safetensors file (its header is not JSON)") from None
    except PermissionError:
        raise ValueError(f"{path}: cannot read: permission denied") from None
    ends = [v["data_offsets"][1] for k, v in header.items()
            if k != "__metadata__" and isinstance(v, dict) and "data_offsets" in v]
    want = 8 + n + max(ends, default=0)
    if size != want:
        raise ValueError(f"{path}: truncated or damaged safetensors file: {size} bytes, its header "
                         f"describes {want}")


def check_model_folder(folder: os.PathLike, role: str) -> None:
    """Every weight file of a local model folder before any model loads: ``*.safetensors`` complete,
    the shards an index names present."""
    folder = Path(folder)
    for index in folder.glob("*.safetensors.index.json"):
        try:
            shards = set(json.loads(index.read_text(encoding="utf-8")).get("weight_map", {}).values())
        except (ValueError, UnicodeDecodeError, OSError) as e:
            raise ValueError(f"{role}: {index}: unreadable weight index ({e})") from None
        missing = sorted(s for s in shards if not (folder / s).is_file())
        if missing:
            raise ValueError(f"{role}: {index} names weight files that are missing: {missing}")
    for file in sorted(folder.glob("*.safetensors")):
        try:
            check_safetensors(file)
        except ValueError as e:
            raise ValueError(f"{role}: {e}") from None


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


def _fsync_tree(folder: Path) -> None:
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


# --------------------------------------------------------------------------------------------- lock
def _alive(pid: int) -> bool:
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


# ---------------------------------------------------------------------------------- verification
def checkpoints(folder: os.PathLike) -> List[Tuple[int, Path]]:
    """``(step, path)`` of every ``checkpoint-N`` folder, newest first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := CHECKPOINT_RE.match(p.name)) and p.is_dir()]
    return sorted(found, reverse=True)


def _weight_files(folder: Path) -> List[Path]:
    return sorted(folder.glob("*.safetensors"))


def verify_checkpoint(folder: os.PathLike) -> Dict[str, Any]:
    """The checkpoint's manifest if the folder is complete; ``ValueError`` saying what is wrong
    otherwise (missing manifest or file, a file of the wrong size, damaged weights, unreadable state).
    A folder without a manifest (written by an older vcrd) is accepted when the files the Trainer
    needs are there and intact; its manifest is then ``{}``."""
    folder = Path(folder)
    manifest: Dict[str, Any] = {}
    path = folder / MANIFEST
    if path.is_file():
        try:
            manifest = json.loads(path.read_text(encoding="utf-8"))
            files = manifest["files"]
        except (ValueError, KeyError, TypeError, UnicodeDecodeError, OSError) as e:
            raise ValueError(f"unreadable {MANIFEST} ({e})") from None
        hashes = manifest.get("sha256", {})
        if not isinstance(hashes, dict):
            raise ValueError(f"unreadable {MANIFEST} (sha256 is not a mapping)")
        for name, size in files.items():
            file = folder / name
            if not file.is_file():
                raise ValueError(f"{name} is missing")
            if file.stat().st_size != size:
                raise ValueError(f"{name} is {file.stat().st_size} bytes, the manifest says {size}")
        for name, digest in hashes.items():  # a same-size change (a flipped bit) too
            file = folder / name
            if not file.is_file():
                raise ValueError(f"{name} is missing")
            if file_sha256(file) != digest:
                raise ValueError(f"{name} is damaged: its sha256 differs from the manifest's (same size, other "
                                 f"content)")
    for name in RESUME_FILES:
        file = folder / name
        if not file.is_file() or file.stat().st_size == 0:
            raise ValueError(f"{name} is {'empty' if file.is_file() else 'missing'}")
    weights = _weight_files(folder)
    if not weights:
        raise ValueError("no model weights (*.safetensors)")
    for file in weights:
        check_safetensors(file)
    try:
        json.loads((folder / "trainer_state.json").read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"trainer_state.json is damaged ({e})") from None
    for name in ("optimizer.pt", "scheduler.pt"):  # what the Trainer loads with weights_only=True
        check_torch_file(folder / name)
    return manifest


def check_torch_file(path: Path) -> None:
    """``ValueError`` naming ``path`` unless ``torch.load(path, weights_only=True)`` accepts it (what the
    Trainer's resume runs): a file holding pickled code or damaged beyond its hash is named here, not in a
    traceback. Memory-mapped, so a large optimizer state is not read whole."""
    import pickle

    import torch

    try:
        try:
            torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            torch.load(path, map_location="cpu", weights_only=True)  # a legacy (non-zip) torch file
    except (pickle.UnpicklingError, RuntimeError, ValueError, EOFError, OSError, TypeError, AttributeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{path.name} cannot be loaded safely (torch.load with weights_only=True refuses it: "
                         f"{first})") from None


def find_resume_checkpoint(folder: os.PathLike, say: Callable[[str], None],
                           announce: bool = True) -> Tuple[Path, Dict[str, Any]]:
    """The newest complete checkpoint in ``folder`` and its manifest; the incomplete ones newer than
    it are reported (``say``) and skipped. :class:`ResumeError` if there is none. ``announce=False``:
    the caller says "continuing from" itself, once it has compared the run (:func:`resume_message`)."""
    skipped = []
    for _step, path in checkpoints(folder):
        try:
            manifest = verify_checkpoint(path)
        except (ValueError, OSError) as e:
            skipped.append(path.name)
            say(f"--resume: skipping {path.name}: incomplete or damaged ({e})")
            continue
        if announce:
            say(resume_message(path, manifest))
        return path, manifest
    if skipped:
        raise ResumeError(f"--resume: no complete checkpoint in {str(folder)!r} (skipped: {', '.join(skipped)})")
    raise ResumeError(f"--resume: no checkpoint-* folder in {str(folder)!r}")


def resume_message(path: Path, manifest: Dict[str, Any]) -> str:
    """What ``--resume`` says once it has chosen (and accepted) ``path``."""
    note = "" if manifest else " (written without a vcrd manifest: its config cannot be compared)"
    step = CHECKPOINT_RE.match(path.name)
    return f"--resume: continuing from {path} (step {step.group(1) if step else '?'}){note}"


# ---------------------------------------------------------------------------------------- saving
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
            _fsync_tree(written)
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
            _fsync_tree(staging)
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
