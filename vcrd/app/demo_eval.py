"""The demo's evaluation: solutions written by a model (batched, left-padded, greedy or sampled), their style,
and held-out exact-match accuracy."""

from __future__ import annotations

import re
from typing import Dict, List, Sequence

import torch

from .demo_settings import DemoSettings
from .synthetic import Problem, check_answer


@torch.inference_mode()
def generate(model, tok, prompts: Sequence[str], *, sample: bool, seed: int, max_new_tokens: int, batch: int,
             temperature: float = 1.0) -> List[str]:
    """Solutions written by ``model`` for each prompt: batched, left-padded, with the KV cache;
    greedy, or sampled at ``temperature``."""
    model.eval()
    torch.manual_seed(seed)
    out: List[str] = []
    for i in range(0, len(prompts), batch):
        enc = [[tok.bos_token_id] + tok(p, add_special_tokens=False)["input_ids"] for p in prompts[i:i + batch]]
        L = max(map(len, enc))
        ids = torch.full((len(enc), L), tok.pad_token_id)
        mask = torch.zeros((len(enc), L), dtype=torch.long)
        for b, e in enumerate(enc):  # left padding, so every prompt ends where generation starts
            ids[b, L - len(e):] = torch.tensor(e)
            mask[b, L - len(e):] = 1
        gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=sample,
                             temperature=temperature if sample else None, top_k=None, top_p=None,
                             pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, use_cache=True)
        out += [tok.decode(g[L:], skip_special_tokens=True) for g in gen]
    return out


def style_of(text: str) -> str:
    """``verbose`` when the solution is written in sentences ("..., so 3+4=7."), else ``terse``."""
    return "verbose" if re.search(r"\bso\b|\bleft\b", text) else "terse"


def evaluate(model, tok, problems: Sequence[Problem], s: DemoSettings) -> Dict[str, float]:
    """Greedy exact-match accuracy on ``problems``, and the share of verbose answers."""
    answers = generate(model, tok, [p.question for p in problems], sample=False, seed=s.seed,
                       max_new_tokens=s.max_new_tokens, batch=s.eval_batch)
    right = [check_answer(a, p.answer) for a, p in zip(answers, problems)]
    return {"accuracy": sum(right) / len(problems),
            "verbose_share": sum(style_of(a) == "verbose" for a in answers) / len(problems)}


__all__ = ["evaluate", "generate", "style_of"]
