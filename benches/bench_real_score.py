"""The LALP scorer on the real model: SmolLM2-135M-Instruct (``vcrd fetch-model smollm2``) scoring CHAMP
teachers' 0-shot solutions, fp32 and bf16 at 1 and 2 threads, beside the naive loop (one plain forward per
window, ``naive_score``) on the same responses.

    .venv/bin/python benches/bench_real_score.py --model models/smollm2 --problems 2

Response tokens/s = the responses' token count / wall time (the windows the scorer runs hold several times
as many tokens: printed as ``window tokens``). Every configuration's scores are compared with fp32's
(largest |Δ| over LALP, GALP and the step scores). Needs ``make real``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="models/smollm2")
    ap.add_argument("--problems", type=int, default=2, help="CHAMP problems (x 4 teachers, 0-shot)")
    ap.add_argument("--responses", type=int, default=0, help="score only the first N responses (0: all)")
    ap.add_argument("--window", type=int, default=4)
    ap.add_argument("--configs", default="float32:1,float32:2,bfloat16:1,bfloat16:2")
    ap.add_argument("--naive", default="float32:2", help="dtype:threads of the naive loop ('' to skip)")
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from vcrd.select.champ import load_champ
    from vcrd.select.model_io import DTYPES, chat_prompt
    from vcrd.select.naturalness import naive_score, score_responses, split_steps

    tok = AutoTokenizer.from_pretrained(args.model, local_files_only=True)
    problems = load_champ(args.problems)
    prompts = [chat_prompt(tok, r.messages) for p in problems for r in p.responses]
    responses = [r.solution for p in problems for r in p.responses]
    if args.responses:
        prompts, responses = prompts[:args.responses], responses[:args.responses]
    n_tokens = sum(len(tok(r, add_special_tokens=False)["input_ids"]) for r in responses)
    steps = [split_steps(r, tok) for r in responses]
    bos = 1 if tok.bos_token_id is not None else 0
    window_tokens = 0
    for prompt, ss in zip(prompts, steps):
        p = bos + len(tok(prompt, add_special_tokens=False)["input_ids"])
        lens = [len(tok(s, add_special_tokens=False)["input_ids"]) for s in ss]
        window_tokens += sum(p + sum(lens[max(0, i - args.window):i + 1]) for i in range(len(lens))) + p + sum(lens)
    print(f"{len(responses)} responses (of {args.problems} problems x 4 teachers, 0-shot), {n_tokens} response tokens, "
          f"{window_tokens} window tokens (one forward per window + GALP), load {os.getloadavg()[0]:.1f}")
    models = {}

    def model(dtype):
        if dtype not in models:
            models[dtype] = AutoModelForCausalLM.from_pretrained(args.model, local_files_only=True,
                                                                 dtype=DTYPES[dtype]).eval()
        return models[dtype]

    rows, reference = [], None
    for config in [c for c in args.configs.split(",") if c]:
        dtype, threads = config.split(":")
        torch.set_num_threads(int(threads))
        load = os.getloadavg()[0]
        t0, c0 = time.perf_counter(), time.process_time()
        scores = score_responses(model(dtype), tok, prompts, responses, window=args.window)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        flat = [x for s in scores for x in [s.lalp, s.galp, *s.step_scores]]
        reference = reference or flat
        diff = max(abs(a - b) for a, b in zip(flat, reference) if not (math.isnan(a) or math.isnan(b)))
        rows.append(dict(scorer="vcrd score_responses", dtype=dtype, threads=int(threads), wall_s=wall,
                         cpu_s=cpu, tokens_per_s=n_tokens / wall, max_abs_diff_vs_fp32=diff, load_at_start=load))
        print(rows[-1], flush=True)
    if args.naive:
        dtype, threads = args.naive.split(":")
        torch.set_num_threads(int(threads))
        load = os.getloadavg()[0]
        t0, c0 = time.perf_counter(), time.process_time()
        naive = [naive_score(model(dtype), tok, p, ss, window=args.window) for p, ss in zip(prompts, steps)]
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        flat = [x for lalp, galp, st in naive for x in [lalp, galp, *st]]
        diff = max(abs(a - b) for a, b in zip(flat, reference) if not (math.isnan(a) or math.isnan(b)))
        rows.append(dict(scorer="naive: one forward per window", dtype=dtype, threads=int(threads), wall_s=wall,
                         cpu_s=cpu, tokens_per_s=n_tokens / wall, max_abs_diff_vs_fp32=diff, load_at_start=load))
        print(rows[-1], flush=True)
    print("\n| scorer | dtype | threads | wall | CPU | response tokens/s (wall) | max |Δ| vs fp32 scorer "
          "| load at start |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['scorer']} | {r['dtype']} | {r['threads']} | {r['wall_s']:.1f} s | {r['cpu_s']:.1f} s | "
              f"{r['tokens_per_s']:.0f} | "
              f"{r['max_abs_diff_vs_fp32']:.1e} | {r['load_at_start']:.1f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(n_responses=len(responses), response_tokens=n_tokens, window_tokens=window_tokens,
                           rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
