"""Stage 3: the 50k-sample run for evaluation (class plan, per-batch seeds, shards, the .npz)."""
