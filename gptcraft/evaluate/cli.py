"""Loss and perplexity of a model on a prepared dataset split or on a plain text file.

gptcraft eval --out_dir=out-shakespeare-char-cpu --dataset=shakespeare_char
gptcraft eval --init_from=gpt2 --text=some.txt
gptcraft eval --init_from=gpt2 --dataset=openwebtext --max_tokens=1000000

Every token is scored once: the tokens are cut into non-overlapping windows of block_size
(evaluate/loss.py). Perplexity is exp(mean cross-entropy per token), in the model's own tokens.
"""

import math
import os
import sys
from dataclasses import dataclass

import numpy as np

from gptcraft.config import ConfigError, option, parse_config, run_cli
from gptcraft.data.shards import TokenFileError, open_dataset
from gptcraft.evaluate.loss import split_loss
from gptcraft.load import ModelOptions
from gptcraft.system.distributed import Dist


@dataclass
class EvaluateConfig(ModelOptions):
    dataset: str = option("", "prepared dataset to score, read from data_dir/dataset/")
    data_dir: str = option("data", "directory that holds the prepared datasets")
    split: str = option("val", "which split of the dataset", ("train", "val"))
    text: str = option("", "a plain text file to score instead of a dataset (tokenized with the model's tokenizer)")
    max_tokens: int = option(0, "score only the first this many tokens; 0 scores all")
    batch_size: int = option(8, "windows per forward pass")

    def __post_init__(self):
        super().__post_init__()
        if bool(self.dataset) == bool(self.text):
            raise ConfigError("give exactly one of --dataset=NAME (a prepared dataset) or --text=FILE")
        if self.max_tokens < 0 or self.batch_size <= 0:
            raise ConfigError("max_tokens must be >= 0 and batch_size positive")


def read_tokens(cfg, tok):
    """The token ids to score, as a list of 1-D arrays (a dataset split's shards), and a name for them."""
    if cfg.text:
        try:
            with open(cfg.text, encoding="utf-8") as f:
                text = f.read()
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"cannot read text file {cfg.text}: {getattr(e, 'strerror', None) or e}") from None
        try:
            return [np.array(tok.encode(text), dtype=np.int64)], cfg.text
        except ValueError as e:
            raise ConfigError(f"{cfg.text}: {e}") from None
    try:
        dataset = open_dataset(os.path.join(cfg.data_dir, cfg.dataset))
    except (OSError, TokenFileError) as e:
        raise ConfigError(str(e)) from None
    return [f.memmap() for f in dataset.splits[cfg.split]], f"{cfg.dataset} {cfg.split}"


def first_tokens(pieces, n):
    """The first n tokens of a list of arrays, still as a list of arrays."""
    kept = []
    for piece in pieces:
        if n <= 0:
            break
        kept.append(piece[:n])
        n -= len(kept[-1])
    return kept


def main(argv=None):
    cfg = parse_config(EvaluateConfig, sys.argv[1:] if argv is None else argv, prog="gptcraft eval")
    model, tok, device, dtype = cfg.load()
    pieces, name = read_tokens(cfg, tok)
    if cfg.max_tokens:
        pieces = first_tokens(pieces, cfg.max_tokens)
    pieces = [p for p in pieces if len(p) >= 2]  # a piece of one token has nothing to predict
    if not pieces:
        raise ConfigError(f"{name} holds too few tokens: at least 2 are needed to score one")
    top = max(int(p.max()) for p in pieces)
    if top >= model.config.vocab_size:
        raise ConfigError(f"{name} holds token id {top}, beyond the model's vocabulary "
                          f"of {model.config.vocab_size}: it was tokenized for another model")  # fmt: skip
    # Each shard is scored on its own (windows do not cross files); the mean is over all targets.
    loss = split_loss(model, pieces, model.config.block_size, cfg.batch_size, device, dtype, Dist())
    n_targets = sum(len(p) - 1 for p in pieces)
    print(f"{name}: loss {loss:.4f}, perplexity {math.exp(loss):.3f} over {n_targets:,} tokens")
    return loss


if __name__ == "__main__":
    run_cli(main)
