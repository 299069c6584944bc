"""``vcrd`` command line: ``vcrd demo``, ``vcrd aot``, ``vcrd score``, ``vcrd train``."""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import List, Optional

import torch

from .. import __version__
from ..backends import resolve_impl
from ..core.config import PRESETS, VCRDConfig
from ..loss.functional import vcrd_loss


def synthetic_batch(batch: int, seq_len: int, vocab: int, seed: int):
    """A realistic distillation batch: correlated student/teacher logits (std 10), teacher-trace
    labels, prompt rows ignored, reasoning steps of 8–40 tokens."""
    g = torch.Generator().manual_seed(seed)
    N = batch * seq_len
    u = torch.randn(N, vocab, generator=g) * 10
    s = 0.8 * u + 0.6 * torch.randn(N, vocab, generator=g) * 10
    y = torch.multinomial(torch.softmax(u / 3, -1), 1, generator=g).squeeze(1).reshape(batch, seq_len)
    y[:, : seq_len // 8] = -100  # the prompt
    lengths = torch.randint(8, 41, (batch, seq_len), generator=g)
    step_ids = torch.stack([torch.repeat_interleave(torch.arange(seq_len), row)[:seq_len] for row in lengths])
    return s.reshape(batch, seq_len, vocab), u.reshape(batch, seq_len, vocab), y, step_ids


def demo(args: argparse.Namespace) -> int:
    if not args.quick:
        from .demo import DemoSettings, run_demo

        run_demo(DemoSettings(n_train=args.n_train, n_eval=args.n_eval, teacher_steps=args.teacher_steps,
                              student_steps=args.student_steps, seed=args.seed, out=args.out))
        return 0
    s, u, y, step_ids = synthetic_batch(args.batch, args.seq_len, args.vocab, args.seed)
    impl = resolve_impl(args.impl, s)
    print(f"vcrd {__version__} demo: {args.batch}×{args.seq_len} tokens, vocab {args.vocab}, fp32, impl={impl}, "
          f"{torch.get_num_threads()} threads")
    print("The first call of each preset includes torch.compile (set VCRD_COMPILE=0 to skip it).\n")
    header = f"{'preset':<8} {'loss':>9} {'mean w_val':>10} {'mean w_dc':>9} {'agree':>6} {'naturalness':>11} " \
             f"{'fwd+bwd ms':>10} {'|Δ| vs reference':>16}"
    print(header)
    print("-" * len(header))
    for name in PRESETS:
        cfg = VCRDConfig.preset(name)
        times: List[float] = []
        for _ in range(args.repeats + 1):  # the first run warms up (and compiles)
            x = s.clone().requires_grad_()
            t0 = time.perf_counter()
            loss, stats = vcrd_loss(x, u, y, step_ids=step_ids, config=cfg, impl=impl, return_stats=True)
            loss.backward()
            times.append(time.perf_counter() - t0)
        rows = slice(0, 2)  # parity on two sequences in float64 (the reference is O(N²) in the window)
        want = vcrd_loss(s[rows].double(), u[rows].double(), y[rows], step_ids=step_ids[rows], config=cfg,
                         impl="reference")
        got = vcrd_loss(s[rows], u[rows], y[rows], step_ids=step_ids[rows], config=cfg, impl=impl)
        m = stats.means()
        print(f"{name:<8} {loss.item():>9.4f} {m['w_val'].item():>10.3f} {m['w_dc'].item():>9.3f} "
              f"{m['agree'].item():>6.2f} {m['n'].item():>11.3f} {1e3 * statistics.median(times[1:]):>10.1f} "
              f"{abs(got.item() - want.item()):>16.2e}")
    print("\nkd: forward KL; discord: + per-token distribution correction; vcrd: + validity weight and a "
          "4-step local window (SPEC §4–5).")
    return 0


def aot(args: argparse.Namespace) -> int:
    from .aot import compile_all, format_table

    reports = compile_all(args.arch)
    print(format_table(reports))
    spilling = [r for r in reports if r.spill_bytes]
    if spilling:
        print(f"\n{len(spilling)} kernel variant(s) spill registers to local memory", file=sys.stderr)
        return 1
    print(f"\n{len(reports)} kernel variants compiled, none spills.")
    return 0


def score(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..select.naturalness import score_responses
    from ..select.selection import rank_teachers, select_responses
    from ..train.data import read_jsonl, write_jsonl

    examples = read_jsonl(args.data)  # every line checked before the model loads
    if not examples:
        raise ValueError(f"data: {args.data} holds no examples")
    model_dir = Path(args.model)
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"--model: expected a local Hugging Face model folder with config.json, "
                                f"got {str(model_dir)!r}")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True).to(args.device).eval()
    prompts = [e.prompt for e in examples]
    responses = [e.steps if e.steps is not None else e.response for e in examples]
    scores = score_responses(model, tokenizer, prompts, responses, window=args.window, drop_first=args.drop_first,
                             max_step_tokens=args.max_step_tokens, token_budget=args.token_budget, progress=True)
    chosen = select_responses(prompts, scores)
    write_jsonl(args.out, ({**examples[i].to_json(), "lalp": scores[i].lalp, "galp": scores[i].galp,
                            "step_scores": scores[i].step_scores} for i in chosen))
    print(f"\n{len(examples)} responses to {len(chosen)} prompts scored (window {args.window}); "
          f"wrote the best-LALP response per prompt to {args.out}\n")
    print(f"{'teacher':<20} {'responses':>9} {'mean LALP':>10} {'mean GALP':>10} {'win rate':>9}")
    for r in rank_teachers(prompts, [e.teacher for e in examples], scores):
        print(f"{r.teacher:<20} {r.n_responses:>9} {r.mean_lalp:>10.4f} {r.mean_galp:>10.4f} {r.win_rate:>9.2%}")
    return 0


def train_command(args: argparse.Namespace) -> int:
    from ..train.run import train

    out = train(args.config, resume=args.resume)
    print(f"done: checkpoints in {out}, final model in {out / 'final'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vcrd", description="Validity-calibrated reasoning distillation losses.")
    parser.add_argument("--version", action="version", version=f"vcrd {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    d = sub.add_parser("demo", help="the main job: distil a student on the built-in task, kd vs vcrd",
                       description="Train a small teacher on the built-in arithmetic task, let it write traces, keep "
                                   "the best-LALP trace per problem, distil one student with preset kd and one with "
                                   "preset vcrd, and compare held-out accuracy (results.md and curves.png in --out). "
                                   "With --quick: only the loss on one realistic batch, for each preset.")
    d.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    d.add_argument("--n-train", type=int, default=256, help="training problems (default 256)")
    d.add_argument("--n-eval", type=int, default=48, help="held-out problems (default 48)")
    d.add_argument("--teacher-steps", type=int, default=300, help="teacher training steps (default 300)")
    d.add_argument("--student-steps", type=int, default=150, help="distillation steps per student (default 150)")
    d.add_argument("--quick", action="store_true", help="only the three presets on one batch: loss, weights, timing")
    d.add_argument("--batch", type=int, default=4, help="--quick: sequences (default 4)")
    d.add_argument("--seq-len", type=int, default=256, help="--quick: tokens per sequence (default 256)")
    d.add_argument("--vocab", type=int, default=32000, help="--quick: vocabulary size (default 32000)")
    d.add_argument("--repeats", type=int, default=3, help="--quick: timed runs after one warm-up (default 3)")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--impl", default="auto", choices=["auto", "torch", "triton", "reference"])
    d.set_defaults(func=demo)
    a = sub.add_parser("aot", help="compile every Triton kernel for sm_80/sm_90 and report registers and spills",
                       description="Compile every Triton kernel ahead of time (no GPU needed) and print registers, "
                                   "spill bytes and shared memory per kernel, read from the cubin with cuobjdump. "
                                   "Exits 1 if any kernel spills.")
    a.add_argument("--arch", type=int, nargs="+", default=[80, 90], help="SM versions (default: 80 90)")
    a.set_defaults(func=aot)
    s = sub.add_parser("score", help="score responses by local naturalness (LALP), keep the best per prompt",
                       description="Score every response of a jsonl file (fields: prompt, response, optional "
                                   "teacher and steps) with a local causal LM, write the best-LALP response per "
                                   "prompt, and print a per-teacher summary (SPEC §8).")
    s.add_argument("--model", required=True, help="local Hugging Face model folder (the student)")
    s.add_argument("--data", required=True, help="input jsonl")
    s.add_argument("--out", required=True, help="output jsonl: the selected responses with their scores")
    s.add_argument("--window", type=int, default=4, help="previous steps in context (default 4)")
    s.add_argument("--drop-first", type=int, default=0, help="ids not scored at the start of each step (default 0)")
    s.add_argument("--max-step-tokens", type=int, default=256, help="split longer steps at sentence ends")
    s.add_argument("--token-budget", type=int, default=8192, help="tokens per forward batch (default 8192)")
    s.add_argument("--device", default="cpu")
    s.set_defaults(func=score)
    t = sub.add_parser("train", help="distil a local student from a local teacher (JSON config)",
                       description="Distil a student from a teacher on a jsonl file with the VCRD loss, saving "
                                   "checkpoints every save_steps; see vcrd/train.py for the config keys.")
    t.add_argument("--config", required=True, help="JSON config file")
    t.add_argument("--resume", action="store_true", help="continue from the last checkpoint in output_dir")
    t.set_defaults(func=train_command)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    for name in ("batch", "seq_len", "vocab", "repeats", "max_step_tokens", "token_budget", "n_train", "n_eval",
                 "teacher_steps", "student_steps"):
        if getattr(args, name, 1) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for name in ("window", "drop_first"):
        if getattr(args, name, 0) < 0:
            parser.error(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    try:
        return args.func(args)
    except (ValueError, TypeError, FileNotFoundError) as e:
        print(f"vcrd {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
