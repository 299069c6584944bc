"""The demo's models and their training (``vcrd demo``, ``vcrd bench-quality``): the tiny Llamas, the learning-rate
schedule and length-grouped batches, the teacher's cross-entropy training, a student's distillation with the
VCRD loss (online, or from the teacher's top-K cache) and that cache, built as ``vcrd cache-teacher`` does."""

from __future__ import annotations

import contextlib
import math
import os
import random
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Union

import torch

from ..core.config import VCRDConfig
from ..train.data import DistillCollator, Example, write_jsonl
from ..train.teacher_cache import TeacherCache
from ..train.teacher_cache_collator import TeacherCacheCollator
from ..train.teacher_cache_writer import build_cache
from ..train.trainer import distill_loss
from .demo_settings import DemoSettings
from .synthetic import STYLES, Problem


def llama(tok, hidden: int, layers: int, seed: int):
    """A small Llama (``hidden``-d, ``layers`` layers, untied head) for ``tok``'s vocabulary, seeded."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, tie_word_embeddings=False))


def schedule(opt, steps: int):
    """Linear warm-up over the first tenth of the steps, then cosine decay to 0."""
    warm = max(1, steps // 10)
    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))


def batches(examples: Sequence[Example], steps: int, batch_size: int, seed: int, group: int) -> List[List[Example]]:
    """``steps`` batches; every ``group`` batches come from one random draw of ``group * batch_size``
    examples sorted by length (less padding); ``group=1`` is plain random sampling."""
    rng = random.Random(seed)
    n = min(batch_size, len(examples))
    out: List[List[Example]] = []
    while len(out) < steps:
        pool = rng.sample(list(examples), min(len(examples), n * group))
        pool.sort(key=lambda e: len(e.prompt) + len(e.response))
        chunk = [pool[i:i + n] for i in range(0, len(pool) - n + 1, n)]
        rng.shuffle(chunk)
        out += chunk
    return out[:steps]


def _step(model, opt, sched, loss) -> None:
    """One optimiser step on ``loss`` (gradients clipped to norm 1), then the schedule's."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    sched.step()


def train_teacher(model, tok, problems: Sequence[Problem], steps: int, batch_size: int, lr: float, seed: int,
                  group: int, bar=None) -> List[float]:
    """Cross-entropy on the reference solutions of ``problems`` in both styles."""
    collate = DistillCollator(tok, max_length=256)
    examples = [Example(p.question, p.solution(style)) for p in problems for style in STYLES]
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, betas=(0.9, 0.98))
    sched = schedule(opt, steps)
    losses: List[float] = []
    model.train()
    for chosen in batches(examples, steps, batch_size, seed, group):
        batch = collate(chosen)
        loss = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
        _step(model, opt, sched, loss)
        losses.append(loss.item())
        if bar is not None:
            bar.update(1)
    return losses


MAX_LENGTH = 256  # tokens per example, for the students and the teacher cache


def distil(student, teacher, tok, examples: Sequence[Example], config: Union[str, VCRDConfig], s: DemoSettings,
           steps: int, seed: int, bar=None, cache: Optional[TeacherCache] = None) -> Dict[str, List[float]]:
    """Distil ``student`` from ``teacher`` on ``examples`` with one loss config; per-step curves:
    the loss, mean w_val / w_dc, and mean w_dc on digit tokens and on the other trace tokens.
    With ``cache`` (built over ``examples``, in order) the teacher is its cached top-K rows: no teacher runs."""
    collate = DistillCollator(tok, max_length=MAX_LENGTH)
    if cache is not None:
        cached, index = TeacherCacheCollator(collate, cache), {id(e): i for i, e in enumerate(examples)}
        collate = lambda chosen: cached([(index[id(e)], e) for e in chosen])  # noqa: E731
    digits = torch.tensor([tok.convert_tokens_to_ids(c) for c in "0123456789"])
    opt = torch.optim.AdamW(student.parameters(), lr=s.lr, weight_decay=0.0, betas=(0.9, 0.98))
    sched = schedule(opt, steps)
    curves: Dict[str, List[float]] = {k: [] for k in ("loss", "w_val", "w_dc", "agree", "w_dc_digits", "w_dc_other")}
    student.train()
    for chosen in batches(examples, steps, s.batch_size, seed, s.group):
        batch = collate(chosen)
        loss, stats = distill_loss(student, teacher, batch, config)
        _step(student, opt, sched, loss)
        means = stats.means()
        curves["loss"].append(loss.item())
        for key in ("w_val", "w_dc", "agree"):
            curves[key].append(float(means[key]))
        with torch.no_grad():
            y = batch["labels"][:, 1:]
            w = stats.w_dc.detach().float()
            is_digit = torch.isin(y, digits)
            other = (y != -100) & ~is_digit
            curves["w_dc_digits"].append(float(w[is_digit].mean()) if is_digit.any() else math.nan)
            curves["w_dc_other"].append(float(w[other].mean()) if other.any() else math.nan)
        if bar is not None:
            bar.update(1)
    return curves


def build_teacher_cache(teacher, tok, examples: Sequence[Example], k: int, folder: Union[str, Path],
                        batch_size: int = 64) -> TeacherCache:
    """The teacher's top-``k`` cache of ``examples`` in ``folder/cache``, built as ``vcrd cache-teacher
    --model folder/teacher --data folder/traces.jsonl --top-k k`` does (the teacher and the traces are
    saved there first), then opened and verified against ``examples``."""
    folder = Path(folder)
    teacher.save_pretrained(folder / "teacher")
    tok.save_pretrained(folder / "teacher")
    write_jsonl(folder / "traces.jsonl", [e.to_json() for e in examples])
    out = build_cache(folder / "teacher", folder / "traces.jsonl", folder / "cache", k, batch_size=batch_size,
                      max_length=MAX_LENGTH, progress=False, say=lambda _: None)
    cache = TeacherCache(out, verify=False)  # verified with the examples below
    cache.verify(examples, DistillCollator(tok, max_length=MAX_LENGTH), vocab_size=len(tok))
    return cache


@contextlib.contextmanager
def eager_loss() -> Iterator[None]:
    """``VCRD_COMPILE=0`` unless set: at a 90-token vocabulary compiling the loss chunks costs more
    than it saves (and batch shapes vary, so it would recompile)."""
    old = os.environ.get("VCRD_COMPILE")
    os.environ.setdefault("VCRD_COMPILE", "0")
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("VCRD_COMPILE", None)


__all__ = ["MAX_LENGTH", "batches", "build_teacher_cache", "distil", "eager_loss", "llama", "schedule",
           "train_teacher"]
