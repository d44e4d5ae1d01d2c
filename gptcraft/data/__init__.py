"""Tokenizers, the token shard format with its meta.json, batch sampling and downloads."""
