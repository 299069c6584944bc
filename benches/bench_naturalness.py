"""Packed LALP scorer vs one plain forward per window (same tiny model, same scores).

    python benches/bench_naturalness.py            # prints a markdown table; numbers go into docs/benchmarks.md

A randomly initialised Llama-style model (4 layers, hidden 256) with a 32000-entry vocabulary,
as small students have (the LM head then dominates their compute; the built-in character
tokenizer uses the first 100 ids), 32 responses × 12 steps × ~30 tokens, window 4. Both scorers
run the same windows through the same model: the packed scorer batches them and computes logits
only at the scored positions, the naive loop runs one forward per window over full logits.
``--vocab 100`` shows the case where the LM head costs nothing. Times are medians of 3 runs.
"""

from __future__ import annotations

import random
import statistics
import time

import torch


def data(n_responses: int = 32, n_steps: int = 12, seed: int = 0):
    rng = random.Random(seed)
    prompts, responses = [], []
    for r in range(n_responses):
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        prompts.append(f"Q{r}: what is {a}*{b}+{n_steps}?")
        steps = [f"Step {i}: add {rng.randint(10, 99)} to get {rng.randint(100, 999)}.\n\n" for i in range(n_steps)]
        responses.append(steps)
    return prompts, responses


def median_time(fn, repeats: int = 3):
    out, times = None, []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def main() -> None:
    import argparse

    from transformers import LlamaConfig, LlamaForCausalLM

    from vcrd.app.tokenizer import build_char_tokenizer
    from vcrd.select.naturalness import naive_score, score_responses

    parser = argparse.ArgumentParser(description="Packed LALP scorer vs one forward per window.")
    parser.add_argument("--vocab", type=int, default=32000, help="model vocabulary (>= 100; default 32000)")
    vocab = max(parser.parse_args().vocab, 100)
    torch.manual_seed(0)
    tok = build_char_tokenizer()
    model = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=256, intermediate_size=688,
                                         num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
                                         max_position_embeddings=2048)).eval()
    prompts, responses = data()
    n_tokens = sum(len(tok(s, add_special_tokens=False)["input_ids"]) for r in responses for s in r)
    t_packed, packed = median_time(lambda: score_responses(model, tok, prompts, responses, window=4))
    t_naive, naive = median_time(lambda: [naive_score(model, tok, p, r, 4) for p, r in zip(prompts, responses)])
    diff = max(max(abs(a.lalp - b[0]), abs(a.galp - b[1])) for a, b in zip(packed, naive))
    print(f"{len(prompts)} responses × {len(responses[0])} steps, {n_tokens} response tokens, window 4, "
          f"vocabulary {vocab}, {torch.get_num_threads()} threads\n")
    print("| scorer | median time (s) | speed-up | max |Δ LALP/GALP| vs naive |")
    print("|---|---|---|---|")
    print(f"| naive: one forward per window | {t_naive:.2f} | 1.00× | – |")
    print(f"| vcrd packed (`score_responses`) | {t_packed:.2f} | {t_naive / t_packed:.2f}× | {diff:.1e} |")


if __name__ == "__main__":
    main()
