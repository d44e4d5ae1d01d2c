"""OpenWebText in GPT-2 tokens: prepare/corpus.py with the Hugging Face `openwebtext` dataset.

The recipe is gptcraft/prepare/openwebtext.py.
"""

from gptcraft.prepare.openwebtext import main

if __name__ == "__main__":
    main()
