"""Local naturalness (LALP) and global naturalness (GALP) of responses under a causal LM (SPEC §8).

A response is split into reasoning steps; step i is scored with only the prompt and the previous
``window`` steps in context: ``ℓ_i`` = mean log-prob of the step's ids (after dropping the first
``drop_first``), ``LALP = mean_i ℓ_i``. ``GALP`` = mean log-prob of all response ids with the full
context. Every piece (prompt, each step) is tokenised on its own, so a step has the same ids in
every context.

All windows of all responses (and the GALP sequences) are batched: sorted by length and grouped
into padded batches of at most ``token_budget`` tokens, one ``torch.inference_mode`` forward of the
decoder per batch (an attention mask keeps windows apart; each window's positions start at 0).
Log-probs of the scored ids come from the final hidden states and the LM head, ``chunk_rows`` rows
at a time (the Triton label log-prob kernel on CUDA), never a ``[tokens, V]`` log-softmax.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple, Union

import torch

Response = Union[str, Sequence[str]]


@dataclass
class ResponseScore:
    """Scores of one response: ``lalp``, ``galp`` (NaN when there is nothing to score),
    ``step_scores`` (``ℓ_i``, NaN for a step with no scored ids), ``n_steps``, ``n_tokens`` (response ids)."""

    lalp: float
    galp: float
    step_scores: List[float] = field(default_factory=list)
    n_steps: int = 0
    n_tokens: int = 0


def _sentences(text: str) -> List[str]:
    """Split after sentence ends (``.``, ``!``, ``?`` followed by whitespace), keeping the whitespace."""
    return [p for p in re.split(r"(?<=[.!?])(?=\s)", text) if p]


def split_steps(response: str, tokenizer, max_step_tokens: int = 256) -> List[str]:
    """SPEC §8 default splitter: on blank lines, each step keeping its trailing separator; a step
    longer than ``max_step_tokens`` ids is split further at sentence ends (greedily, sentences
    kept whole). Concatenating the steps gives back the response."""
    steps = [m for m in re.findall(r".*?(?:\n\s*\n|$)", response, flags=re.S) if m]
    out: List[str] = []
    for step in steps:
        if len(tokenizer(step, add_special_tokens=False)["input_ids"]) <= max_step_tokens:
            out.append(step)
            continue
        piece = ""
        for sentence in _sentences(step):
            if piece and len(tokenizer(piece + sentence, add_special_tokens=False)["input_ids"]) > max_step_tokens:
                out.append(piece)
                piece = ""
            piece += sentence
        out.append(piece)
    return out


def _ids(tokenizer, text: str) -> List[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def label_logprobs(hidden: torch.Tensor, head: torch.nn.Module, labels: torch.Tensor, chunk_rows: int = 1024
                   ) -> torch.Tensor:
    """``log softmax(head(hidden))[label]`` per row, fp32, ``chunk_rows`` rows of logits at a time."""
    out = torch.empty(labels.shape[0], dtype=torch.float32, device=hidden.device)
    bias = getattr(head, "bias", None)
    for r0 in range(0, labels.shape[0], chunk_rows):
        h = hidden[r0:r0 + chunk_rows].float()
        logits = h @ head.weight.float().T
        if bias is not None:
            logits = logits + bias.float()
        y = labels[r0:r0 + chunk_rows]
        if logits.is_cuda:
            from vcrd.kernels.label_logprob import label_logprob

            out[r0:r0 + chunk_rows] = label_logprob(logits, y)[1]
        else:
            out[r0:r0 + chunk_rows] = logits.gather(1, y[:, None]).squeeze(1) - torch.logsumexp(logits, -1)
    return out


@dataclass
class _Window:
    """One sequence to run: ``ids``, and the positions whose next-token log-prob is scored."""

    ids: List[int]
    scored_from: int  # ids[scored_from:] are scored (each predicted from everything before it)
    owner: Tuple[int, int]  # (response index, step index; -1 for the GALP sequence)


def _windows(prompt_ids: List[int], step_ids: List[List[int]], window: int, drop_first: int, r: int) -> List[_Window]:
    out = []
    for i, ids in enumerate(step_ids):
        context = prompt_ids + [t for s in step_ids[max(0, i - window):i] for t in s]
        if len(ids) > drop_first and context:
            out.append(_Window(context + ids, len(context) + drop_first, (r, i)))
    response = [t for s in step_ids for t in s]
    if response and prompt_ids:
        out.append(_Window(prompt_ids + response, len(prompt_ids), (r, -1)))
    return out


def _batches(windows: List[_Window], token_budget: int) -> List[List[_Window]]:
    """Length-sorted padded batches of at most ``token_budget`` tokens (a longer window runs alone)."""
    batches, current = [], []
    for w in sorted(windows, key=lambda w: len(w.ids)):
        if current and (len(current) + 1) * len(w.ids) > token_budget:
            batches.append(current)
            current = []
        current.append(w)
    if current:
        batches.append(current)
    return batches


def _decoder_and_head(model):
    config = getattr(model, "config", None)
    if getattr(config, "final_logit_softcapping", None):
        raise ValueError("model: final_logit_softcapping is not supported by the scorer (logits are taken straight "
                         "from the LM head)")
    head = model.get_output_embeddings()
    if head is None or not hasattr(head, "weight"):
        raise ValueError(f"model: expected a causal LM with an output embedding (LM head), got {type(model).__name__}")
    return model.get_decoder(), head


@torch.inference_mode()
def score_responses(
    model,
    tokenizer,
    prompts: Sequence[str],
    responses: Sequence[Response],
    *,
    window: int = 4,
    drop_first: int = 0,
    max_step_tokens: int = 256,
    token_budget: int = 8192,
    progress: bool = False,
) -> List[ResponseScore]:
    """LALP and GALP of each ``responses[j]`` to ``prompts[j]`` under ``model`` (SPEC §8).

    ``responses[j]`` is a string (split by :func:`split_steps`) or a list of steps. ``model`` is a
    Hugging Face causal LM, ``tokenizer`` its tokenizer (a BOS is put first when it has one).
    """
    if len(prompts) != len(responses):
        raise ValueError(f"responses: expected one per prompt ({len(prompts)}), got {len(responses)}")
    checks = (("window", window, 0), ("drop_first", drop_first, 0), ("max_step_tokens", max_step_tokens, 1),
              ("token_budget", token_budget, 1))
    for name, value, low in checks:
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name}: expected an int >= {low}, got {value!r}")
    decoder, head = _decoder_and_head(model)
    device = head.weight.device
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    all_steps, windows, n_tokens = [], [], []
    for r, (prompt, response) in enumerate(zip(prompts, responses)):
        if not isinstance(prompt, str):
            raise TypeError(f"prompts[{r}]: expected a string, got {type(prompt).__name__}")
        if isinstance(response, str):
            steps = split_steps(response, tokenizer, max_step_tokens)
        elif isinstance(response, (list, tuple)) and all(isinstance(s, str) for s in response):
            steps = list(response)
        else:
            raise TypeError(f"responses[{r}]: expected a string or a list of strings, got {type(response).__name__}")
        step_ids = [_ids(tokenizer, s) for s in steps]
        all_steps.append(step_ids)
        n_tokens.append(sum(len(s) for s in step_ids))
        windows += _windows(bos + _ids(tokenizer, prompt), step_ids, window, drop_first, r)

    sums = {}  # owner -> (sum of log-probs, count)
    batches = _batches(windows, token_budget)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=sum(len(w.ids) for w in windows), unit="tok", desc="scoring")
    for batch in batches:
        L = max(len(w.ids) for w in batch)
        ids = torch.full((len(batch), L), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), L), dtype=torch.long)
        for b, w in enumerate(batch):
            ids[b, :len(w.ids)] = torch.tensor(w.ids)
            mask[b, :len(w.ids)] = 1
        hidden = decoder(input_ids=ids.to(device), attention_mask=mask.to(device)).last_hidden_state
        rows, labels, owners = [], [], []
        for b, w in enumerate(batch):
            pos = torch.arange(w.scored_from, len(w.ids))
            rows.append(b * L + pos - 1)  # the hidden state before each scored id predicts it
            labels.append(torch.tensor(w.ids[w.scored_from:]))
            owners += [w.owner] * len(pos)
        lp = label_logprobs(hidden.reshape(-1, hidden.shape[-1])[torch.cat(rows).to(device)], head,
                            torch.cat(labels).to(device)).double().cpu()
        start = 0
        for w in batch:
            n = len(w.ids) - w.scored_from
            total, count = sums.get(w.owner, (0.0, 0))
            sums[w.owner] = (total + float(lp[start:start + n].sum()), count + n)
            start += n
        if bar is not None:
            bar.update(sum(len(w.ids) for w in batch))
    if bar is not None:
        bar.close()

    results = []
    for r, step_ids in enumerate(all_steps):
        step_scores = []
        for i in range(len(step_ids)):
            total, count = sums.get((r, i), (0.0, 0))
            step_scores.append(total / count if count else math.nan)
        scored = [x for x in step_scores if not math.isnan(x)]
        total, count = sums.get((r, -1), (0.0, 0))
        results.append(ResponseScore(
            lalp=sum(scored) / len(scored) if scored else math.nan,
            galp=total / count if count else math.nan,
            step_scores=step_scores, n_steps=len(step_ids), n_tokens=n_tokens[r]))
    return results


def naive_score(model, tokenizer, prompt: str, steps: List[str], window: int = 4, drop_first: int = 0
                ) -> Tuple[float, float, List[float]]:
    """The same scores with one plain forward per window (the test oracle): ``(lalp, galp, step_scores)``."""
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    prompt_ids = bos + _ids(tokenizer, prompt)
    step_ids = [_ids(tokenizer, s) for s in steps]

    def mean_logprob(context: List[int], ids: List[int]) -> Optional[float]:
        if not ids:
            return None
        full = torch.tensor([context + ids])
        with torch.inference_mode():
            logp = torch.log_softmax(model(input_ids=full).logits[0].double(), -1)
        pos = range(len(context), len(context) + len(ids))
        return sum(float(logp[p - 1, full[0, p]]) for p in pos) / len(ids)

    scores = []
    for i, ids in enumerate(step_ids):
        context = prompt_ids + [t for s in step_ids[max(0, i - window):i] for t in s] + ids[:drop_first]
        value = mean_logprob(context, ids[drop_first:])
        scores.append(math.nan if value is None else value)
    scored = [x for x in scores if not math.isnan(x)]
    galp = mean_logprob(prompt_ids, [t for s in step_ids for t in s])
    return (sum(scored) / len(scored) if scored else math.nan, math.nan if galp is None else galp, scores)
