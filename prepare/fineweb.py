"""FineWeb-Edu (or FineWeb) sample-10BT in GPT-2 tokens, the data of the GPT-2 124M reproductions.

The recipe is gptcraft/prepare/fineweb.py.
"""

from gptcraft.prepare.fineweb import main

if __name__ == "__main__":
    main()
