"""Time the nanoGPT reference's own train.py on the same recipe, side by side with ours.

bench.py --nanogpt_dir=PATH runs PATH/train.py (a nanoGPT checkout, not part of this project)
as a subprocess in a scratch directory (it reads configurator.py and data/ from its working
directory: the checkout's three files are linked there), on uniformly random tokens in nanoGPT's data layout
(data/<dataset>/train.bin, val.bin as uint16, and its meta.pkl holding the vocabulary size),
and reads the ms of each step from the `iter N: loss L, time T ms` lines it prints.
"""

import os
import pickle
import re
import statistics
import subprocess
import sys
import tempfile

import numpy as np

from gptcraft.errors import GptcraftError

# nanoGPT's train.py keys that set the step being timed, as our TrainConfig names them too.
RECIPE_KEYS = ("batch_size", "block_size", "n_layer", "n_head", "n_embd", "dropout", "bias", "learning_rate",
               "weight_decay", "beta1", "beta2", "grad_clip", "gradient_accumulation_steps", "device")  # fmt: skip
CHECKOUT_FILES = ("train.py", "model.py", "configurator.py")
STEP_LINE = re.compile(r"^iter (\d+): loss [-\d.naif]+, time ([\d.]+)ms")


class NanoGPTError(GptcraftError):
    """The nanoGPT checkout is missing or its train.py did not run to the end."""


def check_checkout(path):
    """Refuse a directory without nanoGPT's train.py and model.py, before any work."""
    for name in CHECKOUT_FILES:
        if not os.path.isfile(os.path.join(path, name)):
            raise NanoGPTError(f"--nanogpt_dir={path} holds no {name}: point it at a nanoGPT checkout "
                               "(git clone https://github.com/karpathy/nanoGPT)")  # fmt: skip


def write_data(root, vocab, tokens):
    """nanoGPT's layout under root/data/bench: random uint16 tokens and a meta.pkl with vocab_size
    (a pickle, because that is what nanoGPT's train.py reads; nothing of ours reads it)."""
    path = os.path.join(root, "data", "bench")
    os.makedirs(path)
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        rng.integers(0, vocab, size=tokens, dtype=np.uint16).tofile(os.path.join(path, f"{split}.bin"))
    with open(os.path.join(path, "meta.pkl"), "wb") as f:
        pickle.dump({"vocab_size": vocab}, f)


def step_times(output):
    """{iteration: ms} from nanoGPT's log lines."""
    return {int(m[1]): float(m[2]) for m in map(STEP_LINE.match, output.splitlines()) if m}


def time_steps(checkout, cfg, vocab, iters):
    """Mean ms per step of nanoGPT's train.py over steps iters+1 .. 2*iters of a run of 2*iters
    (the first ones warm up; step 0 also evaluates), with cfg's recipe keys, fp32, not compiled."""
    check_checkout(checkout)
    with tempfile.TemporaryDirectory(prefix="gptcraft-nanogpt-") as tmp:
        write_data(tmp, vocab, max(cfg.block_size + 1, cfg.batch_size * (cfg.block_size + 1) * 4))
        keys = {k: getattr(cfg, k) for k in RECIPE_KEYS} | {
            "dataset": "bench", "out_dir": os.path.join(tmp, "out"), "max_iters": 2 * iters,
            "lr_decay_iters": 2 * iters, "warmup_iters": 0, "eval_interval": 2 * iters + 1, "eval_iters": 1,
            "log_interval": 1, "always_save_checkpoint": False, "compile": False, "dtype": "float32",
            "wandb_log": False}  # fmt: skip
        for name in CHECKOUT_FILES:
            os.symlink(os.path.join(os.path.abspath(checkout), name), os.path.join(tmp, name))
        args = [f"--{k}={v}" for k, v in keys.items()]
        proc = subprocess.run([sys.executable, "train.py", *args], cwd=tmp, capture_output=True, text=True)
    times = step_times(proc.stdout)
    timed = [times[i] for i in range(iters + 1, 2 * iters + 1) if i in times]
    if proc.returncode != 0 or len(timed) != iters:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise NanoGPTError(f"nanoGPT's train.py failed (exit {proc.returncode}): {tail[0]}")
    return statistics.fmean(timed)
