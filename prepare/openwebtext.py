"""OpenWebText in GPT-2 tokens: prepare/corpus.py with the Hugging Face `openwebtext` dataset.

python prepare/openwebtext.py --num_proc 8          # writes data/openwebtext/
python prepare/openwebtext.py --streaming           # no full download first
"""

from prepare.corpus import main

if __name__ == "__main__":
    main(dataset="openwebtext", out_dir="data/openwebtext")
