"""Training: settings (config, optimizer_settings: TensorFlow-free), the trainer core both loops drive
(core, checkpoints, holdout), the single-process loop (loop) and the parameter-server loop (distributed,
cluster), sparse-aware optimizers, offline metrics and evaluation."""
