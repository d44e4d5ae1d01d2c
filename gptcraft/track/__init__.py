"""What a run reports: log.jsonl, the console, wandb, and loss plots."""
