"""Any text corpus into GPT-2 token shards: a Hugging Face dataset, or local txt/jsonl/parquet files.

The recipe is gptcraft/prepare/corpus.py.
"""

from gptcraft.prepare.corpus import main

if __name__ == "__main__":
    main()
