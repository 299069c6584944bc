"""``vcrd score``: score every response of a jsonl file by LALP/GALP with a local causal LM (SPEC §8),
write the best-LALP response per prompt and print a per-teacher summary.

Every check that needs no model (the device, the output path, every data line, the prompt cap, every
response's length against the model's position limit) is made before the model loads. Under
``torchrun`` each rank scores its share of the responses; rank 0 writes the output.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence

import torch

from ..distributed.ranks import init_from_launcher, launch_info
from ..distributed.scoring import score_responses_sharded
from ..select.limits import check_lengths, check_prompt_lengths, prompt_cap, score_positions, sequence_lengths
from ..select.model_io import DTYPES
from ..select.naturalness import ResponseScore
from ..select.selection import rank_teachers, select_responses
from .data import Example, finite_or_none, read_jsonl, write_jsonl
from .devices import check_device
from .files import check_output_file, check_writable
from .model_files import check_model_folder


@dataclass
class ScoreSettings:
    """The ``vcrd score`` options: the model folder, the input and output jsonl, and the scorer's settings
    (:func:`vcrd.select.naturalness.score_responses`)."""

    model: str
    data: str
    out: str
    window: int = 4
    drop_first: int = 0
    max_step_tokens: int = 256
    token_budget: int = 8192
    max_prompt_tokens: Optional[int] = None
    device: str = "cpu"
    dtype: str = "float32"
    threads: int = 0


def load_examples(s: ScoreSettings) -> List[Example]:
    """The device, the output path and every data line checked (before any model loads); the examples."""
    check_device(s.device)  # a missing GPU named now, not as a traceback after the scoring started
    out = check_output_file(s.out, [s.data])  # not a folder, a device or the input itself
    check_writable(out.parent, "--out")  # before any scoring
    examples = read_jsonl(s.data)  # every line checked before the model loads
    if not examples:
        raise ValueError(f"data: {s.data} holds no examples")
    return examples


def load_tokenizer(s: ScoreSettings, examples: Sequence[Example]):
    """The model folder checked and its tokenizer, after refusing any prompt or response that does not fit
    the model's position limit (before the model's weights load)."""
    from transformers import AutoTokenizer

    model_dir = Path(s.model)
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"--model: expected a local Hugging Face model folder with config.json, "
                                f"got {str(model_dir)!r}")
    check_model_folder(model_dir, "--model")
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    positions = score_positions(model_dir, s.max_step_tokens, s.max_prompt_tokens)  # refuses caps past the limit
    names = [e.where or f"example {i}" for i, e in enumerate(examples)]
    prompts = [e.prompt for e in examples]
    check_prompt_lengths(tokenizer, prompts, names, *prompt_cap(positions, s.max_step_tokens, s.max_prompt_tokens))
    lengths = sequence_lengths(tokenizer, prompts, [e.steps if e.steps is not None else e.response for e in examples],
                               s.max_step_tokens)
    check_lengths(lengths, positions, names)  # whole responses, before the weights load
    return tokenizer


def print_summary(examples: Sequence[Example], scores: Sequence[ResponseScore], chosen: Sequence[int],
                  s: ScoreSettings) -> None:
    """What was scored and written, the responses without a finite score, and the per-teacher ranking."""
    prompts = [e.prompt for e in examples]
    print(f"\n{len(examples)} responses to {len(chosen)} prompts scored (window {s.window}); "
          f"wrote the best-LALP response per prompt to {s.out}\n")
    unscored = [i for i, sc in enumerate(scores) if not (math.isfinite(sc.lalp) and math.isfinite(sc.galp))]
    if unscored:
        written = len(set(unscored) & set(chosen))
        print(f"{len(unscored)} response(s) have no finite score (NaN: e.g. an empty response or nothing scored); "
              f"{written} of them written with null scores (a prompt with no finite-scored response)\n")
    print(f"{'teacher':<20} {'responses':>9} {'mean LALP':>10} {'mean GALP':>10} {'win rate':>9}")
    for r in rank_teachers(prompts, [e.teacher for e in examples], scores):
        print(f"{r.teacher:<20} {r.n_responses:>9} {r.mean_lalp:>10.4f} {r.mean_galp:>10.4f} {r.win_rate:>9.2%}")


def score_file(s: ScoreSettings) -> None:
    """Check, load, score (each rank its share under ``torchrun``), and on rank 0 write the best-LALP response
    per prompt with its ``lalp``, ``galp`` and ``step_scores`` to ``s.out`` and print the summary."""
    from transformers import AutoModelForCausalLM

    examples = load_examples(s)
    tokenizer = load_tokenizer(s, examples)
    rank, world, local = launch_info()
    init_from_launcher()
    device = f"cuda:{local}" if world > 1 and s.device == "cuda" else s.device
    if s.threads:
        torch.set_num_threads(s.threads)  # the scorer runs one group per thread (vcrd/select/threads.py)
    model = AutoModelForCausalLM.from_pretrained(s.model, local_files_only=True, dtype=DTYPES[s.dtype])
    model = model.to(device).eval()
    prompts = [e.prompt for e in examples]
    responses = [e.steps if e.steps is not None else e.response for e in examples]
    scores = score_responses_sharded(model, tokenizer, prompts, responses, window=s.window,
                                     drop_first=s.drop_first, max_step_tokens=s.max_step_tokens,
                                     token_budget=s.token_budget, progress=rank == 0, dtype=s.dtype)
    if rank != 0:
        return
    chosen = select_responses(prompts, scores)
    write_jsonl(s.out, (finite_or_none({**examples[i].to_json(), "lalp": scores[i].lalp, "galp": scores[i].galp,
                                        "step_scores": scores[i].step_scores}) for i in chosen))
    print_summary(examples, scores, chosen, s)


__all__ = ["ScoreSettings", "score_file"]
