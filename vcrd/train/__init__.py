"""Training: ``distill_loss`` for any loop, ``VCRDTrainer`` (transformers), the collator and jsonl
format (``data``), and ``vcrd train --config`` (``run``)."""
