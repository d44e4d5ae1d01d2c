"""HellaSwag: which of four endings of a scene does the model find most likely?

gptcraft hellaswag --init_from=gpt2                      (downloads hellaswag_val.jsonl once)
gptcraft hellaswag --out_dir=out-gpt2 --file=hellaswag_val.jsonl
torchrun --standalone --nproc_per_node=8 -m gptcraft hellaswag --init_from=gpt2-xl

Each example of the official jsonl has a context `ctx`, four `endings` and the `label` of the
right one. Context and ending (after a space) are tokenized together, and each ending is scored
by the model's cross-entropy over the ending's tokens only, as build-nanogpt and llm.c do
("completion style"). The pick is the ending with the smallest
- acc: summed loss;
- acc_norm: summed loss per character of the ending, as lm-evaluation-harness normalises the
  acc_norm that papers and leaderboards quote (its prompt differs: see docs/hellaswag.md);
- acc_norm_tokens: mean loss per token, what build-nanogpt and llm.c call acc_norm.
On the 10,042 validation examples build-nanogpt's hellaswag.py reports acc 0.2859 and (per token)
0.2955 for OpenAI's GPT-2 124M, 0.3842 / 0.4893 for GPT-2 1558M. Ranks take every world_size-th
batch of examples and add up their counts.
"""

import hashlib
import json
import os
import sys
import urllib.request
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from gptcraft.config import ConfigError, option, parse_config, run_cli
from gptcraft.data.batches import to_device
from gptcraft.errors import GptcraftError
from gptcraft.evaluate.loss import sum_over_batches
from gptcraft.files import file_sha256, write_atomic
from gptcraft.load import ModelOptions, load_model
from gptcraft.quantize import check_scheme, for_inference
from gptcraft.system import distributed, hardware

VAL_URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl"
VAL_EXAMPLES = 10_042
ENDINGS = 4


class HellaSwagError(GptcraftError, ValueError):
    """The examples file is missing, damaged or not in the official format; the message names it."""


def read_examples(path):
    """The examples of an official HellaSwag jsonl file as (ctx, endings, label) tuples."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = [line for line in f if line.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise HellaSwagError(f"cannot read HellaSwag file {path}: {getattr(e, 'strerror', None) or e}") from None
    examples = []
    for n, line in enumerate(lines, 1):
        try:
            row = json.loads(line)
            ctx, endings, label = row["ctx"], row["endings"], row["label"]
        except (ValueError, KeyError, TypeError):
            raise HellaSwagError(f"{path}, line {n}: not a HellaSwag example (JSON with ctx, endings, label)") from None
        valid = isinstance(ctx, str) and isinstance(endings, list) and len(endings) == ENDINGS
        if not (valid and all(isinstance(e, str) for e in endings) and label in range(ENDINGS)):
            raise HellaSwagError(f"{path}, line {n}: needs a text ctx, {ENDINGS} text endings and a label 0 to 3")
        examples.append((ctx, endings, label))
    if not examples:
        raise HellaSwagError(f"{path} holds no examples")
    return examples


def recorded_sha256(path):
    """The sha256 recorded beside the cached file at its first download (`path.sha256`, in
    sha256sum's format). No public record of the official file's hash was found to pin here."""
    try:
        with open(path + ".sha256") as f:
            return f.read().split()[0]
    except (OSError, ValueError, IndexError):
        raise HellaSwagError(f"{path} has no readable {path}.sha256 recorded at its download: delete {path} to "
                             f"download it again, or pass --sha256=HASH of a copy you trust") from None  # fmt: skip


def check_sha256(path, expected, whose):
    actual = file_sha256(path)
    if actual != expected.lower():
        raise HellaSwagError(f"{path} has sha256 {actual}, not {expected} ({whose}): it changed; delete it to "
                             f"download it again, or pass --file=PATH to a copy you trust")  # fmt: skip


def download_val(path):
    """Fetch the official validation file to `path`; keep it only when it holds all 10,042 examples,
    and record its sha256 beside it."""
    try:
        with urllib.request.urlopen(VAL_URL, timeout=60) as response:
            data = response.read()
    except OSError as e:
        raise HellaSwagError(f"cannot download {VAL_URL} ({e}); offline, pass --file=PATH to a local copy") from None
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    write_atomic(path, lambda f: f.write(data))
    count = len(read_examples(path))
    if count != VAL_EXAMPLES:
        os.remove(path)
        raise HellaSwagError(f"{VAL_URL} holds {count} examples, not {VAL_EXAMPLES}; pass --file=PATH to a good copy")
    digest = hashlib.sha256(data).hexdigest()
    write_atomic(path + ".sha256", lambda f: f.write(f"{digest}  {os.path.basename(path)}\n".encode()))
    print(f"downloaded {path} ({len(data):,} bytes, sha256 {digest}, recorded in {path}.sha256)")


def check_encodable(examples, tok, path):
    """Refuse, before any compute, examples that the tokenizer cannot encode: a character
    vocabulary lacking some of their characters (GPT-2 BPE encodes any text)."""
    chars = {c for ctx, endings, _ in examples for text in (ctx, " ", *endings) for c in text}
    try:
        tok.encode("".join(sorted(chars)))
    except ValueError as e:
        raise HellaSwagError(f"{path}: {e}") from None


def render(example, tok, block_size):
    """(rows, ending lengths): for each ending the tokens of context + " " + ending, cut from the
    left to block_size + 1 tokens (block_size inputs), and how many of them are the ending's."""
    ctx, endings, _ = example
    ctx_ids = tok.encode(ctx)
    rows, lengths = [], []
    for ending in endings:
        end_ids = tok.encode(" " + ending)
        row = (ctx_ids + end_ids)[-(block_size + 1) :]
        rows.append(row)
        lengths.append(min(len(end_ids), len(row) - 1))  # the first token is never a target
    return rows, lengths


def padded_width(width, block_size):
    """Rows of `width` tokens (inputs + 1) padded to one of a few widths, so that a compiled model
    sees few shapes: the next power of two of inputs, at least 64, at most block_size."""
    inputs = max(64, 1 << (width - 2).bit_length())
    return min(inputs, block_size) + 1


def ending_losses(model, rows, lengths, device, block_size):
    """(sum, mean) of each row's cross-entropy over its last lengths[i] tokens, each of shape (R,)."""
    width = padded_width(max(len(r) for r in rows), block_size)
    tokens = torch.zeros(len(rows), width, dtype=torch.long)
    targets = torch.full((len(rows), width - 1), -1, dtype=torch.long)  # -1: not scored
    for i, (row, n) in enumerate(zip(rows, lengths, strict=True)):
        tokens[i, : len(row)] = torch.tensor(row)
        targets[i, len(row) - 1 - n : len(row) - 1] = tokens[i, len(row) - n : len(row)]
    x, y = to_device(tokens[:, :-1], device), to_device(targets, device)  # (R, L), right-padded
    logits, _ = model(x, y)  # (R, L, V)
    losses = F.cross_entropy(logits.float().transpose(1, 2), y, ignore_index=-1, reduction="none")  # (R, L)
    sums = losses.sum(dim=1)
    return sums, sums / torch.tensor(lengths, device=device)


def score(model, tok, examples, block_size, device, dtype, d, batch_size=8):
    """{"acc", "acc_norm", "acc_norm_tokens", "examples"} over `examples` (see the module docstring),
    scored batch_size at a time and shared out across ranks (evaluate/loss.py)."""
    batches = [examples[i : i + batch_size] for i in range(0, len(examples), batch_size)]

    def correct(i):
        rendered = [render(example, tok, block_size) for example in batches[i]]
        rows = [row for rows, _ in rendered for row in rows]
        lengths = [n for _, ns in rendered for n in ns]
        sums, means = (t.view(-1, ENDINGS) for t in ending_losses(model, rows, lengths, device, block_size))
        chars = torch.tensor([[len(ending) for ending in example[1]] for example in batches[i]], device=sums.device)
        labels = torch.tensor([example[2] for example in batches[i]], device=sums.device)
        picks = (sums.argmin(1), (sums / chars).argmin(1), means.argmin(1))  # acc, acc_norm, acc_norm_tokens
        return torch.stack([(pick == labels).sum() for pick in picks])

    acc, acc_norm, acc_norm_tokens = sum_over_batches(model, len(batches), correct, device, dtype, d, width=3)
    n = len(examples)
    return {"acc": acc / n, "acc_norm": acc_norm / n, "acc_norm_tokens": acc_norm_tokens / n, "examples": n}


@dataclass
class HellaSwagConfig(ModelOptions):
    file: str = option("", "the official hellaswag_val.jsonl (or any file in its format); empty: download it")
    cache_dir: str = option(os.path.join("data", "hellaswag"), "where the downloaded hellaswag_val.jsonl is kept")
    sha256: str = option("", "the file's expected sha256; empty: the one recorded at its download (none for --file)")
    max_examples: int = option(0, "score only the first this many examples; 0 scores all")
    batch_size: int = option(8, "examples per forward pass (4 endings each)")
    backend: str = option("auto", "torch.distributed backend under torchrun", ("auto", "nccl", "gloo"))

    def __post_init__(self):
        super().__post_init__()
        if self.max_examples < 0 or self.batch_size <= 0:
            raise ConfigError("max_examples must be >= 0 and batch_size positive")


def examples_file(cfg, d):
    """--file, else the cached official file, downloaded by rank 0 when it is missing."""
    path = cfg.file or os.path.join(cfg.cache_dir, "hellaswag_val.jsonl")
    if not cfg.file:
        if d.master and not os.path.exists(path):
            download_val(path)
        distributed.barrier(d)
    if cfg.sha256:
        check_sha256(path, cfg.sha256, "--sha256")
    elif not cfg.file:
        check_sha256(path, recorded_sha256(path), f"recorded in {path}.sha256 at its download")
    return path


def main(argv=None):
    cfg = parse_config(HellaSwagConfig, sys.argv[1:] if argv is None else argv, prog="gptcraft hellaswag")
    d, device = distributed.init(hardware.resolve_device(cfg.device), cfg.backend)
    try:
        check_scheme(cfg.quantize, device)  # before loading a model it could not run
        path = examples_file(cfg, d)
        examples = read_examples(path)
        model, tok = load_model(cfg.init_from, cfg.out_dir, device, cfg.tokenizer_file)
        model, _ = for_inference(model, device, cfg.dtype, cfg.quantize)  # cast: no autocast below
        if cfg.max_examples:
            examples = examples[: cfg.max_examples]
        check_encodable(examples, tok, path)
        result = score(model, tok, examples, model.config.block_size, device, None, d, cfg.batch_size)
        if d.master:
            print(f"hellaswag: acc {result['acc']:.4f}, acc_norm {result['acc_norm']:.4f} (per character, as "
                  f"lm-evaluation-harness), acc_norm_tokens {result['acc_norm_tokens']:.4f} (per token, as "
                  f"build-nanogpt) over {result['examples']:,} examples")  # fmt: skip
        return result
    finally:
        distributed.shutdown()


if __name__ == "__main__":
    run_cli(main)
