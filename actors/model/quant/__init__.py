"""Quantized weights: the block-scaled FP8 format (blocks) and the FP8 linear layers (linear)."""
