"""The model's position limit for scoring (SPEC §8): no sequence ever runs past ``max_position_embeddings``.

The longest sequence :func:`vcrd.select.naturalness.score_responses` runs for a response is its GALP
sequence: BOS (when the tokenizer has one), the prompt's ids, then every step's ids (each window is a
subsequence of it). A model with learned position embeddings (GPT-2) fails with an ``IndexError`` past
its limit, a rotary one (Llama) scores silently out of distribution; so a response whose sequence is
longer is refused, named, before any forward (in ``vcrd score`` before the model loads). A response
cannot be split without changing its GALP, whose context is the whole response.
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

from .steps import split_steps

Response = Union[str, Sequence[str]]
SHOW = 5  # offending responses named in a message


def model_positions(model_or_config) -> Optional[int]:
    """``max_position_embeddings`` of a model or its config (of the text part of a multimodal one), or
    ``None`` when it declares none (no limit is checked then)."""
    config = getattr(model_or_config, "config", model_or_config)
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()
    value = getattr(config, "max_position_embeddings", None)
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def sequence_lengths(tokenizer, prompts: Sequence[str], responses: Sequence[Response],
                     max_step_tokens: int) -> List[int]:
    """The length in ids of each response's longest scored sequence (BOS + prompt + every step), the steps
    split exactly as :func:`vcrd.select.naturalness.score_responses` splits them."""
    bos = 1 if getattr(tokenizer, "bos_token_id", None) is not None else 0
    texts, owners = [], []
    for r, (prompt, response) in enumerate(zip(prompts, responses)):
        steps = split_steps(response, tokenizer, max_step_tokens) if isinstance(response, str) else list(response)
        texts += [prompt, *steps]
        owners += [r] * (1 + len(steps))
    lengths = [bos] * len(prompts)
    if texts:
        for r, ids in zip(owners, tokenizer(texts, add_special_tokens=False)["input_ids"]):
            lengths[r] += len(ids)
    return lengths


def check_lengths(lengths: Sequence[int], positions: Optional[int], names: Sequence[str], hint: str = "") -> None:
    """``ValueError`` naming the first responses (``names[r]``: ``FILE:LINE`` or ``responses[r]``) whose
    ``lengths[r]`` exceeds ``positions`` (``None``: no limit)."""
    if positions is None:
        return
    long = [(names[r], n) for r, n in enumerate(lengths) if n > positions]
    if long:
        shown = "; ".join(f"{w} ({n} ids)" for w, n in long[:SHOW])
        more = f" and {len(long) - SHOW} more" if len(long) > SHOW else ""
        raise ValueError(f"{len(long)} response(s) would be scored past the model's max_position_embeddings="
                         f"{positions} (BOS + prompt + every step; GALP needs the whole response in context): "
                         f"{shown}{more}. Shorten or drop them{hint}")


def score_positions(model_dir: Union[str, Path], max_step_tokens: int,
                    max_prompt_tokens: Optional[int]) -> Optional[int]:
    """The model folder's ``max_position_embeddings`` (``None`` if it declares none), after refusing
    ``--max-step-tokens`` / ``--max-prompt-tokens`` that leave no room within it."""
    from transformers import AutoConfig

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


def prompt_cap(positions: Optional[int], max_step_tokens: int, max_prompt_tokens: Optional[int]) -> Tuple[int, str]:
    """The longest prompt in ids (BOS included) and where that cap comes from: ``max_prompt_tokens``, else the
    model's ``positions - max_step_tokens``, else 2048."""
    if max_prompt_tokens is None:
        if positions is None:
            return 2048, "the default"
        return positions - max_step_tokens, f"the default: the model's max_position_embeddings {positions} minus " \
                                            f"--max-step-tokens {max_step_tokens}"
    if max_prompt_tokens < 1:
        raise ValueError(f"--max-prompt-tokens must be >= 1, got {max_prompt_tokens}")
    return max_prompt_tokens, "--max-prompt-tokens"


def check_prompt_lengths(tokenizer, prompts: Sequence[str], names: Sequence[str], cap: int, origin: str) -> None:
    """``ValueError`` naming the first prompts (``names[r]``) longer than ``cap`` ids (BOS included)."""
    bos = 1 if getattr(tokenizer, "bos_token_id", None) is not None else 0
    lengths = [bos + len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts]
    long = [(w, n) for w, n in zip(names, lengths) if n > cap]
    if long:
        shown = "; ".join(f"{w} ({n} tokens)" for w, n in long[:SHOW])
        more = f" and {len(long) - SHOW} more" if len(long) > SHOW else ""
        raise ValueError(f"{len(long)} prompt(s) longer than the cap of {cap} tokens ({origin}): {shown}{more}. "
                         f"Shorten or drop them, or raise --max-prompt-tokens (within the model's position limit)")


__all__ = ["check_lengths", "check_prompt_lengths", "model_positions", "prompt_cap", "score_positions",
           "sequence_lengths"]
