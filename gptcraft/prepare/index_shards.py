"""Describe a folder of llm.c / NanoGPT-speedrun shards (their FineWeb .bin files) with a meta.json.

python prepare/index_shards.py --dir data/fineweb10B

The shards stay as they are. Files whose names hold `train` or `val` (fineweb_train_000001.bin,
fineweb_val_000000.bin) form the splits, in name order. Each header is checked, each file
hashed and scanned for its largest token id, which must lie in GPT-2's vocabulary.

A folder that nanoGPT prepared (headerless uint16 train.bin and val.bin, maybe meta.pkl) gets a
meta.json naming its vocabulary (meta.pkl's characters, else GPT-2 BPE); train.py reads such a
folder without one too.
"""

import argparse
import hashlib
import os
import sys

import numpy as np
from tqdm import tqdm

from gptcraft.config import command_name
from gptcraft.data.nanogpt import MetaPickleError, is_nanogpt_folder, nanogpt_meta
from gptcraft.data.shards import MAGIC, META, SPLITS, TokenFileError, open_legacy, open_shard, shard_meta, write_meta
from gptcraft.data.tokenizer import GPT2_META

SCAN_TOKENS = 1 << 24  # tokens read at a time: memory stays flat however large the shard


def scan(f):
    """(sha256 of the whole file, its largest token id), in one read of the file."""
    h = hashlib.sha256()
    top = 0
    with open(f.path, "rb") as handle:
        h.update(handle.read(f.offset))
        while block := handle.read(SCAN_TOKENS * f.dtype.itemsize):
            h.update(block)
            top = max(top, int(np.frombuffer(block, dtype=f.dtype).max()))
    return h.hexdigest(), top


def headerless(path):
    """True when a .bin file does not start with the shard magic number: nanoGPT's flat uint16 tokens."""
    with open(path, "rb") as f:
        return np.frombuffer(f.read(4).ljust(4, b"\0"), dtype="<i4")[0] != MAGIC


def index_nanogpt(data_dir):
    """meta.json for a nanoGPT folder: its vocabulary, checked against the largest id in each file."""
    meta = dict(nanogpt_meta(data_dir), source={"nanogpt": os.path.abspath(data_dir)})
    for split in SPLITS:
        _, top = scan(open_legacy(os.path.join(data_dir, f"{split}.bin")))
        if top >= meta["vocab_size"]:
            vocabulary = "meta.pkl's" if meta["tokenizer"] == "char" else "GPT-2's"
            sys.exit(f"error: {data_dir}/{split}.bin holds token id {top}, outside {vocabulary} {meta['vocab_size']}")
    write_meta(data_dir, meta)
    print(f"{data_dir}: nanoGPT train.bin and val.bin, {meta['tokenizer']} vocabulary of {meta['vocab_size']}")


def index(data_dir, force=False):
    if os.path.exists(os.path.join(data_dir, META)) and not force:
        sys.exit(f"error: {os.path.join(data_dir, META)} exists already; pass --force to write it again")
    if is_nanogpt_folder(data_dir) and headerless(os.path.join(data_dir, "train.bin")):
        return index_nanogpt(data_dir)
    names = sorted(n for n in os.listdir(data_dir) if n.endswith(".bin"))
    splits = {}
    for split in SPLITS:
        found = [n for n in names if split in n]
        if not found:
            sys.exit(f"error: {data_dir} holds no .bin file with '{split}' in its name")
        shards, top = [], 0
        for name in tqdm(found, desc=split, unit=" shards"):
            f = open_shard(os.path.join(data_dir, name))
            sha256, shard_top = scan(f)
            top = max(top, shard_top)
            shards.append({"file": name, "tokens": f.count, "sha256": sha256})
        if top >= GPT2_META["vocab_size"]:
            sys.exit(f"error: {data_dir} {split} shards hold token id {top}, outside GPT-2's vocabulary")
        splits[split] = {"shards": shards, "max_token": top}
    meta = shard_meta(GPT2_META, splits, source={"indexed": os.path.abspath(data_dir)})
    write_meta(data_dir, meta)
    print(", ".join(f"{s} {meta['splits'][s]['tokens']:,} tokens in {len(splits[s]['shards'])} shards" for s in SPLITS))


def main(argv=None):
    p = argparse.ArgumentParser(prog=command_name("prepare/index_shards.py"), description=__doc__.splitlines()[0])
    p.add_argument("--dir", required=True, help="the folder of .bin shards")
    p.add_argument("--force", action="store_true", help="replace an existing meta.json")
    args = p.parse_args(argv)
    try:
        index(args.dir, args.force)
    except (OSError, TokenFileError, MetaPickleError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
