"""``--resume``: the newest checkpoint that is complete (:func:`verify_checkpoint`: manifest present, every file
at its recorded size and hash, the weights' safetensors structure intact, optimizer/scheduler/trainer state
present and loadable); the others are reported and skipped."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, Dict, List, Tuple

from .checkpoint_folders import CHECKPOINT_RE, MANIFEST, checkpoints
from .files import file_sha256
from .model_files import check_safetensors, check_torch_file
from .run_errors import ResumeError

# files the Trainer needs to resume exactly (weights are checked separately)
RESUME_FILES = ("optimizer.pt", "scheduler.pt", "trainer_state.json")


def _weight_files(folder: Path) -> List[Path]:
    """The checkpoint's ``*.safetensors`` weight files, sorted."""
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


__all__ = ["RESUME_FILES", "find_resume_checkpoint", "resume_message", "verify_checkpoint"]
