"""Distributed losses (SPEC §11), above :mod:`vcrd.loss` and below :mod:`vcrd.train`.

:func:`vocab_parallel_vcrd_loss`: the VCRD loss of logits whose vocabulary is sharded over a process
group (tensor parallelism over the vocabulary), with one all-reduce of per-row statistics per chunk
of rows. :func:`fused_linear_vocab_parallel_vcrd_loss`: the same from replicated hidden states and
row-sharded LM heads (logits never stored). Data parallelism (DDP, FSDP2) needs no special loss: see
docs/distributed.md.
"""

from .fused_linear import fused_linear_vocab_parallel_vcrd_loss
from .vocab_parallel import vocab_parallel_vcrd_loss

__all__ = ["fused_linear_vocab_parallel_vcrd_loss", "vocab_parallel_vcrd_loss"]
