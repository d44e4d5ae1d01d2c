"""Losses over whole splits, and the `gptcraft eval` command."""
