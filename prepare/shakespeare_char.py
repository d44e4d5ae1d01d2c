"""Tiny Shakespeare as characters: train.bin / val.bin (uint16, 90/10 split) and meta.json.

The recipe is gptcraft/prepare/shakespeare_char.py.
"""

from gptcraft.prepare.shakespeare_char import main

if __name__ == "__main__":
    main()
