"""How fast does a config train and sample here? Prints a table and writes JSON.

python bench.py configs/train_shakespeare_char_cpu.py --bench_iters=5
python bench.py configs/train_gpt2.py --device=cuda --json bench-gpt2.json

The benchmark itself is gptcraft/bench/speed.py.
"""

from gptcraft.bench.speed import main
from gptcraft.config import run_cli

if __name__ == "__main__":
    run_cli(main)
