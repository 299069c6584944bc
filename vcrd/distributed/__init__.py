"""Distributed losses (SPEC §11), above :mod:`vcrd.loss` and below :mod:`vcrd.train`.

:func:`vocab_parallel_vcrd_loss`: the VCRD loss of logits whose vocabulary is sharded over a process
group (tensor parallelism over the vocabulary), with one all-reduce of per-row statistics per chunk
of rows. Data parallelism (DDP, FSDP2) needs no special loss: see docs/distributed.md.
"""

from .vocab_parallel import vocab_parallel_vcrd_loss

__all__ = ["vocab_parallel_vcrd_loss"]
