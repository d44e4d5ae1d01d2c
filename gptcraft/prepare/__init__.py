"""Dataset recipes: each writes token shards and meta.json into a data folder."""
