"""Tiny Shakespeare in GPT-2 tokens: one train and one val shard (90/10 split of the text) and meta.json.

The recipe is gptcraft/prepare/shakespeare.py.
"""

from gptcraft.prepare.shakespeare import main

if __name__ == "__main__":
    main()
