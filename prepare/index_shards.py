"""Describe a folder of llm.c / NanoGPT-speedrun shards (their FineWeb .bin files) with a meta.json.

The recipe is gptcraft/prepare/index_shards.py.
"""

from gptcraft.prepare.index_shards import main

if __name__ == "__main__":
    main()
