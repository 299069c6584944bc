"""``vcrd train --config FILE``: distil a local student from a local teacher on a jsonl file.

The config is a JSON object (every key below; defaults in ``TRAIN_DEFAULTS``)::

    {"teacher": "models/teacher", "student": "models/student", "data": "data/train.jsonl",
     "output_dir": "runs/vcrd", "preset": "vcrd", "loss": {"temperature": 1.0},
     "max_steps": 200, "batch_size": 8, "grad_accum": 1, "learning_rate": 5e-4,
     "save_steps": 50, "logging_steps": 10, "max_length": 512, "seed": 0}

Everything is checked (types, ranges, folders, every data line) before a model loads or the
output folder is touched, so a bad config or data file leaves existing checkpoints as they were.
``--resume`` continues from the last checkpoint in ``output_dir``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict

from ..core.config import PRESETS, VCRDConfig

TRAIN_DEFAULTS: Dict[str, Any] = {
    "preset": "vcrd", "loss": {}, "max_steps": 200, "batch_size": 8, "grad_accum": 1, "learning_rate": 5e-4,
    "save_steps": 50, "logging_steps": 10, "max_length": 512, "seed": 0,
}
REQUIRED = ("teacher", "student", "data", "output_dir")
INTS = {"max_steps": 1, "batch_size": 1, "grad_accum": 1, "save_steps": 1, "logging_steps": 1, "max_length": 2,
        "seed": 0}


def load_config(path: str) -> Dict[str, Any]:
    """The checked training config (defaults filled in); ``ValueError`` naming the key otherwise."""
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"--config: no such file {path!r}")
    try:
        raw = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(raw).__name__}")
    unknown = set(raw) - set(TRAIN_DEFAULTS) - set(REQUIRED)
    if unknown:
        known = sorted(set(TRAIN_DEFAULTS) | set(REQUIRED))
        raise ValueError(f"{path}: unknown keys {sorted(unknown)}; expected some of {known}")
    for key in REQUIRED:
        if not isinstance(raw.get(key), str) or not raw[key]:
            raise ValueError(f"{path}: {key!r} must be a non-empty string (a path), got {raw.get(key)!r}")
    cfg = {**TRAIN_DEFAULTS, **raw}
    for key, low in INTS.items():
        value = cfg[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{path}: {key!r} must be an int >= {low}, got {value!r}")
    lr = cfg["learning_rate"]
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0:
        raise ValueError(f"{path}: 'learning_rate' must be a number > 0, got {lr!r}")
    if cfg["preset"] not in PRESETS:
        raise ValueError(f"{path}: 'preset' must be one of {PRESETS}, got {cfg['preset']!r}")
    if not isinstance(cfg["loss"], dict):
        raise ValueError(f"{path}: 'loss' must be an object of VCRDConfig fields, got {cfg['loss']!r}")
    try:
        cfg["vcrd_config"] = VCRDConfig.preset(cfg["preset"], **cfg["loss"])
    except TypeError as e:
        raise ValueError(f"{path}: 'loss': {e}") from None
    for key in ("teacher", "student"):
        if not (Path(cfg[key]) / "config.json").is_file():
            raise FileNotFoundError(f"{path}: {key!r} must be a local Hugging Face model folder with config.json, "
                                    f"got {cfg[key]!r}")
    return cfg


def train(config_path: str, resume: bool = False) -> Path:
    """Run the training a config describes; return the output folder. See the module docstring."""
    cfg = load_config(config_path)
    from .data import DistillCollator, read_jsonl

    examples = read_jsonl(cfg["data"])  # every line checked before anything is written
    if not examples:
        raise ValueError(f"data: {cfg['data']} holds no examples")
    out = Path(cfg["output_dir"])
    if resume and not any(out.glob("checkpoint-*")):
        raise FileNotFoundError(f"--resume: no checkpoint-* folder in {str(out)!r}")

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainingArguments

    from .trainer import VCRDTrainer

    tokenizer = AutoTokenizer.from_pretrained(cfg["student"], local_files_only=True)
    student = AutoModelForCausalLM.from_pretrained(cfg["student"], local_files_only=True)
    teacher = AutoModelForCausalLM.from_pretrained(cfg["teacher"], local_files_only=True)
    args = TrainingArguments(
        output_dir=str(out), max_steps=cfg["max_steps"], per_device_train_batch_size=cfg["batch_size"],
        gradient_accumulation_steps=cfg["grad_accum"], learning_rate=cfg["learning_rate"],
        save_steps=cfg["save_steps"], logging_steps=cfg["logging_steps"], seed=cfg["seed"], data_seed=cfg["seed"],
        report_to=[], use_cpu=not torch.cuda.is_available(), remove_unused_columns=False,
        save_strategy="steps",
    )
    trainer = VCRDTrainer(model=student, teacher_model=teacher, vcrd_config=cfg["vcrd_config"], args=args,
                          train_dataset=examples, data_collator=DistillCollator(tokenizer, cfg["max_length"]))
    trainer.train(resume_from_checkpoint=True if resume else None)
    trainer.save_model(str(out / "final"))
    tokenizer.save_pretrained(str(out / "final"))
    return out
