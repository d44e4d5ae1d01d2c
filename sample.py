"""Sample text from a trained checkpoint or from GPT-2.

python sample.py --out_dir=out-shakespeare-char-cpu --start="ROMEO:" --num_samples=3
python sample.py --init_from=gpt2 --start="What is the answer to life?" --num_samples=1

The command is gptcraft/sample.py; decoding (prefill, KV cache, top-k/top-p) is gptcraft/generate.py.
"""

from gptcraft.config import run_cli
from gptcraft.sample import main

if __name__ == "__main__":
    run_cli(main)
