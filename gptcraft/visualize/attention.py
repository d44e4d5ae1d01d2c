"""Attention maps: run a prompt through a model and draw every layer's and head's attention weights.

gptcraft attention --out_dir=out-shakespeare-char-cpu --start="ROMEO:"
gptcraft attention --init_from=gpt2 --start="The cat sat on the mat." --layers=0,5 --heads=0,1,2

Rows are queries and columns keys, both labelled with the prompt's tokens. The weights are
softmax(Q K^T / sqrt(d_k)) under the causal mask, computed by model.attention_weights: the function
the attention=explicit path itself calls, whichever attention the model trained with. The masked
(future) half is left white; a weight of zero that the softmax gave is drawn in the colour of 0.
"""

import inspect
import sys
from dataclasses import dataclass

import matplotlib.pyplot as plt
import torch

from gptcraft.config import ConfigError, option, parse_config, run_cli
from gptcraft.load import ModelOptions
from gptcraft.model import attention_weights, causal_mask
from gptcraft.prompt import encode_prompt, read_prompt
from gptcraft.system import hardware
from gptcraft.visualize import png

MAX_TOKENS = 128  # one readable label per token
MAX_PIXELS = 12000  # per side of the PNG; a larger grid asks for fewer layers or heads
VISIBLE = {" ": "␣", "\n": "↵", "\t": "→", "$": r"\$"}  # whitespace made visible; $ would start mathtext


@dataclass
class AttentionConfig(ModelOptions):
    start: str = option("ROMEO:\nBut soft, what light", "prompt text; FILE:path reads it from a file, - from stdin")
    layers: str = option("all", "layers to draw: all, or indices counted from 0 separated by commas, e.g. 0,3")
    heads: str = option("all", "heads to draw in each layer: all, or indices counted from 0, e.g. 0,1")
    output: str = option("", "PNG file to write; empty: attention.png in out_dir (init_from=resume), else here")

    def __post_init__(self):
        super().__post_init__()
        parse_indices(self.layers, None, "layers")  # the syntax now, the range once the model is loaded
        parse_indices(self.heads, None, "heads")
        png.check_png_name(self.output)


def parse_indices(text, count, key):
    """The indices that text names ("all" or "0,2"), each below count; count None checks the syntax only."""
    if text == "all":
        return list(range(count or 0))
    try:
        indices = [int(part) for part in text.split(",")]
    except ValueError:
        raise ConfigError(f"{key} expects all or indices separated by commas, such as 0,2; got {text!r}") from None
    for i in indices:
        if i < 0 or (count is not None and i >= count):
            numbered = f"the model's are numbered 0 to {count - 1}" if count else "they are counted from 0"
            raise ConfigError(f"{key}={text} names {key[:-1]} {i}, but {numbered}")
    return indices


def attention_maps(model, idx):
    """The attention weights of every layer for token ids idx (1, T): (n_layer, nh, T, T).

    A hook on each attention module takes the input the forward pass gives it and recomputes that
    module's queries and keys (CausalSelfAttention.heads) and their weights (attention_weights)."""
    maps = []

    def keep(attn, args, kwargs):
        given = inspect.signature(attn.forward).bind(*args, **kwargs).arguments
        q, k, _ = attn.heads(given["x"], given.get("rope"))
        maps.append(attention_weights(q, k, causal=True)[0])  # (nh, T, T)

    hooks = [block.attn.register_forward_pre_hook(keep, with_kwargs=True) for block in model.transformer.h]
    try:
        with torch.no_grad():
            model(idx)
    finally:
        for hook in hooks:
            hook.remove()
    return torch.stack(maps)


def token_labels(tok, ids):
    """Each token's own text, whitespace made visible; a token that ends inside a UTF-8 character shows �."""
    labels = []
    for i in ids:
        data = tok.decode_bytes([i]) if hasattr(tok, "decode_bytes") else tok.decode([i]).encode("utf-8")
        text = data.decode("utf-8", errors="replace")
        labels.append("".join(VISIBLE.get(ch, ch) for ch in text))
    return labels


def figure_title(source):
    return f"{source}\nattention weights (rows: queries, columns: keys)"


def figure_inches(rows, cols, T, title=""):
    """(width, height) of a grid of rows x cols maps of T tokens, room for the colour bar and title
    included: a single small map is widened to its title's longest line (12-point text, about
    0.1 inch a character), which would otherwise be cut at both edges."""
    panel = max(2.0, 0.8 + 0.15 * T)
    title_width = 0.1 * max(map(len, title.splitlines()), default=0) + 0.4
    return max(cols * panel + 1.0, title_width), rows * panel + 0.4 + 0.2 * len(title.splitlines())


def draw(maps, labels, layers, heads, title):
    """A figure of maps (n_layer, nh, T, T): one row per layer in layers, one column per head in heads."""
    T = maps.size(-1)
    future = ~causal_mask(torch.arange(T, device=maps.device), T)  # (T, T): the keys a query may not see
    fig, axes = plt.subplots(len(layers), len(heads), squeeze=False, layout="constrained",
                             figsize=figure_inches(len(layers), len(heads), T, title))  # fmt: skip
    cmap = plt.get_cmap("viridis").with_extremes(bad="white")  # NaN: the masked entries
    for r, layer in enumerate(layers):
        for c, head in enumerate(heads):
            ax = axes[r][c]
            shown = maps[layer, head].masked_fill(future, float("nan"))
            image = ax.imshow(shown.numpy(), cmap=cmap, vmin=0.0, vmax=1.0, interpolation="nearest")
            ax.set_title(f"layer {layer}, head {head}", fontsize=9)
            ax.set_xticks(range(T), labels, rotation=90, fontsize=7)
            ax.set_yticks(range(T), labels, fontsize=7)
            if r == len(layers) - 1:
                ax.set_xlabel("key")
            if c == 0:
                ax.set_ylabel("query")
    fig.colorbar(image, ax=axes, shrink=min(1.0, 4.0 / len(layers)), label="attention weight")
    fig.suptitle(title)
    return fig


def main(argv=None):
    cfg = parse_config(AttentionConfig, sys.argv[1:] if argv is None else argv, prog="gptcraft attention")
    prompt = read_prompt(cfg.start)
    model, tok, device, dtype = cfg.load()
    ids = encode_prompt(tok, prompt)
    limit = min(MAX_TOKENS, model.config.block_size)
    if len(ids) > limit:
        raise ConfigError(f"the prompt is {len(ids)} tokens; the maps take at most {limit} (one label per token, "
                          f"and no more than the model's block_size); shorten --start")  # fmt: skip
    layers = parse_indices(cfg.layers, model.config.n_layer, "layers")
    heads = parse_indices(cfg.heads, model.config.n_head, "heads")
    source = cfg.out_dir if cfg.init_from == "resume" else cfg.init_from
    title = figure_title(source)
    width, height = (round(side * png.DPI) for side in figure_inches(len(layers), len(heads), len(ids), title))
    if max(width, height) > MAX_PIXELS:
        raise ConfigError(
            f"{len(layers)} layers x {len(heads)} heads of {len(ids)} tokens would be a "
            f"{width} x {height} pixel image; pick fewer with --layers and --heads, or shorten --start"
        )
    with hardware.autocast(device, dtype):
        maps = attention_maps(model, torch.tensor([ids], device=device)).float().cpu()
    fig = draw(maps, token_labels(tok, ids), layers, heads, title)
    output = png.output_path(cfg.output, "attention.png", cfg.out_dir if cfg.init_from == "resume" else None)
    png.save(fig, output)
    print(f"wrote {output} ({len(layers)} layers x {len(heads)} heads, {len(ids)} tokens)")


if __name__ == "__main__":
    run_cli(main)
