"""Logits anywhere in fp32's range: differences and vocabulary sums that cannot overflow.

Two fp32 logits up to ±3.4·10³⁸ have a difference up to 6.8·10³⁸ (``x - max x``, ``x_s - x_u``),
and V terms of a sum over the vocabulary can exceed the range even when their weighted mean does
not. Every difference that is weighted or summed is therefore taken on logits times
``c = overflow_scale(V)``, a power of two with ``2·V·c <= 1``: ``(a·c - b·c)/T`` is exactly
``c·(a - b)/T`` rounded (powers of two commute with rounding, subnormals aside), finite for
``T >= 1``, and a sum of at most V such terms with weights ``<= 1`` stays below fp32's maximum.
The result is multiplied by ``1/c`` once, after dividing by ``Σe``: it overflows to ``inf``
exactly when the true value is not representable in fp32. On ordinary logits nothing changes
beyond the last bit of terms below ``1.2·10⁻³⁸/c`` in magnitude (docs/numerics.md).
"""

from __future__ import annotations


def overflow_scale(vocab: int) -> float:
    """``c = 2^-(ceil(log2 V) + 1)``: the largest power of two with ``2·V·c <= 1``."""
    return 2.0 ** -((max(vocab, 1) - 1).bit_length() + 1)
