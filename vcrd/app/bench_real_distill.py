"""``vcrd bench-real distill``: distil a layer-pruned SmolLM2 from the full model on CHAMP solutions.

The teacher is the model in ``--model`` (SmolLM2-135M-Instruct from ``vcrd fetch-model smollm2``); the
student keeps every ``keep_every``-th decoder layer of it (layers 0, 2, 4, … : 15 of 30, 81 M parameters)
and starts from the teacher's weights. The data are CHAMP's reference solutions (270 competition
problems, :mod:`vcrd.select.champ`), each rendered as a chat (the problem as the user turn, the solution's
steps separated by blank lines, then ``Answer: …``, as the assistant turn); ``n_eval`` problems are held out.

For each seed (the order of the training batches; the student's start is the same pruned copy) every
preset (``kd``, ``discord``, ``vcrd``) distils a fresh student on the **same batches** through
:func:`vcrd.distill_loss` (fused linear, the whole 49,152-token vocabulary, models in ``dtype``).
Held out, per problem, over the solution's tokens:

- ``kl``: mean ``KL(q_teacher ‖ p_student)`` over the full vocabulary (fp32 from the models' logits);
- ``nll``: mean ``−log p_student(solution token)``;
- ``agree``: the fraction of tokens where the student's argmax is the teacher's.

Reported: each preset's mean over seeds, a 95 % bootstrap interval over the held-out problems (of the
per-problem means over seeds) and the paired difference to ``kd`` with its interval; the student before
distillation as a baseline. Step time: the loss alone (forward + backward over the hidden states of one
training batch) with vcrd's fused-linear loss (``kd`` and ``vcrd``), TRL 1.16's
``_chunked_divergence_loss`` (beta 0) and Liger's ``LigerFusedLinearJSDLoss`` (beta 0), each gradient
checked against float64: a forward KL written here (:func:`forward_kl_float64`) for the ``kd``-like losses,
the float64 reference of SPEC.md for the ``vcrd`` preset.
"""

from __future__ import annotations

import copy
import json
import os
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Dict, List, Sequence, Tuple

import torch

from ..core.progress import progress
from ..train.data import DistillCollator, Example
from .bench_real import bootstrap_ci

METRICS = ("kl", "nll", "agree")
LOSS_PROVIDERS = ("vcrd kd", "vcrd vcrd", "TRL chunked (beta 0)", "Liger fused JSD (beta 0)")


@dataclass
class DistillBenchSettings:
    model: str
    out: str = "runs/real-distill"
    presets: Tuple[str, ...] = ("kd", "discord", "vcrd")
    seeds: int = 2
    steps: int = 20
    batch_size: int = 4
    max_length: int = 256
    n_eval: int = 24
    lr: float = 1e-4
    keep_every: int = 2
    dtype: str = "bfloat16"
    threads: int = 0
    timing_repeats: int = 3
    bootstrap: int = 2000


def champ_solution_examples() -> List[Example]:
    """Every CHAMP problem with its reference solution: steps joined by blank lines, then ``Answer: …``."""
    from ..select.champ import champ_file

    problems = json.loads(champ_file().read_text())["problems"]
    out = []
    for key in sorted(problems):
        p = problems[key]
        steps = [s["_text"].strip() for s in p["solution"]["steps"] if s["_text"].strip()]
        steps.append(f"Answer: {p['_answer'].strip()}")
        out.append(Example(prompt=p["_text"].strip(), response="\n\n".join(steps), steps=steps,
                           extra={"identifier": key}))
    return out


def prune_layers(model: torch.nn.Module, keep_every: int) -> torch.nn.Module:
    """A copy of a decoder-only causal LM keeping layers ``0, k, 2k, …`` (``k = keep_every``), every other
    weight shared in value (copied), so it starts as close to the original as the pruning allows."""
    cfg = copy.deepcopy(model.config)
    keep = list(range(0, cfg.num_hidden_layers, keep_every))
    cfg.num_hidden_layers = len(keep)
    if getattr(cfg, "layer_types", None):
        cfg.layer_types = [cfg.layer_types[i] for i in keep]
    student = type(model)(cfg).to(next(model.parameters()).dtype)
    state = {}
    for name, value in model.state_dict().items():
        parts = name.split(".")
        if "layers" in parts:
            at = parts.index("layers") + 1
            old = int(parts[at])
            if old not in keep:
                continue
            parts[at] = str(keep.index(old))
        state[".".join(parts)] = value
    student.load_state_dict(state, strict=True)
    return student


def training_batches(n_examples: int, steps: int, batch_size: int, seed: int) -> List[List[int]]:
    """``steps`` lists of ``batch_size`` example indices: epochs of a seeded permutation."""
    rng, order, out = random.Random(seed), [], []
    for _ in range(steps):
        if len(order) < batch_size:
            fresh = list(range(n_examples))
            rng.shuffle(fresh)
            order += fresh
        out.append(order[:batch_size])
        order = order[batch_size:]
    return out


@torch.no_grad()
def held_out_metrics(student, teacher, batches: Sequence[Dict[str, torch.Tensor]]) -> Dict[str, List[float]]:
    """Per held-out sequence: mean KL(teacher ‖ student), the student's NLL of the solution, top-1 agreement."""
    out: Dict[str, List[float]] = {m: [] for m in METRICS}
    student.eval()
    for batch in batches:
        kw = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        logp = torch.log_softmax(student(**kw).logits[:, :-1].float(), -1)
        logq = torch.log_softmax(teacher(**kw).logits[:, :-1].float(), -1)
        y = batch["labels"][:, 1:]
        valid = y != -100
        kl = (logq.exp() * (logq - logp)).sum(-1)
        nll = -logp.gather(-1, y.clamp_min(0)[..., None])[..., 0]
        agree = (logp.argmax(-1) == logq.argmax(-1)).float()
        for i in range(y.shape[0]):
            v = valid[i]
            for name, t in (("kl", kl), ("nll", nll), ("agree", agree)):
                out[name].append(float(t[i][v].mean()))
    student.train()
    return out


def distil_one(student, teacher, examples: Sequence[Example], collate: DistillCollator, preset: str,
               batches: Sequence[Sequence[int]], lr: float, bar) -> Dict[str, List[float]]:
    """Train ``student`` on ``batches`` with one preset (AdamW, constant ``lr``, gradient clip 1);
    returns the loss curve and each step's wall time."""
    from ..train.trainer import distill_loss

    opt = torch.optim.AdamW(student.parameters(), lr=lr, weight_decay=0.0)
    curve: Dict[str, List[float]] = {"loss": [], "seconds": []}
    student.train()
    for chosen in batches:
        t0 = time.perf_counter()
        loss, _ = distill_loss(student, teacher, collate([examples[i] for i in chosen]), preset)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        curve["loss"].append(loss.item())
        curve["seconds"].append(time.perf_counter() - t0)
        bar.update(1)
    return curve


def forward_kl_float64(h: torch.Tensor, w: torch.Tensor, ht: torch.Tensor, wt: torch.Tensor,
                       valid: torch.Tensor) -> torch.Tensor:
    """``mean over valid rows of KL(softmax(ht wtᵀ) ‖ softmax(h wᵀ))`` in float64: the oracle of the timing
    section (``h [N, H]``, ``w [V, H]``, ``valid [N]`` bool)."""
    logp = torch.log_softmax(h.double() @ w.double().T, -1)
    logq = torch.log_softmax(ht.double() @ wt.double().T, -1)
    return ((logq.exp() * (logq - logp)).sum(-1) * valid).sum() / valid.sum()


def loss_providers(steps: torch.Tensor, cu_seqlens: torch.Tensor) -> Dict[str, Callable]:
    """``name -> f(h [N, H], w [V, H], ht, wt, y [N]) -> loss``: the losses timed in the same loop (the rows
    are packed sequences with boundaries ``cu_seqlens`` and reasoning steps ``steps``)."""
    from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss
    from trl.trainer.distillation_trainer import _chunked_divergence_loss

    from ..loss.fused_linear import fused_linear_vcrd_loss

    liger = LigerFusedLinearJSDLoss(weight_hard_loss=0.0, weight_soft_loss=1.0, beta=0.0, compiled=True)

    def trl(h, w, ht, wt, y):
        return _chunked_divergence_loss(h[None], ht[None], w, wt, (y != -100)[None], beta=0.0)[0]

    def vcrd(preset: str) -> Callable:
        return lambda h, w, ht, wt, y: fused_linear_vcrd_loss(h, w, ht, wt, y, step_ids=steps, cu_seqlens=cu_seqlens,
                                                              config=preset)

    return {"vcrd kd": vcrd("kd"), "vcrd vcrd": vcrd("vcrd"),
            "TRL chunked (beta 0)": trl,
            "Liger fused JSD (beta 0)": lambda h, w, ht, wt, y: liger(h, w, ht, wt, y)}


OBJECTIVE = {"vcrd kd": "kd", "vcrd vcrd": "vcrd", "TRL chunked (beta 0)": "kd", "Liger fused JSD (beta 0)": "kd"}


def oracle_gradients(loss: Callable, h0: torch.Tensor, w0: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(∂loss/∂h, ∂loss/∂W)`` of ``loss(h, w)`` at ``h0, w0`` promoted to float64."""
    h, w = h0.detach().double().requires_grad_(), w0.detach().double().requires_grad_()
    loss(h, w).backward()
    return h.grad, w.grad


def time_losses(student, teacher, batch: Dict[str, torch.Tensor], repeats: int) -> List[Dict[str, object]]:
    """Each provider's loss forward + backward on one batch's final hidden states (median of ``repeats``
    after one warm-up), its gradients w.r.t. the hidden states and the head checked, by relative Frobenius
    error, against float64: :func:`forward_kl_float64` for the ``kd``-equivalent providers, the float64
    reference of SPEC.md (``vcrd.core.reference``) on float64 logits for vcrd's ``vcrd`` preset."""
    from ..core.reference import vcrd_loss as reference_loss

    kw = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        hs = student.model(**kw).last_hidden_state[:, :-1]
        ht = teacher.model(**kw).last_hidden_state[:, :-1]
    y = batch["labels"][:, 1:].reshape(-1)
    keep = y != -100
    if not keep.any():
        raise ValueError("timing batch: expected rows with labels, got none (raise max_length)")
    h0, ht, y = hs.reshape(-1, hs.shape[-1])[keep], ht.reshape(-1, ht.shape[-1])[keep], y[keep]
    steps = batch["step_ids"][:, 1:].reshape(-1)[keep]
    per_sequence = keep.view(hs.shape[0], -1).sum(1)  # the kept rows are packed sequences: their boundaries
    cu_seqlens = torch.cat([per_sequence.new_zeros(1), per_sequence.cumsum(0)])
    w0, wt = student.lm_head.weight.detach(), teacher.lm_head.weight.detach()
    teacher_logits = ht.double() @ wt.double().T
    oracles = {"kd": oracle_gradients(lambda h, w: forward_kl_float64(h, w, ht, wt, torch.ones_like(keep[keep])),
                                      h0, w0),
               "vcrd": oracle_gradients(lambda h, w: reference_loss(h @ w.T, teacher_logits, y, step_ids=steps,
                                                                    cu_seqlens=cu_seqlens, config="vcrd"), h0, w0)}
    rows = []
    for name, fn in loss_providers(steps, cu_seqlens).items():
        times = []
        for _ in range(repeats + 1):
            h, w = h0.detach().clone().requires_grad_(), w0.clone().requires_grad_()
            t0 = time.perf_counter()
            fn(h, w, ht, wt, y).backward()
            times.append(time.perf_counter() - t0)
        grad_h, grad_w = oracles[OBJECTIVE[name]]
        rows.append({"provider": name, "median_s": sorted(times[1:])[len(times[1:]) // 2], "rows": int(y.numel()),
                     "vocab": int(w0.shape[0]), "objective": OBJECTIVE[name],
                     "grad_rel_err_h": float((h.grad.double() - grad_h).norm() / grad_h.norm()),
                     "grad_rel_err_w": float((w.grad.double() - grad_w).norm() / grad_w.norm())})
    return rows


def paired_summary(per_seed: Dict[str, Dict[str, Dict[str, List[float]]]], presets: Sequence[str],
                   resamples: int) -> List[Dict[str, object]]:
    """Per preset and metric: mean over problems of the per-problem mean over seeds, its bootstrap CI
    over problems, and the paired difference to ``kd`` (same problems, same seeds)."""
    def by_problem(preset: str, metric: str) -> List[float]:
        seeds = [per_seed[s][preset][metric] for s in per_seed]
        return [sum(v) / len(v) for v in zip(*seeds)]

    rows = []
    for preset in presets:
        row: Dict[str, object] = {"preset": preset}
        for metric in METRICS:
            vals = by_problem(preset, metric)
            row[metric] = (sum(vals) / len(vals), *bootstrap_ci(vals, resamples, seed=0))
            if preset not in ("kd", "before") and "kd" in presets:
                diff = [a - b for a, b in zip(vals, by_problem("kd", metric))]
                row[f"{metric}_vs_kd"] = (sum(diff) / len(diff), *bootstrap_ci(diff, resamples, seed=0))
        rows.append(row)
    return rows


def check_settings(s: DistillBenchSettings) -> None:
    """Refuse bad settings before any work (``ValueError`` naming the setting)."""
    from ..core.config import PRESETS
    from ..select.model_io import DTYPES

    for name, low in (("seeds", 1), ("steps", 1), ("batch_size", 1), ("max_length", 8), ("n_eval", 2),
                      ("keep_every", 2), ("threads", 0), ("timing_repeats", 1), ("bootstrap", 100)):
        value = getattr(s, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name}: expected an int >= {low}, got {value!r}")
    if not (isinstance(s.lr, float) and 0 < s.lr < 1):
        raise ValueError(f"lr: expected a float in (0, 1), got {s.lr!r}")
    if s.dtype not in DTYPES:
        raise ValueError(f"dtype: expected one of {sorted(DTYPES)}, got {s.dtype!r}")
    unknown = [p for p in s.presets if p not in PRESETS]
    if not s.presets or unknown or "kd" not in s.presets:
        raise ValueError(f"presets: expected names from {sorted(PRESETS)} including 'kd', got {list(s.presets)!r}")
    if not (Path(s.model) / "config.json").is_file():
        raise FileNotFoundError(f"--model: expected a local model folder with config.json (vcrd fetch-model "
                                f"smollm2 --out DIR), got {s.model!r}")


def run_distill_bench(s: DistillBenchSettings, log=print) -> Dict[str, object]:
    """The benchmark (module docstring); writes ``results.json`` and ``results.md`` in ``s.out``."""
    check_settings(s)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..select.model_io import DTYPES

    if s.threads:
        torch.set_num_threads(s.threads)
    wall0, cpu0, load0 = time.perf_counter(), time.process_time(), os.getloadavg()[0]
    tok = AutoTokenizer.from_pretrained(s.model, local_files_only=True)
    teacher = AutoModelForCausalLM.from_pretrained(s.model, local_files_only=True, dtype=DTYPES[s.dtype]).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    examples = champ_solution_examples()
    random.Random(0).shuffle(examples)
    held, train = examples[:s.n_eval], examples[s.n_eval:]
    collate = DistillCollator(tok, max_length=s.max_length, chat_template=True)
    eval_batches = [collate(held[i:i + s.batch_size]) for i in range(0, len(held), s.batch_size)]
    start = prune_layers(teacher, s.keep_every)
    n_params = sum(p.numel() for p in start.parameters())
    log(f"teacher {sum(p.numel() for p in teacher.parameters()) / 1e6:.1f} M parameters, student "
        f"{n_params / 1e6:.1f} M ({start.config.num_hidden_layers} layers), {s.dtype}, {torch.get_num_threads()} "
        f"threads; {len(train)} training and {len(held)} held-out CHAMP solutions; load average {load0:.1f}")
    per_seed: Dict[str, Dict[str, Dict[str, List[float]]]] = {}
    curves: Dict[str, Dict[str, Dict[str, List[float]]]] = {}
    before = held_out_metrics(start, teacher, eval_batches)
    with progress(total=s.seeds * len(s.presets) * s.steps, desc="distil", unit="step") as bar:
        for seed in range(s.seeds):
            batches = training_batches(len(train), s.steps, s.batch_size, seed)
            per_seed[str(seed)], curves[str(seed)] = {"before": before}, {}
            for preset in s.presets:
                student = copy.deepcopy(start)
                curves[str(seed)][preset] = distil_one(student, teacher, train, collate, preset, batches, s.lr, bar)
                per_seed[str(seed)][preset] = held_out_metrics(student, teacher, eval_batches)
    timing = time_losses(start.train(), teacher, collate(train[:s.batch_size]), s.timing_repeats)
    results = {"settings": asdict(s), "student_parameters": n_params, "per_seed": per_seed, "curves": curves,
               "summary": paired_summary(per_seed, ["before", *s.presets], s.bootstrap), "timing": timing,
               "seconds": time.perf_counter() - wall0, "cpu_seconds": time.process_time() - cpu0,
               "threads": torch.get_num_threads(), "load_average": [load0, os.getloadavg()[0]]}
    out = Path(s.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    report = format_report(results)
    (out / "results.md").write_text(report + "\n")
    plot_results(results, out / "results.png")
    log(report)
    return results


def plot_results(results: Dict[str, object], path: Path) -> bool:
    """``path``: the training loss per step (mean over seeds) and each held-out metric with its interval, per
    preset. False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(1, 1 + len(METRICS), figsize=(14, 3.4))
    presets = results["settings"]["presets"]
    for preset in presets:
        runs = [results["curves"][seed][preset]["loss"] for seed in results["curves"]]
        axes[0].plot([sum(v) / len(v) for v in zip(*runs)], label=preset)
    axes[0].set(title="training loss (mean over seeds)", xlabel="step")
    axes[0].legend(fontsize=8)
    titles = {"kl": "held-out KL(teacher ‖ student)", "nll": "held-out NLL of the solutions",
              "agree": "top-1 agreement"}
    rows = results["summary"]
    for ax, metric in zip(axes[1:], METRICS):
        mean = [r[metric][0] for r in rows]
        err = [[r[metric][0] - r[metric][1] for r in rows], [r[metric][2] - r[metric][0] for r in rows]]
        ax.bar(range(len(rows)), mean, yerr=err, capsize=4, color="#7aa6c2")
        ax.set_xticks(range(len(rows)), [r["preset"] for r in rows], fontsize=8)
        ax.set(title=titles[metric])
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def _ci(v: Sequence[float], digits: int = 3) -> str:
    return f"{v[0]:.{digits}f} [{v[1]:.{digits}f}, {v[2]:.{digits}f}]"


def format_report(results: Dict[str, object]) -> str:
    """The markdown tables of ``results`` (as saved in ``results.json``)."""
    s = results["settings"]
    lines = [f"Held out ({s['n_eval']} CHAMP solutions), mean over {s['seeds']} seed(s) of batch order; "
             f"[95 % bootstrap interval over problems]; {s['steps']} steps of {s['batch_size']} at lr {s['lr']}, "
             f"{s['dtype']}.", "",
             "| student | KL(teacher ‖ student) | Δ vs kd | NLL of the solutions | Δ vs kd | top-1 agreement "
             "| Δ vs kd |",
             "|---|---|---|---|---|---|---|"]
    for r in results["summary"]:
        cells = [f"{_ci(r[m])} | {_ci(r[m + '_vs_kd']) if m + '_vs_kd' in r else '-'}" for m in METRICS]
        name = "before distillation" if r["preset"] == "before" else r["preset"]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", f"Loss step time on one training batch ({results['timing'][0]['rows']} rows, vocabulary "
              f"{results['timing'][0]['vocab']}): forward + backward over the final hidden states, median of "
              f"{s['timing_repeats']}.", "",
              "| loss | median (s) | gradient vs its float64 oracle (h, W): relative error |", "|---|---|---|"]
    for r in results["timing"]:
        if "grad_rel_err_h" in r:
            oracle = "forward KL" if r.get("objective", "kd") == "kd" else "reference, preset vcrd"
            check = f"{r['grad_rel_err_h']:.1e}, {r['grad_rel_err_w']:.1e} ({oracle})"
        else:  # results.json written before the vcrd preset's gradient was checked
            check = "not checked"
        lines.append(f"| {r['provider']} | {r['median_s']:.3f} | {check} |")
    lines += ["", f"{results['seconds']:.0f} s wall, {results['cpu_seconds']:.0f} s CPU, {results['threads']} "
              f"thread(s), load average {results['load_average'][0]:.1f} → {results['load_average'][1]:.1f}."]
    return "\n".join(lines)
