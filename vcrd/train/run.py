"""``vcrd train --config FILE``: distil a local student from a local teacher on a jsonl file.

The config is a JSON object (every key below; defaults in ``TRAIN_DEFAULTS``)::

    {"teacher": "models/teacher", "student": "models/student", "data": "data/train.jsonl",
     "output_dir": "runs/vcrd", "preset": "vcrd", "loss": {"temperature": 1.0},
     "max_steps": 200, "batch_size": 8, "grad_accum": 1, "learning_rate": 5e-4,
     "save_steps": 50, "logging_steps": 10, "max_length": 512, "seed": 0,
     "stop_on_nonfinite_loss": true, "chat_template": false}

``"chat_template": true`` renders each prompt as the user turn of the student tokenizer's chat template
(the assistant header included, ``-100`` on all of it; :class:`vcrd.train.data.DistillCollator`), the way
a chat model such as SmolLM2-Instruct was trained; a tokenizer without a template is refused.

Offline: ``"teacher_cache": "cache/teacher"`` (a folder written by ``vcrd cache-teacher`` over the same
data) instead of ``"teacher"``; the cache is verified against the data and the student's tokenizer
before anything is written, and no teacher model loads.

Every check that needs no model is made before a model loads or the output folder is touched
(exit 2): types and ranges (a finite learning rate in (0, 1]), readable UTF-8 files (``FILE:LINE``),
both model folders (config.json, complete safetensors files), every data line, the token ids
against both vocabularies, ``max_length`` against both position limits, the output folder's
writability, and with ``--resume`` the checkpoint to continue from and its stored config. Then the
run takes ``output_dir``'s lock (one run per folder), trains with atomic checkpoints
(:mod:`vcrd.train.checkpoints`) and stops at the first non-finite loss
(:mod:`vcrd.train.callbacks`).

Under ``torchrun --nproc_per_node N -m vcrd.app.cli train --config FILE`` the run is data parallel
(DDP through the Hugging Face Trainer; ``batch_size`` is per process): see :func:`train` and
docs/distributed.md.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Tuple

from .. import __version__
from ..core.config import PRESETS, VCRDConfig

TRAIN_DEFAULTS: Dict[str, Any] = {
    "preset": "vcrd", "loss": {}, "max_steps": 200, "batch_size": 8, "grad_accum": 1, "learning_rate": 5e-4,
    "save_steps": 50, "logging_steps": 10, "max_length": 512, "seed": 0, "stop_on_nonfinite_loss": True,
    "chat_template": False,
}
REQUIRED = ("student", "data", "output_dir")
TEACHERS = ("teacher", "teacher_cache")  # exactly one: a model folder, or a `vcrd cache-teacher` folder
INTS = {"max_steps": 1, "batch_size": 1, "grad_accum": 1, "save_steps": 1, "logging_steps": 1, "max_length": 2,
        "seed": 0}
MAX_LEARNING_RATE = 1.0
# stored with each checkpoint; a difference on --resume is an error unless --allow-mismatch
RESUME_KEYS = ("preset", "loss", "data_sha256", "teacher", "student", "batch_size", "grad_accum", "learning_rate",
               "max_length", "seed", "world_size", "chat_template")
SHOW = 5  # data lines named per warning


def _stderr(message: str) -> None:
    print(f"vcrd train: {message}", file=sys.stderr, flush=True)


def read_text(path: str, what: str) -> str:
    """A UTF-8 text file; ``ValueError`` naming ``FILE:LINE`` for bad bytes, and for a directory or an
    unreadable file."""
    from .data import open_for_reading

    with open_for_reading(path, what) as f:
        raw = f.read()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise ValueError(f"{path}:{line}: not UTF-8 text (byte 0x{raw[e.start]:02x}); re-encode the file as "
                         f"UTF-8") from None


def load_config(path: str) -> Dict[str, Any]:
    """The checked training config (defaults filled in); ``ValueError`` naming the key otherwise."""
    text = read_text(path, "--config")
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(raw).__name__}")
    unknown = set(raw) - set(TRAIN_DEFAULTS) - set(REQUIRED) - set(TEACHERS)
    if unknown:
        known = sorted(set(TRAIN_DEFAULTS) | set(REQUIRED) | set(TEACHERS))
        raise ValueError(f"{path}: unknown keys {sorted(unknown)}; expected some of {known}")
    given = [key for key in TEACHERS if key in raw]
    if len(given) != 1:
        raise ValueError(f"{path}: expected exactly one of 'teacher' (a model folder) and 'teacher_cache' (a folder "
                         f"written by `vcrd cache-teacher`), got {given or 'neither'}")
    for key in REQUIRED + tuple(given):
        if not isinstance(raw.get(key), str) or not raw[key]:
            raise ValueError(f"{path}: {key!r} must be a non-empty string (a path), got {raw.get(key)!r}")
    cfg = {**TRAIN_DEFAULTS, **raw}
    for key, low in INTS.items():
        value = cfg[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{path}: {key!r} must be an int >= {low}, got {value!r}")
    lr = cfg["learning_rate"]
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) or \
            not 0 < lr <= MAX_LEARNING_RATE:
        raise ValueError(f"{path}: 'learning_rate' must be a finite number in (0, {MAX_LEARNING_RATE:g}], "
                         f"got {lr!r}")
    for flag in ("stop_on_nonfinite_loss", "chat_template"):
        if not isinstance(cfg[flag], bool):
            raise ValueError(f"{path}: {flag!r} must be true or false, got {cfg[flag]!r}")
    if cfg["preset"] not in PRESETS:
        raise ValueError(f"{path}: 'preset' must be one of {PRESETS}, got {cfg['preset']!r}")
    if not isinstance(cfg["loss"], dict):
        raise ValueError(f"{path}: 'loss' must be an object of VCRDConfig fields, got {cfg['loss']!r}")
    try:
        cfg["vcrd_config"] = VCRDConfig.preset(cfg["preset"], **cfg["loss"])
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: 'loss': {e}") from None
    if "teacher_cache" in cfg and not (Path(cfg["teacher_cache"]) / "manifest.json").is_file():
        raise FileNotFoundError(f"{path}: 'teacher_cache' must be a folder written by `vcrd cache-teacher` (with "
                                f"manifest.json), got {cfg['teacher_cache']!r}")
    for key in model_roles(cfg):
        if not (Path(cfg[key]) / "config.json").is_file():
            raise FileNotFoundError(f"{path}: {key!r} must be a local Hugging Face model folder with config.json, "
                                    f"got {cfg[key]!r}")
    return cfg


def model_roles(cfg: Dict[str, Any]) -> Tuple[str, ...]:
    """The model folders a run loads: the student, and the teacher unless it comes from a cache."""
    return ("teacher", "student") if "teacher" in cfg else ("student",)


def _model_limits(folder: str, role: str) -> Tuple[int, Optional[int]]:
    """``(vocab_size, max_position_embeddings or None)`` from a model folder's config (no weights)."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(folder, local_files_only=True)
    except Exception as e:  # a bad config.json: name the folder, no traceback
        raise ValueError(f"{role}: cannot read {folder}/config.json: {e}") from None
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    vocab = getattr(text, "vocab_size", None)
    if not isinstance(vocab, int) or vocab < 1:
        raise ValueError(f"{role}: {folder}/config.json has no vocab_size")
    positions = getattr(text, "max_position_embeddings", None)
    return vocab, positions if isinstance(positions, int) and positions > 0 else None


def _listed(items) -> str:
    items = list(items)
    more = f" and {len(items) - SHOW} more" if len(items) > SHOW else ""
    return "; ".join(items[:SHOW]) + more


def check_run(cfg: Dict[str, Any], examples, say: Callable[[str], None]):
    """Everything checkable without loading a model: weight files, vocabulary coverage, position
    limits, rows that carry no loss (warned, ``FILE:LINE``), and the output folder's writability.
    Returns ``(tokenizer, collator)``."""
    from transformers import AutoTokenizer

    from .data import DistillCollator, check_examples
    from .files import check_writable
    from .model_files import check_model_folder

    limits = {}
    for role in model_roles(cfg):
        check_model_folder(cfg[role], role)
        limits[role] = _model_limits(cfg[role], role)
    positions = {role: p for role, (_, p) in limits.items() if p is not None}
    for role, limit in positions.items():
        if cfg["max_length"] > limit:
            raise ValueError(f"config: 'max_length' is {cfg['max_length']}, but the {role} has "
                             f"max_position_embeddings={limit}; set max_length <= {min(positions.values())} "
                             f"(longer rows are cut at the end)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(cfg["student"], local_files_only=True)
    except Exception as e:
        raise ValueError(f"student: cannot load the tokenizer from {cfg['student']}: {e}") from None
    try:
        collator = DistillCollator(tokenizer, cfg["max_length"], with_sources=True, chat_template=cfg["chat_template"])
    except ValueError as e:
        raise ValueError(f"config: 'chat_template' is true, but {e}") from None
    report = check_examples(examples, collator)
    special = [i for i in (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) if i is not None]
    max_id, where = report.max_id, report.max_id_where
    if special and max(special) > max_id:
        max_id, where = max(special), "the tokenizer's special tokens"
    for role, (vocab, _) in limits.items():
        if max_id >= vocab:
            raise ValueError(f"{role}: its vocabulary has {vocab} tokens, but the student's tokenizer gives token id "
                             f"{max_id} ({where}); the {role} cannot embed it. Use models that share the student's "
                             f"tokenizer (a larger, padded vocabulary is fine)")
    if len(report.no_loss) == report.n_rows:
        raise ValueError(f"data: none of the {report.n_rows} rows carries a loss: "
                         f"{_listed(f'{w} ({why})' for w, why in report.no_loss)}")
    if report.no_loss:
        say(f"warning: {len(report.no_loss)} of {report.n_rows} data rows carry no loss (they cost compute and "
            f"teach nothing): {_listed(f'{w} ({why})' for w, why in report.no_loss)}")
    if report.truncated:
        say(f"note: {len(report.truncated)} data rows are longer than max_length={cfg['max_length']} and are cut "
            f"at the end: {_listed(report.truncated)}")
    if "teacher_cache" in cfg:  # the cache must hold exactly these examples, tokenised this way
        from .teacher_cache import TeacherCache

        TeacherCache(cfg["teacher_cache"], verify=False).verify(examples, collator, vocab_size=limits["student"][0])
    check_writable(cfg["output_dir"])
    return tokenizer, collator


def run_manifest(cfg: Dict[str, Any], data_sha256: str, world_size: int = 1) -> Dict[str, Any]:
    """What a checkpoint records about its run (compared on ``--resume``: ``RESUME_KEYS``), with the number
    of processes that trained it (``world_size``: the global batch is ``batch_size · grad_accum · world_size``)."""
    return {"vcrd_version": __version__, "preset": cfg["preset"], "loss": dataclasses.asdict(cfg["vcrd_config"]),
            "data": cfg["data"], "data_sha256": data_sha256,
            "teacher": str(Path(cfg["teacher"]).resolve()) if "teacher" in cfg else
            f"cache:{Path(cfg['teacher_cache']).resolve()}",
            "student": str(Path(cfg["student"]).resolve()),
            **{k: cfg[k] for k in ("batch_size", "grad_accum", "learning_rate", "max_length", "seed", "max_steps",
                                   "chat_template")},
            "world_size": world_size}


def compare_manifests(stored: Dict[str, Any], current: Dict[str, Any]) -> list:
    """``"key: checkpoint X, now Y"`` for every ``RESUME_KEYS`` entry that differs."""
    stored = json.loads(json.dumps(stored))  # same JSON types on both sides (tuples → lists)
    current = json.loads(json.dumps(current))
    return [f"{key}: checkpoint {stored.get(key)!r}, now {current.get(key)!r}"
            for key in RESUME_KEYS if key in stored and stored.get(key) != current.get(key)]


def _trainer_class():
    from .checkpoints import AtomicCheckpointMixin
    from .trainer import VCRDTrainer

    class RunTrainer(AtomicCheckpointMixin, VCRDTrainer):
        """VCRDTrainer with atomic, verified checkpoints (``vcrd train``)."""

    return RunTrainer


def _prepare(config_path: str, resume: bool, allow_mismatch: bool, world: int, say: Callable[[str], None]):
    """Every check that needs no model, on this rank: ``(cfg, examples, tokenizer, collator, manifest,
    checkpoint or None)``."""
    from .checkpoint_folders import checkpoints
    from .data import read_jsonl
    from .files import file_sha256
    from .resume import find_resume_checkpoint, resume_message
    from .run_errors import ResumeError

    cfg = load_config(config_path)
    examples = read_jsonl(cfg["data"])  # every line checked before anything is written
    if not examples:
        raise ValueError(f"data: {cfg['data']} holds no examples")
    tokenizer, collator = check_run(cfg, examples, say)
    manifest = run_manifest(cfg, file_sha256(cfg["data"]), world)
    out = Path(cfg["output_dir"])
    checkpoint = None
    if resume:
        checkpoint, stored = find_resume_checkpoint(out, say, announce=False)  # said once accepted
        stored_run = stored.get("run", {})
        if stored_run:  # written before world sizes were stored: by one process
            stored_run = {"world_size": 1, **stored_run}
        differences = compare_manifests(stored_run, manifest)
        if differences and not allow_mismatch:
            raise ResumeError(f"--resume: {checkpoint.name} was written by a different run configuration "
                              f"({'; '.join(differences)}); restore the config (or launch as many processes as "
                              f"before), or pass --allow-mismatch to continue anyway")
        if differences:
            say(f"warning: --allow-mismatch: resuming {checkpoint.name} despite {'; '.join(differences)}")
        say(resume_message(checkpoint, stored))
    elif checkpoints(out):
        say(f"warning: {out} already holds checkpoints from an earlier run; this run starts from step 0 and "
            f"replaces them as it reaches their steps (use --resume to continue instead)")
    return cfg, examples, tokenizer, collator, manifest, checkpoint


def train(config_path: str, resume: bool = False, allow_mismatch: bool = False,
          stop_on_nonfinite_loss: Optional[bool] = None, say: Callable[[str], None] = _stderr) -> Path:
    """Run the training a config describes; return the output folder. See the module docstring.

    Under a launcher (``torchrun --nproc_per_node N``: DDP through the Hugging Face Trainer) every rank
    makes the same checks, and a failure on any rank raises on every rank (no rank waits in a
    collective); rank 0 alone takes the output folder's lock and writes checkpoints, manifests and the
    final model (the others wait for it); the world size is stored in each checkpoint and compared on
    ``--resume`` like the rest of the run configuration; every rank reports its final parameters'
    SHA-256 (:func:`vcrd.distributed.ranks.parameter_checksum`), and a difference between ranks is
    an error.

    Raises ``ValueError`` / ``FileNotFoundError`` (bad input, nothing touched),
    :class:`vcrd.train.run_errors.RunError` (a busy folder, nothing to resume from, a checkpoint that
    could not be written, ranks that disagree) and :class:`vcrd.train.callbacks.NonFiniteLossError`.
    """
    import contextlib

    from ..distributed.ranks import agreed, from_rank0, gather, init_from_launcher, launch_info, parameter_checksum
    from .checkpoint_folders import remove_staging
    from .checkpoints import save_final
    from .run_errors import RunError
    from .run_lock import RunLock

    rank, world, _ = launch_info()
    quiet = say if rank == 0 else (lambda message: None)  # checks' warnings once, from rank 0
    init_from_launcher()
    cfg, examples, tokenizer, collator, manifest, checkpoint = agreed(
        lambda: _prepare(config_path, resume, allow_mismatch, world, quiet))
    stop = cfg["stop_on_nonfinite_loss"] if stop_on_nonfinite_loss is None else stop_on_nonfinite_loss
    out = Path(cfg["output_dir"])

    with contextlib.ExitStack() as held:
        def take_folder() -> None:  # one run per folder: rank 0 holds the lock for all ranks
            if rank == 0:
                out.mkdir(parents=True, exist_ok=True)
                held.enter_context(RunLock(out, say))
                remove_staging(out, say)

        agreed(take_folder)
        import torch
        from transformers import AutoModelForCausalLM, TrainingArguments

        def load_models():
            models = {}
            for role in model_roles(cfg):
                try:
                    models[role] = AutoModelForCausalLM.from_pretrained(cfg[role], local_files_only=True)
                except Exception as e:  # damaged in a way the pre-checks cannot see: name the folder
                    raise ValueError(f"{role}: cannot load the model in {cfg[role]}: {e}") from None
            return models

        models = agreed(load_models)
        args = TrainingArguments(
            output_dir=str(out), max_steps=cfg["max_steps"], per_device_train_batch_size=cfg["batch_size"],
            gradient_accumulation_steps=cfg["grad_accum"], learning_rate=cfg["learning_rate"],
            save_steps=cfg["save_steps"], logging_steps=cfg["logging_steps"], seed=cfg["seed"],
            data_seed=cfg["seed"], report_to=[], use_cpu=not torch.cuda.is_available(), remove_unused_columns=False,
            save_strategy="steps", logging_nan_inf_filter=False,
        )
        trainer = _trainer_class()(model=models["student"], teacher_model=models.get("teacher"),
                                   teacher_cache=cfg.get("teacher_cache"),
                                   vcrd_config=cfg["vcrd_config"], args=args, train_dataset=examples,
                                   data_collator=collator, stop_on_nonfinite_loss=stop)
        trainer.run_manifest = manifest
        trainer.staging_id = from_rank0(os.getpid())  # the staging folders all ranks write into
        trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint is not None else None)
        save_final(trainer, tokenizer, out, trainer.staging_id)
        digest = parameter_checksum(models["student"])
        say(f"final parameters sha256 {digest}" if world == 1 else
            f"rank {rank}/{world}: final parameters sha256 {digest}")
        digests = gather(digest)
        if len(set(digests)) > 1:
            raise RunError(f"the ranks ended with different parameters (sha256 per rank: {digests}); the model in "
                           f"{out / 'final'} is rank 0's")
    return out
