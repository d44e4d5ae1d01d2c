"""The training loop and its concerns: configuration, parallelism, optimizer, checkpoints, stops."""
