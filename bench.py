"""How fast does a config train and sample here? Prints a table and writes JSON.

python bench.py configs/train_shakespeare_char_cpu.py --bench_iters=5
python bench.py configs/train_gpt2.py --device=cuda --json bench-gpt2.json
python bench.py configs/train_shakespeare_char_cpu.py --sample_tokens=0 --nanogpt_dir=../nanoGPT --repeats=3

The benchmark itself is gptcraft/bench/speed.py (also `gptcraft bench`); the side-by-side timing of
a nanoGPT checkout is a developer tool kept out of the installed package, in tools/time_nanogpt.py.
"""

from gptcraft.bench.speed import main
from gptcraft.config import run_cli
from tools import time_nanogpt

if __name__ == "__main__":
    run_cli(lambda: main(reference=time_nanogpt))
