"""Sample text from a trained checkpoint.

python sample.py --out_dir=out-shakespeare-char --start="ROMEO:" --num_samples=3
"""

import os
import sys
from dataclasses import dataclass

import torch

import hardware
from checkpoint import CheckpointError, load_checkpoint
from config import ConfigError, option, parse_config, run_cli
from model import GPT, GPTConfig
from tokenizer import load_tokenizer
from tokens import read_meta


@dataclass
class SampleConfig:
    out_dir: str = option("out", "run directory holding ckpt.pt and meta.json")
    start: str = option("\n", "prompt text, or FILE:path to read it from a file")
    num_samples: int = option(10, "number of samples to draw")
    max_new_tokens: int = option(500, "tokens generated per sample")
    temperature: float = option(0.8, "1.0 samples the model as is, lower is more conservative, 0 is greedy")
    top_k: int = option(200, "sample only from the k most likely tokens; 0 disables")
    seed: int = option(1337, "random seed")
    device: str = option("auto", "auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps")
    dtype: str = option("auto", "auto: bfloat16 on CUDA where supported, else float16; float32 on CPU",
                        ("auto", "float32", "bfloat16", "float16"))  # fmt: skip

    def __post_init__(self):
        if self.num_samples <= 0 or self.max_new_tokens <= 0:
            raise ConfigError("num_samples and max_new_tokens must be positive")
        if self.temperature < 0:
            raise ConfigError(f"temperature must be >= 0 (0 is greedy), got {self.temperature}")
        if self.top_k < 0:
            raise ConfigError(f"top_k must be >= 0 (0 disables it), got {self.top_k}")


def read_prompt(start):
    if start.startswith("FILE:"):
        path = start[len("FILE:") :]
        try:
            with open(path, encoding="utf-8") as f:
                return f.read()
        except OSError as e:
            raise ConfigError(f"cannot read prompt file {path}: {e.strerror}") from None
    return start


def load_run(out_dir, device):
    """The model and tokenizer of a training run directory."""
    try:
        ckpt = load_checkpoint(os.path.join(out_dir, "ckpt.pt"), map_location=device)
    except CheckpointError as e:
        raise ConfigError(str(e)) from None
    try:
        meta = read_meta(out_dir)
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(f"{e}; copy the dataset's meta.json into {out_dir}") from None
    model = GPT(GPTConfig(**ckpt["model_args"]))
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval(), load_tokenizer(meta)


def main(argv=None):
    cfg = parse_config(SampleConfig, sys.argv[1:] if argv is None else argv, prog="sample.py")
    device = hardware.resolve_device(cfg.device)
    dtype = hardware.resolve_dtype(cfg.dtype, device)
    prompt = read_prompt(cfg.start)
    model, tok = load_run(cfg.out_dir, device)
    try:
        ids = tok.encode(prompt)
    except ValueError as e:
        raise ConfigError(f"prompt: {e}") from None
    if not ids:
        raise ConfigError("the prompt is empty; give --start=TEXT (the default starts from a newline)")
    torch.manual_seed(cfg.seed)
    x = torch.tensor([ids], dtype=torch.long, device=device)
    for _ in range(cfg.num_samples):
        with torch.no_grad(), hardware.autocast(device, dtype):
            y = model.generate(x, cfg.max_new_tokens, temperature=cfg.temperature, top_k=cfg.top_k or None)
        print(tok.decode(y[0].tolist()))
        print("---------------")


if __name__ == "__main__":
    run_cli(main)
