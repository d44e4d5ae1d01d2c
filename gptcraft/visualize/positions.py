"""Position encodings side by side: sinusoidal, a trained model's learned table, and rotary (rope).

gptcraft positions                                              # the fixed tables, 64 positions, 128 wide
gptcraft positions --init_from=resume --out_dir=out-shakespeare-char-cpu   # and the run's learned table
gptcraft positions --init_from=gpt2 --block_size=256            # GPT-2's learned table, first 256 positions

Top row, the tables (position x channel): sinusoidal PE(pos, 2i) = sin(pos / 10000^(2i/d)) and
PE(pos, 2i+1) = cos(...); the learned wpe rows; for rope, which adds no vector, cos(pos * theta_i),
the rotation applied to the i-th channel pair of every query and key (theta_i = 10000^(-2i/hs)).
Bottom row, the cosine similarity between positions m and n (the dot product of unit vectors):
between rows m and n of the sinusoidal and learned tables; for rope, between one vector rotated
to position m and the same vector rotated to position n (apply_rope on a vector of ones, whose
channel pairs all have the same length), which equals the mean of cos((m - n) theta_i) over the pairs.
"""

import sys
from dataclasses import dataclass

import matplotlib.pyplot as plt
import torch
from matplotlib.ticker import MaxNLocator

from gptcraft.config import ConfigError, option, parse_config, run_cli
from gptcraft.hf import HUB_MODELS, from_pretrained
from gptcraft.load import RunFolder, check_init_from, load_run
from gptcraft.model import apply_rope, rope_tables, sinusoidal_positions
from gptcraft.visualize import png

DEFAULT_SIZES = dict(block_size=64, n_embd=128, n_head=4)  # configs/train_shakespeare_char_cpu.py


@dataclass
class PositionsConfig(RunFolder):
    init_from: str = option("", "the model whose learned table to draw: resume (the run in out_dir), "
                                f"{', '.join(HUB_MODELS)} or a Hugging Face GPT-2 folder; "
                                "empty: only the fixed tables")  # fmt: skip
    block_size: int = option(0, "positions drawn; 0: the model's block_size, or 64 without a model")
    n_embd: int = option(0, "channels of the sinusoidal table; 0: the model's n_embd, or 128 without a model")
    n_head: int = option(0, "heads: rope rotates n_embd / n_head channels; 0: the model's n_head, or 4")
    output: str = option("", "PNG file to write; empty: positions.png in out_dir (init_from=resume), else here")

    def __post_init__(self):
        if self.init_from:
            check_init_from(self.init_from)
        for key in DEFAULT_SIZES:
            if getattr(self, key) < 0:
                raise ConfigError(f"{key} must be >= 0 (0: the model's, or the default), got {getattr(self, key)}")
        png.check_png_name(self.output)


def cosine_similarity(vectors):
    """(T, T) cosine similarity between the rows of vectors (T, d)."""
    unit = vectors / vectors.norm(dim=-1, keepdim=True)
    return unit @ unit.T


def rope_similarity(block_size, head_size):
    """(T, T) cosine similarity between one vector rotated to position m and to position n."""
    cos, sin = rope_tables(block_size, head_size)  # each (T, hs/2)
    ones = torch.ones(1, 1, block_size, head_size)  # the same vector at every position
    return cosine_similarity(apply_rope(ones, cos, sin)[0, 0])


def model_name(cfg):
    return cfg.out_dir if cfg.init_from == "resume" else cfg.init_from


def learned_table(cfg):
    """The learned position table (T, C) of the model cfg names, and its config; ConfigError without one."""
    name = model_name(cfg)
    model = load_run(cfg.out_dir, "cpu")[0] if cfg.init_from == "resume" else from_pretrained(cfg.init_from)
    kind = model.config.pos_embedding
    if kind != "learned":
        raise ConfigError(f"{name} uses {kind} positions, not a learned table: its encoding is the fixed one "
                          f"drawn without --init_from")  # fmt: skip
    return model.transformer.wpe.weight.detach().float(), model.config


def sizes(cfg, model_config):
    """block_size, n_embd and n_head: those given, else the model's, else DEFAULT_SIZES."""
    chosen = {}
    for key, default in DEFAULT_SIZES.items():
        chosen[key] = getattr(cfg, key) or (getattr(model_config, key) if model_config else default)
    if chosen["n_embd"] % chosen["n_head"] or (chosen["n_embd"] // chosen["n_head"]) % 2:
        raise ConfigError(f"n_embd ({chosen['n_embd']}) must split into {chosen['n_head']} heads of an even size: "
                          "rope rotates pairs of channels")  # fmt: skip
    if model_config and chosen["block_size"] > model_config.block_size:
        raise ConfigError(f"block_size={chosen['block_size']}, but the learned table has only "
                          f"{model_config.block_size} positions")  # fmt: skip
    return chosen["block_size"], chosen["n_embd"], chosen["n_head"]


def panels(block_size, n_embd, n_head, learned=None, learned_name="learned"):
    """[(title, table (T, channels), similarity (T, T))] for sinusoidal, the learned table if given, and rope."""
    T, hs = block_size, n_embd // n_head
    sinusoidal = sinusoidal_positions(T, n_embd)
    columns = [(f"sinusoidal, d={n_embd}", sinusoidal, cosine_similarity(sinusoidal))]
    if learned is not None:
        table = learned[:T]
        columns.append((f"{learned_name} (learned), d={table.size(1)}", table, cosine_similarity(table)))
    cos, _ = rope_tables(T, hs)
    columns.append((f"rope, head size {hs}: cos(pos θ_i)", cos, rope_similarity(T, hs)))
    return columns


def draw(columns, title):
    """A figure with one column per encoding: its table above, its position similarity below."""
    fig, axes = plt.subplots(2, len(columns), figsize=(4.5 * len(columns), 9.0), squeeze=False, layout="constrained")
    for c, (name, table, similarity) in enumerate(columns):
        top, bottom = axes[0][c], axes[1][c]
        scale = table.abs().max().item()
        image = top.imshow(table.numpy(), cmap="RdBu_r", vmin=-scale, vmax=scale, aspect="auto",
                           interpolation="nearest")  # fmt: skip
        top.set(title=name, xlabel="channel" if c < len(columns) - 1 else "channel pair i", ylabel="position")
        fig.colorbar(image, ax=top, shrink=0.8)
        image = bottom.imshow(similarity.numpy(), cmap="RdBu_r", vmin=-1.0, vmax=1.0, interpolation="nearest")
        bottom.set(title="cosine similarity of positions", xlabel="position n", ylabel="position m")
        fig.colorbar(image, ax=bottom, shrink=0.8)
        for axis in (top.xaxis, top.yaxis, bottom.xaxis, bottom.yaxis):  # channels and positions are whole numbers
            axis.set_major_locator(MaxNLocator(integer=True))
    fig.suptitle(title)
    return fig


def main(argv=None):
    cfg = parse_config(PositionsConfig, sys.argv[1:] if argv is None else argv, prog="gptcraft positions")
    learned, model_config = learned_table(cfg) if cfg.init_from else (None, None)
    block_size, n_embd, n_head = sizes(cfg, model_config)
    columns = panels(block_size, n_embd, n_head, learned, model_name(cfg))
    fig = draw(columns, f"position encodings, {block_size} positions")
    output = png.output_path(cfg.output, "positions.png", cfg.out_dir if cfg.init_from == "resume" else None)
    png.save(fig, output)
    print(f"wrote {output} ({'; '.join(column[0] for column in columns)})")


if __name__ == "__main__":
    run_cli(main)
