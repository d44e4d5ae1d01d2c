"""Tiny Shakespeare in GPT-2 tokens: one train and one val shard (90/10 split of the text) and meta.json.

python prepare/shakespeare.py [--input PATH] [--tokenizer_file PATH] [--out_dir data/shakespeare]
"""

import argparse
import os
import sys

from gptcraft.config import command_name
from gptcraft.data.shards import is_dataset_file, shard_meta, shard_version, write_meta, write_shard
from gptcraft.data.sources import SourceError, tiny_shakespeare
from gptcraft.data.tokenizer import GPT2Tokenizer, TokenizerError
from gptcraft.files import file_sha256, replaced_dir


def prepare(out_dir, input_path=None, tokenizer_file=None):
    tok = GPT2Tokenizer(tokenizer_file)
    text = tiny_shakespeare(input_path)
    n = int(0.9 * len(text))
    splits = {}
    # Written beside out_dir and swapped in whole: a failure leaves the old dataset as it was.
    with replaced_dir(out_dir, is_dataset_file) as new:
        for split, part in (("train", text[:n]), ("val", text[n:])):
            ids = tok.encode_array(part)
            name = f"{split}_000000.bin"
            path = os.path.join(new, name)
            write_shard(path, ids, shard_version(tok.vocab_size))
            shard = {"file": name, "tokens": len(ids), "sha256": file_sha256(path)}
            splits[split] = {"shards": [shard], "documents": 1, "max_token": int(ids.max(initial=0))}
        meta = shard_meta(tok.meta(), splits)
        write_meta(new, meta)
    print(f"{out_dir}: train {meta['splits']['train']['tokens']:,} tokens, val {meta['splits']['val']['tokens']:,}")


def main(argv=None):
    p = argparse.ArgumentParser(prog=command_name("prepare/shakespeare.py"), description=__doc__.splitlines()[0])
    p.add_argument("--input", help="local copy of tinyshakespeare.txt (default: download it)")
    p.add_argument("--tokenizer_file", help="local GPT-2 .tiktoken file (offline); or set GPTCRAFT_TIKTOKEN_FILE")
    p.add_argument("--out_dir", default=os.path.join("data", "shakespeare"))
    args = p.parse_args(argv)
    try:
        prepare(args.out_dir, args.input, args.tokenizer_file)
    except (SourceError, TokenizerError, OSError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
