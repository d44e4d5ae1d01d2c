"""OpenWebText in GPT-2 tokens: prepare/corpus.py with the Hugging Face `openwebtext` dataset.

python prepare/openwebtext.py --num_proc 8          # writes data/openwebtext/
python prepare/openwebtext.py --streaming           # no full download first
"""

import os

from gptcraft.prepare import corpus


def main(argv=None):
    corpus.main(
        argv, dataset="openwebtext", out_dir=os.path.join("data", "openwebtext"), script="prepare/openwebtext.py"
    )


if __name__ == "__main__":
    main()
