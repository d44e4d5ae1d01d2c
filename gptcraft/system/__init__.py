"""Where a run executes: device and precision, torch.distributed."""
