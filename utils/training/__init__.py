"""Stage 2: one training step, the optimizer and schedule, EMA, checkpoints and resume, metrics and trackers."""
