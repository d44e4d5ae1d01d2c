"""Train a GPT: one process on CPU or GPU, or many through torchrun (DDP or FSDP2).

python train.py configs/train_shakespeare_char_cpu.py --max_iters=500
torchrun --standalone --nproc_per_node=8 train.py configs/train_shakespeare_char.py

The settings are in gptcraft/train/config.py, the loop in gptcraft/train/loop.py.
"""

from gptcraft.config import run_cli
from gptcraft.train.loop import main

if __name__ == "__main__":
    run_cli(main)
