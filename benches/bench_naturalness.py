"""Packed LALP scorer vs one plain forward per window (same tiny model, same scores).

    .venv/bin/python benches/bench_naturalness.py                    # the full table for docs/benchmarks.md
    .venv/bin/python benches/bench_naturalness.py --vocab 300 --prompt 16 --repeats 3 --threads 1 2
    .venv/bin/python benches/bench_naturalness.py --vocab 300 --prompt 16 --repeats 1 --threads 1 --profile

A randomly initialised Llama-style model (4 layers, hidden 256, 4 heads) and a byte-pair tokenizer
with a 300-entry vocabulary trained here (``tokenizers``, no download) on text like the data; the
model's vocabulary is 300 (the LM head costs almost nothing: only the transformer work and its
batching count) or 32000 (as small students have: the head dominates a naive loop, which computes
logits everywhere). 32 responses × 12 steps, window 4, prompts of about 16 / 128 / 512 tokens.

Both scorers run in the same process, interleaved (for each repeat and each thread count: naive,
then packed), so a machine shared with other jobs slows both alike; the table gives per thread count
the median wall time and the median CPU time (``time.process_time``: all threads of this process) of
each, the largest |Δ| over LALP, GALP and every step score (checked in every run), and the ratio of
the decoder layers' GEMM work (multiply-adds of every ``nn.Linear`` inside the decoder, counted once
per scorer with forward hooks: independent of the load; the LM head is left out of that count).
"""

from __future__ import annotations

import random
import statistics
import time
from typing import List

import torch

WORDS = ("the a train car goes runs km miles hours speed total sum of each and then add take away what "
         "is left more less times twice half number answer question first second next last value price "
         "apples books pages weeks days people").split()


def data(n_responses: int = 32, n_steps: int = 12, prompt_words: int = 4, seed: int = 0):
    rng = random.Random(seed)
    prompts, responses = [], []
    for r in range(n_responses):
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        context = " ".join(rng.choice(WORDS) for _ in range(prompt_words))
        prompts.append(f"Q{r}: {context} what is {a}*{b}+{n_steps}?")
        steps = [f"Step {i}: add {rng.randint(10, 99)} to get {rng.randint(100, 999)}.\n\n" for i in range(n_steps)]
        responses.append(steps)
    return prompts, responses


def bpe_tokenizer(vocab_size: int = 300):
    """A byte-level BPE tokenizer with ``vocab_size`` entries (BOS ``<s>``, pad ``<pad>``), trained locally."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    prompts, responses = data(200, 12, 40, seed=123)
    core.train_from_iterator(prompts + ["".join(r) for r in responses], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def prompt_words_for(tok, target: int) -> int:
    """The number of filler words that makes the prompts about ``target`` tokens long (BOS included)."""
    lo, hi = 0, 4 * target
    while lo < hi:
        mid = (lo + hi) // 2
        n = statistics.mean(1 + len(tok(p, add_special_tokens=False)["input_ids"]) for p in data(8, 1, mid)[0])
        lo, hi = (mid + 1, hi) if n < target else (lo, mid)
    return lo


def decoder_macs(model, fn) -> int:
    """Multiply-adds of every ``nn.Linear`` inside the decoder during ``fn()`` (forward hooks)."""
    total = [0]

    def count(module, args, output):
        total[0] += args[0].numel() // args[0].shape[-1] * module.in_features * module.out_features

    handles = [m.register_forward_hook(count) for m in model.get_decoder().modules() if isinstance(m, torch.nn.Linear)]
    try:
        fn()
    finally:
        for handle in handles:
            handle.remove()
    return total[0]


def run(vocab: int, prompt_tokens: int, repeats: int, tok, thread_counts, profile: bool = False) -> List[str]:
    from transformers import LlamaConfig, LlamaForCausalLM

    from vcrd.select.naturalness import naive_score, score_responses

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=max(vocab, len(tok)), hidden_size=256, intermediate_size=688,
                                         num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
                                         max_position_embeddings=2048, bos_token_id=tok.bos_token_id,
                                         pad_token_id=tok.pad_token_id)).eval()
    prompts, responses = data(prompt_words=prompt_words_for(tok, prompt_tokens) if prompt_tokens > 16 else 0)
    p_len = statistics.mean(1 + len(tok(p, add_special_tokens=False)["input_ids"]) for p in prompts)

    def packed():
        return score_responses(model, tok, prompts, responses, window=4)

    def naive():
        return [naive_score(model, tok, p, r, 4) for p, r in zip(prompts, responses)]

    def max_delta(got, want) -> float:
        diff = 0.0
        for a, (lalp, galp, steps) in zip(got, want):
            assert len(a.step_scores) == len(steps)
            diff = max([diff, abs(a.lalp - lalp), abs(a.galp - galp)] +
                       [abs(x - y) for x, y in zip(a.step_scores, steps)])
        return diff

    torch.set_num_threads(thread_counts[0])
    macs = decoder_macs(model, naive) / decoder_macs(model, packed)  # also the warm-up of both
    if profile:
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as torch_profile

        for name, fn in (("naive", naive), ("packed", packed)):
            with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
                fn()
            print(f"{name}, vocabulary {vocab}, prompts of {p_len:.0f} ids, {thread_counts[0]} thread(s):")
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))
    times = {(n, name): ([], []) for n in thread_counts for name in ("naive", "packed")}
    diff = 0.0
    for _ in range(repeats):
        for n in thread_counts:
            torch.set_num_threads(n)
            outs = {}
            for name, fn in (("naive", naive), ("packed", packed)):
                w0, c0 = time.perf_counter(), time.process_time()
                outs[name] = fn()
                times[n, name][0].append(time.perf_counter() - w0)
                times[n, name][1].append(time.process_time() - c0)
            diff = max(diff, max_delta(outs["packed"], outs["naive"]))
    rows = []
    for n in thread_counts:
        wn, cn = (statistics.median(t) for t in times[n, "naive"])
        wp, cp = (statistics.median(t) for t in times[n, "packed"])
        rows.append(f"| {vocab} | {p_len:.0f} | {n} | {wn:.2f} | {wp:.2f} | **{wn / wp:.2f}×** | {cn:.2f} | {cp:.2f} | "
                    f"**{cn / cp:.2f}×** | {macs:.2f}× | {diff:.1e} |")
    return rows


def main() -> None:
    import argparse
    import os
    import platform

    parser = argparse.ArgumentParser(description="Packed LALP scorer vs one forward per window.")
    parser.add_argument("--vocab", type=int, nargs="*", default=[300, 32000], help="model vocabularies")
    parser.add_argument("--prompt", type=int, nargs="*", default=[16, 128, 512], help="prompt lengths (tokens)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each scorer (interleaved)")
    parser.add_argument("--threads", type=int, nargs="*", default=[1, 2], help="torch thread counts (interleaved)")
    parser.add_argument("--profile", action="store_true", help="print where each scorer's CPU time goes "
                        "(torch.profiler, one untimed run each, first thread count)")
    args = parser.parse_args()
    tok = bpe_tokenizer(300)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"32 responses × 12 steps, window 4, 4 layers × 256, BPE tokenizer of {len(tok)} "
          f"ids; torch {torch.__version__}, {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"load average {load:.1f} at start; median of {args.repeats} interleaved runs\n")
    print("| vocab | prompt ids | threads | naive wall (s) | packed wall (s) | wall speed-up | naive CPU (s) | "
          "packed CPU (s) | CPU speed-up | decoder GEMM work naive / packed | max \\|Δ\\| |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for vocab in args.vocab:
        for p in args.prompt:
            print("\n".join(run(vocab, p, args.repeats, tok, args.threads, args.profile)), flush=True)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"\nload average {load:.1f} at the end")


if __name__ == "__main__":
    main()
