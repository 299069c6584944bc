"""One group of responses scored (the unit of work of :func:`vcrd.select.naturalness.score_responses`): its
prompt caches, its batches, their forwards and the scored ids' log-probs, summed per owner (SPEC §8)."""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch

from .packed_forward import packed_forward_supported
from .prefix_caches import PrefixCaches, prompt_sharing_supported
from .scoring_forward import decoder_and_head, label_logprobs, run_padded, run_unpadded, run_varlen, varlen_available
from .scoring_plan import Owner, ScoredSequence, packed_batches, padded_batches, wanted_positions

# On CPU the unpadded path runs at most this many tokens per forward: GEMMs of a few hundred rows
# already run at full speed, the elementwise work between them (norms, RoPE, SiLU) stays in cache, and
# the tensors stay small enough for the C allocator to reuse their memory instead of mapping (and
# page-faulting in) fresh memory on every call (the benchmark's vocabulary-300 case, 1 thread, under
# load: 512 tokens per batch took ~0.85x the CPU time of 2048, 1 thousand page faults per call instead
# of 200 thousand).
CPU_BATCH_TOKENS = 512
# ... and computes the LM head's logits this many rows at a time (8664 rows, V = 32000, 1 thread,
# under load: 2.5 s with 256-row chunks, 3.7 s with 1024, whose 131 MB logits are mapped afresh each time).
CPU_HEAD_ROWS = 256

Sums = Dict[Owner, Tuple[float, int]]  # owner -> (sum of the scored ids' log-probs, their count)


@dataclass
class GroupScorer:
    """The forward path of one scoring call, chosen once for the model: flash-attn ``varlen`` packing, the
    ``unpadded`` :func:`packed_forward`, or Hugging Face's padded forward (with ``share``: prompt KV caches
    reused); batches of at most ``token_budget`` padded tokens (``flat_budget``: suffix tokens, CPU's unpadded
    path); the LM head's ``weight`` and ``bias`` cast to fp32 once."""

    decoder: torch.nn.Module
    head: torch.nn.Module
    device: torch.device
    pad: int
    token_budget: int
    varlen: bool
    share: bool
    unpadded: bool
    flat_budget: Optional[int]
    weight: torch.Tensor
    bias: Optional[torch.Tensor]

    @classmethod
    def for_model(cls, model, pad: int, token_budget: int) -> GroupScorer:
        """The path ``model`` supports (``ValueError`` for a model whose logits are not its head's own)."""
        decoder, head = decoder_and_head(model)
        device = head.weight.device
        varlen = varlen_available(model, device)
        unpadded = not varlen and packed_forward_supported(model)
        bias = getattr(head, "bias", None)
        return cls(decoder, head, device, pad, token_budget, varlen, not varlen and prompt_sharing_supported(model),
                   unpadded, min(token_budget, CPU_BATCH_TOKENS) if unpadded and device.type == "cpu" else None,
                   head.weight.float(), None if bias is None else bias.float())

    @property
    def batch_budget(self) -> int:
        """Tokens per batch: ``flat_budget`` where it applies, else ``token_budget``."""
        return self.flat_budget or self.token_budget

    def hidden(self, batch: List[ScoredSequence], wanted: List[List[int]], caches: Optional[PrefixCaches]
               ) -> torch.Tensor:
        """Final hidden states ``[rows, H]`` at the ``wanted`` positions of each sequence of ``batch``, in order."""
        if self.unpadded:
            return run_unpadded(self.decoder, batch, wanted, caches)
        hidden = (run_varlen(self.decoder, batch, self.device) if self.varlen
                  else run_padded(self.decoder, batch, caches, self.device, self.pad))
        L = hidden.shape[1]
        rows = torch.tensor([b * L + p for b, ps in enumerate(wanted) for p in ps], dtype=torch.long)
        return hidden.reshape(-1, hidden.shape[-1])[rows.to(self.device)]

    def score(self, items: List[ScoredSequence]) -> Sums:
        """``owner -> (sum of log-probs, count)`` for one group's sequences: its prompt caches, its batches,
        their log-probs."""
        caches = None
        if self.share and any(it.prefix_key for it in items):
            caches = PrefixCaches(self.decoder, [it.prefix_key for it in items], self.batch_budget, self.device,
                                  self.pad, self.unpadded)
        batches = (packed_batches(items, self.token_budget) if self.varlen
                   else padded_batches(items, self.token_budget, self.flat_budget))
        sums: Sums = {}
        for batch in batches:
            wanted = [wanted_positions(it) for it in batch]
            hidden = self.hidden(batch, wanted, caches)
            labels = torch.tensor([it.ids[p + 1] for it, ps in zip(batch, wanted) for p in ps], dtype=torch.long)
            lp = label_logprobs(hidden, self.head, labels.to(self.device),
                                CPU_HEAD_ROWS if self.device.type == "cpu" else 1024,
                                weight=self.weight, bias=self.bias).double().cpu()
            offset = 0
            for it, ps in zip(batch, wanted):
                for start, stop, owner in it.spans:
                    i = offset + bisect.bisect_left(ps, start - 1)
                    total, count = sums.get(owner, (0.0, 0))
                    sums[owner] = (total + float(lp[i:i + stop - start].sum()), count + stop - start)
                offset += len(ps)
        return sums


__all__ = ["CPU_BATCH_TOKENS", "CPU_HEAD_ROWS", "GroupScorer", "Sums"]
