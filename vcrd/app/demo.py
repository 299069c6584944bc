"""The main job (``vcrd demo``): a complete distillation on the built-in arithmetic task, on a CPU.

1. train a small teacher briefly on reference solutions (both styles, cross-entropy);
2. let it write two sampled solutions per training problem (its traces);
3. keep, per problem, the trace with the highest local naturalness (LALP) under the student;
4. distil the same initial student twice on the kept traces, with preset ``kd`` and with preset
   ``vcrd`` (same seeds, steps, data and batches), through :func:`vcrd.train.trainer.distill_loss`;
5. evaluate exact-match accuracy by greedy decoding on held-out problems;
6. print a table and write ``results.md`` and ``curves.png`` to the output folder.

Everything is seeded: the same seed gives the same table.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List

import torch

from ..select.naturalness import score_responses
from ..select.selection import select_responses
from ..train.data import DistillCollator, Example
from ..train.trainer import distill_loss
from .synthetic import Problem, check_answer
from .tokenizer import build_char_tokenizer


@dataclass
class DemoSettings:
    n_train: int = 256
    n_eval: int = 48
    teacher_steps: int = 300
    student_steps: int = 150
    batch_size: int = 16
    seed: int = 0
    out: str = "runs/demo"


def _llama(tok, hidden: int, layers: int, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, tie_word_embeddings=False))


def _schedule(opt, steps: int):
    """Linear warm-up over the first tenth of the steps, then cosine decay to 0."""
    warm = max(1, steps // 10)
    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))


def _problems(n: int, seed: int) -> List[Problem]:
    rng = random.Random(seed)
    from .synthetic import make_problem

    return [make_problem(rng, n_events=2) for _ in range(n)]


def _train_teacher(model, tok, problems: List[Problem], steps: int, batch_size: int, seed: int, bar) -> List[float]:
    collate = DistillCollator(tok, max_length=384)
    examples = [Example(p.question, p.solution(style)) for p in problems for style in ("terse", "verbose")]
    rng = random.Random(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    sched = _schedule(opt, steps)
    losses = []
    model.train()
    for _ in range(steps):
        batch = collate(rng.sample(examples, batch_size))
        loss = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        bar.update(1)
    return losses


@torch.inference_mode()
def _generate(model, tok, prompts: List[str], *, sample: bool, seed: int, max_new_tokens: int = 200) -> List[str]:
    """Solutions written by ``model`` for each prompt (greedy, or sampled at temperature 0.7)."""
    model.eval()
    torch.manual_seed(seed)
    out = []
    for i in range(0, len(prompts), 32):
        enc = [[tok.bos_token_id] + tok(p, add_special_tokens=False)["input_ids"] for p in prompts[i:i + 32]]
        L = max(map(len, enc))
        ids = torch.full((len(enc), L), tok.pad_token_id)
        mask = torch.zeros((len(enc), L), dtype=torch.long)
        for b, e in enumerate(enc):  # left padding, so every prompt ends where generation starts
            ids[b, L - len(e):] = torch.tensor(e)
            mask[b, L - len(e):] = 1
        gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=sample,
                             temperature=0.7 if sample else None, top_k=None, top_p=None,
                             pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        out += [tok.decode(g[L:], skip_special_tokens=True) for g in gen]
    return out


def _distil(student, teacher, tok, examples: List[Example], preset: str, steps: int, batch_size: int, seed: int,
            bar) -> Dict[str, List[float]]:
    collate = DistillCollator(tok, max_length=384)
    rng = random.Random(seed)  # the same batches for every preset
    opt = torch.optim.AdamW(student.parameters(), lr=3e-3, weight_decay=0.0)
    sched = _schedule(opt, steps)
    curves: Dict[str, List[float]] = {"loss": [], "w_val": [], "w_dc": [], "agree": []}
    student.train()
    for _ in range(steps):
        batch = collate(rng.sample(examples, min(batch_size, len(examples))))
        loss, stats = distill_loss(student, teacher, batch, preset)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        sched.step()
        means = stats.means()
        curves["loss"].append(loss.item())
        for key in ("w_val", "w_dc", "agree"):
            curves[key].append(float(means[key]))
        bar.update(1)
    return curves


def _accuracy(model, tok, problems: List[Problem], seed: int) -> float:
    answers = _generate(model, tok, [p.question for p in problems], sample=False, seed=seed)
    return sum(check_answer(a, p.answer) for a, p in zip(answers, problems)) / len(problems)


def _tail_mean(values: List[float], n: int = 20) -> float:
    tail = values[-n:]
    return sum(tail) / len(tail)


def _plot(curves: Dict[str, Dict[str, List[float]]], teacher_losses: List[float], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    axes[0].plot(teacher_losses, color="gray")
    axes[0].set(title="teacher: cross-entropy", xlabel="step", yscale="log")
    for preset, c in curves.items():
        axes[1].plot(c["loss"], label=preset)
        axes[2].plot(c["w_val"], label=f"{preset}: mean w_val")
        axes[2].plot(c["w_dc"], linestyle="--", label=f"{preset}: mean w_dc")
    axes[1].set(title="student: distillation loss", xlabel="step", yscale="log")
    axes[2].set(title="student: mean weights", xlabel="step")
    axes[1].legend(fontsize=8)
    axes[2].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return True


def run_demo(settings: DemoSettings) -> Dict[str, object]:
    """Run the whole job; return the results (also written to ``settings.out``)."""
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    out = Path(settings.out)
    out.mkdir(parents=True, exist_ok=True)
    tok = build_char_tokenizer()
    train = _problems(settings.n_train, settings.seed)
    held_out = _problems(settings.n_eval, settings.seed + 1)
    total = settings.teacher_steps + 2 * settings.student_steps
    with tqdm(total=total, desc="training", unit="step") as bar:
        teacher = _llama(tok, 128, 4, settings.seed)
        teacher_losses = _train_teacher(teacher, tok, train, settings.teacher_steps, settings.batch_size,
                                        settings.seed, bar)
        teacher.eval().requires_grad_(False)
        print("\nteacher writes two sampled traces per problem ...", flush=True)
        prompts = [p.question for p in train]
        traces = [_generate(teacher, tok, prompts, sample=True, seed=settings.seed + k) for k in (1, 2)]
        candidates = [(p, t) for k in range(2) for p, t in zip(prompts, traces[k])]
        initial_student = _llama(tok, 64, 2, settings.seed + 7)
        scores = score_responses(initial_student, tok, [c[0] for c in candidates], [c[1] for c in candidates],
                                 window=4)
        keep = select_responses([c[0] for c in candidates], scores)
        data = [Example(candidates[i][0], candidates[i][1]) for i in keep if candidates[i][1].strip()]
        teacher_train_acc = sum(check_answer(candidates[i][1], train[i % len(train)].answer) for i in keep) / len(keep)
        curves, accuracy = {}, {}
        for preset in ("kd", "vcrd"):
            student = _llama(tok, 64, 2, settings.seed + 7)  # the same initial student for both
            student.load_state_dict(initial_student.state_dict())
            curves[preset] = _distil(student, teacher, tok, data, preset, settings.student_steps,
                                     settings.batch_size, settings.seed + 3, bar)
            accuracy[preset] = _accuracy(student, tok, held_out, settings.seed)
    accuracy["teacher"] = _accuracy(teacher, tok, held_out, settings.seed)
    seconds = time.perf_counter() - t0
    rows = [("teacher (128-d, 4 layers)", accuracy["teacher"], "-", "-", "-"),
            *[(f"student, preset {p}", accuracy[p], f"{curves[p]['loss'][-1]:.4f}",
               f"{_tail_mean(curves[p]['w_val']):.3f}", f"{_tail_mean(curves[p]['w_dc']):.3f}")
              for p in ("kd", "vcrd")]]
    table = ["| model | held-out exact match | final distillation loss | mean w_val (last 20) | mean w_dc (last 20) |",
             "|---|---|---|---|---|"]
    table += [f"| {name} | {acc:.1%} | {loss} | {wv} | {wd} |" for name, acc, loss, wv, wd in rows]
    header = (f"vcrd demo, seed {settings.seed}: {settings.n_train} training problems (2-step arithmetic), teacher "
              f"{settings.teacher_steps} steps, 2 sampled traces per problem, best-LALP trace kept "
              f"(teacher traces correct on {teacher_train_acc:.0%} of kept problems), students distilled "
              f"{settings.student_steps} steps each, {settings.n_eval} held-out problems, greedy decoding; "
              f"{seconds:.0f} s on {torch.get_num_threads()} threads.")
    plotted = _plot(curves, teacher_losses, out / "curves.png")
    md = "\n".join(["# vcrd demo results", "", header, "", *table, "",
                    "![curves](curves.png)" if plotted else "", "",
                    "Command: `vcrd demo` (what `make demo` runs); the same seed gives the same table.", ""])
    (out / "results.md").write_text(md)
    (out / "results.json").write_text(json.dumps({"accuracy": accuracy, "seconds": seconds,
                                                  "teacher_trace_accuracy": teacher_train_acc}, indent=1))
    print("\n" + header + "\n")
    print("\n".join(table))
    print(f"\nwrote {out / 'results.md'} and {out / 'curves.png'}")
    return {"accuracy": accuracy, "seconds": seconds}
