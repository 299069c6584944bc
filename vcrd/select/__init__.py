"""Choosing teacher data by local naturalness: LALP/GALP scoring with a causal LM (``naturalness``),
response and teacher selection (``selection``)."""
