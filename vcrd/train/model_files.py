"""A local model folder's files checked before any load: ``*.safetensors`` structurally complete (a truncated or
damaged file named, not a traceback from the loader), the shards an index names present, and ``torch.load``
files that the Trainer's resume would refuse."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path


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


__all__ = ["check_model_folder", "check_safetensors", "check_torch_file"]
