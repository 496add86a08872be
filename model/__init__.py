"""Tessera model package: plain PyTorch models, data, training, checkpoints and metrics (no Label Studio)."""
