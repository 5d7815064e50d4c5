"""Conversion between PyTorch checkpoints of the official code and Flax variables."""
