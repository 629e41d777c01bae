"""Training: sparse-aware optimizers, the training loop, checkpoints and offline metrics."""
