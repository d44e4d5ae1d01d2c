"""Tiny Shakespeare as characters: train.bin / val.bin (uint16, 90/10 split) and meta.json.

python prepare/shakespeare_char.py [--input PATH] [--out_dir data/shakespeare_char]
"""

import argparse
import os
import sys

import numpy as np

from gptcraft.config import command_name
from gptcraft.data.shards import is_dataset_file, write_meta, write_tokens
from gptcraft.data.sources import SourceError, tiny_shakespeare
from gptcraft.data.tokenizer import CharTokenizer, TokenizerError
from gptcraft.files import replaced_dir

TOKENS_MAX = 1 << 16  # ids a uint16 token file holds


def prepare(out_dir, input_path=None):
    text = tiny_shakespeare(input_path)
    tok = CharTokenizer.from_text(text)
    if tok.vocab_size > TOKENS_MAX:
        raise TokenizerError(
            f"the text holds {tok.vocab_size:,} distinct characters, more than the {TOKENS_MAX:,} ids of a "
            "uint16 train.bin; tokenize it with GPT-2 BPE instead (prepare/corpus.py)"
        )
    ids = np.array(tok.encode(text), dtype=np.uint16)
    n_train = int(0.9 * len(ids))
    # Written beside out_dir and swapped in whole: a failure leaves the old dataset as it was.
    with replaced_dir(out_dir, is_dataset_file) as new:
        write_tokens(os.path.join(new, "train.bin"), ids[:n_train])
        write_tokens(os.path.join(new, "val.bin"), ids[n_train:])
        write_meta(new, tok.meta())
    print(f"{out_dir}: vocab {tok.vocab_size}, train {n_train:,} tokens, val {len(ids) - n_train:,} tokens")


def main(argv=None):
    p = argparse.ArgumentParser(prog=command_name("prepare/shakespeare_char.py"), description=__doc__.splitlines()[0])
    p.add_argument("--input", help="local copy of tinyshakespeare.txt (default: download it)")
    p.add_argument("--out_dir", default=os.path.join("data", "shakespeare_char"))
    args = p.parse_args(argv)
    try:
        prepare(args.out_dir, args.input)
    except (SourceError, TokenizerError, OSError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
