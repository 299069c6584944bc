"""The math every path shares: options and presets, input checks and the row view, causal windows,
weights, the reduction, statistics, settings, and the float64 reference (SPEC.md in plain PyTorch)."""
