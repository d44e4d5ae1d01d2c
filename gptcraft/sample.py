"""Sample text from a trained checkpoint.

python sample.py --out_dir=out-shakespeare-char --start="ROMEO:" --num_samples=3
python sample.py --out_dir=out-shakespeare-char --start=FILE:prompt.txt --temperature=0
echo "ROMEO:" | python sample.py --out_dir=out-shakespeare-char --start=- --num_samples=1
python sample.py --out_dir=out-shakespeare-char --compile=True --device=cuda   # decoding as a CUDA graph
python sample.py --out_dir=out-shakespeare-char --quantize=int8 --num_samples=1   # int8 weights: fastest on a CPU
python sample.py --init_from=gpt2-xl --start="What is the answer to life?" --num_samples=1
"""

import codecs
import math
import os
import sys
import time
from dataclasses import dataclass

import torch

from gptcraft import terminal
from gptcraft.config import ConfigError, check_seed, option, parse_config, refuse, run_cli
from gptcraft.generate import compile_decoder, decode_n_tokens, decode_one_token
from gptcraft.load import ModelOptions
from gptcraft.prompt import encode_prompt, end_of_text, read_prompt
from gptcraft.system import hardware


@dataclass
class SampleConfig(ModelOptions):
    start: str = option("\n", "prompt text; FILE:path reads it from a file, - from stdin; empty starts "
                              "from end-of-text (BPE) or a newline (characters)")  # fmt: skip
    num_samples: int = option(10, "samples drawn together as one batch")
    max_new_tokens: int = option(500, "tokens generated per sample (may exceed block_size: the window slides)")
    temperature: float = option(0.8, "1.0 samples the model as is, lower is more conservative, 0 is greedy")
    top_k: int = option(200, "sample only from the k most likely tokens; 0 disables")
    top_p: float = option(1.0, "sample only from the most likely tokens holding this much probability; 1 disables")
    seed: int = option(1337, "random seed")
    use_cache: bool = option(True, "KV cache: one token's work per step; False recomputes the whole context")
    window_keep: int = option(0, "tokens kept when the context slides past block_size; 0: block_size // 2; "
                                 "block_size: slide one token per step (slow)")  # fmt: skip
    compile: bool = option(False, "torch.compile the decoding step (once, at the first step; on CUDA as a CUDA "
                                  "graph, mode=reduce-overhead); needs use_cache")  # fmt: skip
    stream: bool = option(True, "print a single sample token by token as it is generated")

    def __post_init__(self):
        super().__post_init__()
        if self.num_samples <= 0 or self.max_new_tokens <= 0:
            raise ConfigError("num_samples and max_new_tokens must be positive")
        if not 0 <= self.temperature < math.inf:
            raise ConfigError(f"temperature must be >= 0 and finite (0 is greedy), got {self.temperature}")
        if self.top_k < 0:
            raise ConfigError(f"top_k must be >= 0 (0 disables it), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"top_p must be in (0, 1] (1 disables it), got {self.top_p}")
        if self.compile and not self.use_cache:
            raise ConfigError("compile=True compiles the KV-cache decoding step: it needs use_cache=True")
        if self.window_keep < 0:
            raise ConfigError(f"window_keep must be >= 0 (0 means block_size // 2), got {self.window_keep}")
        refuse(check_seed(self.seed))


def free_memory(device):
    """Bytes that can still be allocated on `device`: free GPU memory, or MemAvailable of the host."""
    if device.startswith("cuda"):
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def check_batch_memory(config, num_samples, device, element_size=4):
    """Refuse a batch of num_samples whose KV cache, activations and logits cannot fit on `device`.
    A rough per-sample count: keys and values of every layer (2 n_layer C per position), the widest
    activations of one block (4 C per position for the MLP, a T x T map per head), and (V,) logits."""
    c, t = config.n_embd, config.block_size
    per_sample = element_size * (t * (2 * config.n_layer * c + 8 * c + config.n_head * t) + 2 * config.vocab_size)
    free = free_memory(device)
    if num_samples * per_sample > free:
        most = max(free // per_sample, 1)
        raise ConfigError(
            f"num_samples={num_samples} needs about {num_samples * per_sample / 2**30:.1f} GiB on {device}, "
            f"more than the {free / 2**30:.1f} GiB free; use --num_samples={most} or fewer"
        )


class TextStream:
    """Text of token ids that arrive one at a time. A BPE token can end inside a multi-byte UTF-8
    character: the incremental decoder holds such bytes back until the character is complete."""

    def __init__(self, tok):
        self.tok = tok
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, ids):
        """The text that ids complete (possibly empty)."""
        if hasattr(self.tok, "decode_bytes"):
            data = self.tok.decode_bytes(ids)
        else:
            data = self.tok.decode(ids).encode("utf-8")
        return self.decoder.decode(data)

    def flush(self):
        """Whatever is held back, as replacement characters: the text ended inside a character."""
        return self.decoder.decode(b"", final=True)


def until_eot(ids, eot):
    return ids[: ids.index(eot)] if eot in ids else ids


def main(argv=None):
    cfg = parse_config(SampleConfig, sys.argv[1:] if argv is None else argv, prog="sample.py")
    prompt = read_prompt(cfg.start)
    model, tok, device, dtype = cfg.load()
    block_size = model.config.block_size
    if cfg.window_keep > block_size:
        raise ConfigError(f"window_keep ({cfg.window_keep}) must not exceed the model's block_size ({block_size})")
    check_batch_memory(model.config, cfg.num_samples, device, hardware.DTYPES[dtype].itemsize)
    ids = encode_prompt(tok, prompt)
    eot = end_of_text(tok)
    x = torch.tensor([ids] * cfg.num_samples, dtype=torch.long, device=device)  # (B, T): one batch
    generator = torch.Generator(device).manual_seed(cfg.seed)
    decode = decode_one_token
    if cfg.compile:
        decode = compile_decoder("reduce-overhead" if device.startswith("cuda") else None)
    steps = decode_n_tokens(model, x, cfg.max_new_tokens, temperature=cfg.temperature, top_k=cfg.top_k or None,
                            top_p=cfg.top_p, generator=generator, use_cache=cfg.use_cache,
                            keep=cfg.window_keep or None, eos_id=eot, decode=decode)  # fmt: skip
    streaming = cfg.stream and cfg.num_samples == 1
    stream, shown = TextStream(tok), terminal.for_stdout()
    if streaming:
        print(shown(prompt), end="", flush=True)
    new_tokens, t0, t_first = [], time.perf_counter(), None
    for token in steps:
        t_first = t_first or time.perf_counter()
        new_tokens.append(token)
        if streaming and token.item() != eot:
            print(shown(stream.push([token.item()])), end="", flush=True)
    elapsed = time.perf_counter() - t0
    if streaming:
        print(shown(stream.flush()))
        print("---------------")
    else:
        for row in torch.cat(new_tokens, dim=1).tolist():
            print(shown(prompt + tok.decode(until_eot(row, eot))))
            print("---------------")
    n = len(new_tokens)
    rate = n * cfg.num_samples / elapsed
    print(f"{n} tokens x {cfg.num_samples} sample(s) in {elapsed:.2f} s: {rate:.1f} tokens/s "
          f"(prompt of {len(ids)} tokens: first token after {t_first - t0:.3f} s; "
          f"{'KV cache' if cfg.use_cache else 'full recomputation'})", file=sys.stderr)  # fmt: skip


if __name__ == "__main__":
    run_cli(main)
