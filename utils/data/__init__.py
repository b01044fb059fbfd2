"""Stage 1 of the pipeline: training data (toy images, pre-tokenized JSON Lines, ImageNet shards) and loaders."""
