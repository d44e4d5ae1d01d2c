"""FineWeb-Edu (or FineWeb) sample-10BT in GPT-2 tokens: prepare/corpus.py on the Hugging Face
10-billion-token samples that build-nanogpt and llm.c train GPT-2 124M on.

python prepare/fineweb.py --num_proc 8                   # HuggingFaceFW/fineweb-edu -> data/fineweb_edu10B/
python prepare/fineweb.py --source fineweb --num_proc 8  # HuggingFaceFW/fineweb -> data/fineweb10B/

The sample is streamed (no 28 GB download first) into 100M-token shards; an interrupted run
started again with the same arguments resumes from its last finished shard (corpus.py).
--input FILES prepares local parquet or jsonl files of the same kind (a `text` column) instead.
"""

import os

from gptcraft.prepare import corpus

SOURCES = {"edu": ("HuggingFaceFW/fineweb-edu", "fineweb_edu10B"), "fineweb": ("HuggingFaceFW/fineweb", "fineweb10B")}
SAMPLE = "sample-10BT"


def parser():
    p = corpus.parser(dataset=SOURCES["edu"][0], out_dir="", script="prepare/fineweb.py")
    p.description = __doc__.splitlines()[0]
    p.add_argument("--source", choices=SOURCES, default="edu", help="edu: FineWeb-Edu (default); fineweb: FineWeb")
    p.set_defaults(name=SAMPLE, streaming=True)
    return p


def parse(argv=None):
    """The corpus.py arguments for --source: its dataset and, unless given, its out_dir."""
    args = parser().parse_args(argv)
    dataset, folder = SOURCES[args.source]
    if args.dataset == SOURCES["edu"][0]:  # not named on the command line: the source's
        args.dataset = dataset
    args.out_dir = args.out_dir or os.path.join("data", folder)
    return args


def main(argv=None):
    corpus.run(parse(argv))


if __name__ == "__main__":
    main()
