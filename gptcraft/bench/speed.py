"""How fast does a config train and sample here? Prints a table and writes JSON.

python bench.py configs/train_gpt2.py --device=cuda --json bench-gpt2.json
python bench.py configs/train_shakespeare_char.py --device=cpu --compile=False --bench_iters=5
python bench.py configs/speedrun_shakespeare_char_cpu.py --speedrun=3
python bench.py configs/train_shakespeare_char_cpu.py --sample_tokens=0 --nanogpt_dir=../nanoGPT --repeats=3

Training is timed by running train.py itself (same step, same compile and precision) on random
tokens for 2 x bench_iters steps: the first bench_iters warm up (compile, allocator), the last
bench_iters are timed together (train.py reads the loss once, at their end). Sampling is timed through generate.py:
prefill of a prompt, then decoding with the KV cache and by full recomputation.
Decoding is printed next to its bounds: the weights read once per step at the memory bandwidth
measured here (a large copy), the matmul peak, and the rate of the model's matmuls alone.
--nanogpt_dir=PATH also times nanoGPT's own train.py on the same recipe after each of --repeats
training runs (tools/time_nanogpt.py, from bench.py at the repository's root).
--speedrun=N instead runs the whole training N times, each in a fresh process, and reports the
seconds from process start to the last training step and the whole-val loss (their medians).
"""

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, fields

import numpy as np
import torch

from gptcraft.config import ConfigError, option, parse_config, run_cli
from gptcraft.data.shards import read_meta, write_meta, write_tokens
from gptcraft.files import write_atomic
from gptcraft.generate import compile_decoder, decode_n_tokens, decode_one_token, prefill
from gptcraft.model import GPT, GPTConfig
from gptcraft.runs.lock import check_writable
from gptcraft.system import hardware
from gptcraft.train import loop
from gptcraft.train.config import TrainConfig

KNOWN_VOCAB_SIZES = {"shakespeare_char": 65}  # used when the dataset is not prepared here


@dataclass
class BenchConfig(TrainConfig):
    bench_iters: int = option(10, "timed training steps (as many again run first as warm-up); 0 skips training")
    sample_tokens: int = option(500, "new tokens per sampling run; 0 skips sampling")
    prompt_tokens: int = option(0, "prompt length for sampling (0: block_size // 2)")
    sample_batch: int = option(1, "sequences decoded together, as sample.py draws --num_samples in one batch")
    vocab_size: int = option(0, "vocabulary (0: the prepared dataset's, else a known one, else GPT-2's 50304)")
    json: str = option("", "also write the results to this JSON file")
    speedrun: int = option(0, "> 0: instead time this many complete training runs (process start to last step)")
    nanogpt_dir: str = option("", "a nanoGPT checkout: also time its train.py on the same recipe, side by side")
    repeats: int = option(1, "training timed this many times (alternating with nanoGPT's); medians reported")

    def __post_init__(self):
        super().__post_init__()
        for key in ("bench_iters", "sample_tokens", "prompt_tokens", "vocab_size", "speedrun"):
            if getattr(self, key) < 0:
                raise ConfigError(f"{key} must not be negative, got {getattr(self, key)}")
        if self.sample_batch <= 0 or self.repeats <= 0:
            raise ConfigError(f"sample_batch and repeats must be positive, got {self.sample_batch}, {self.repeats}")
        if self.nanogpt_dir and (not self.bench_iters or self.speedrun):
            raise ConfigError("--nanogpt_dir times training steps: it needs bench_iters > 0 and no --speedrun")
        if self.speedrun and self.max_iters % self.log_interval:
            raise ConfigError(f"--speedrun reads the log line of the last step: log_interval ({self.log_interval}) "
                              f"must divide max_iters ({self.max_iters})")  # fmt: skip
        if self.prompt_tokens > self.block_size:
            raise ConfigError(f"prompt_tokens ({self.prompt_tokens}) must not exceed block_size ({self.block_size})")


def parse_args(argv):
    """BenchConfig from argv; `--json PATH` may also be written with a space, as in most tools."""
    args = list(argv)
    if "--json" in args:
        i = args.index("--json")
        if i + 1 >= len(args):
            raise ConfigError("--json needs a path: --json PATH")
        args[i : i + 2] = [f"--json={args[i + 1]}"]
    return parse_config(BenchConfig, args, prog="bench.py")


def vocab_size(cfg):
    if cfg.vocab_size:
        return cfg.vocab_size
    try:
        return read_meta(os.path.join(cfg.data_dir, cfg.dataset))["vocab_size"]
    except (FileNotFoundError, ValueError, KeyError):
        return KNOWN_VOCAB_SIZES.get(cfg.dataset, 50304)


def synthetic_dataset(root, vocab, tokens):
    """A dataset of uniformly random tokens: speed does not depend on what the tokens say."""
    path = os.path.join(root, "synthetic")
    os.makedirs(path)
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        write_tokens(os.path.join(path, f"{split}.bin"), rng.integers(0, vocab, size=tokens, dtype=np.uint16))
    write_meta(path, {"tokenizer": "synthetic", "vocab_size": vocab})


def device_name(device):
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(device)
    return f"{device} ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def peak_memory_bytes(device):
    """Peak memory of this process so far: CUDA allocations on a GPU, resident set size on the CPU."""
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def train_args(cfg, **overrides):
    """train.py arguments that reproduce cfg's training keys, with overrides."""
    train_keys = {f.name for f in fields(TrainConfig)}
    values = {k: v for k, v in asdict(cfg).items() if k in train_keys} | overrides
    return [f"--{k}={v}" for k, v in values.items()]


def timed_run(cfg, out_dir):
    """One training run into out_dir in a fresh interpreter: (seconds from its start to the log line
    of the last step, the whole-val loss it logged). The final evaluation runs after the clock stops."""
    last_step = f"iter {cfg.max_iters}:"
    t0 = time.perf_counter()
    args = train_args(cfg, full_val=True, init_from="scratch", overwrite=True, out_dir=out_dir)  # each a new one
    cmd = [sys.executable, "-m", "gptcraft.train.loop", *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    seconds = None
    for line in proc.stdout:
        if seconds is None and line.startswith(last_step):
            seconds = time.perf_counter() - t0
    if proc.wait() != 0 or seconds is None:
        raise RuntimeError(f"train.py exited with status {proc.returncode} before its last step")
    rows = [json.loads(line) for line in open(os.path.join(out_dir, "log.jsonl"))]
    return seconds, [r["full_val_loss"] for r in rows if "full_val_loss" in r][-1]


def bench_speedrun(cfg):
    """cfg.speedrun complete runs, one after another, on data already prepared (preparation is not timed),
    each into a scratch folder of its own: the config's out_dir, which may hold a real run, is never touched."""
    with tempfile.TemporaryDirectory(prefix="gptcraft-speedrun-") as tmp:
        runs = [timed_run(cfg, os.path.join(tmp, "out")) for _ in range(cfg.speedrun)]
    for i, (seconds, loss) in enumerate(runs):
        print(f"run {i + 1}: {seconds:.1f} s to the last step, full val loss {loss:.4f}")
    return {"runs": [{"seconds": s, "full_val_loss": v} for s, v in runs],
            "median_seconds": statistics.median(s for s, _ in runs),
            "median_full_val_loss": statistics.median(v for _, v in runs)}  # fmt: skip


def bench_training(cfg, device, vocab, flops_per_token, peak):
    """Run train.py for 2 x bench_iters steps on random tokens; the second half is timed."""
    n = cfg.bench_iters
    with tempfile.TemporaryDirectory(prefix="gptcraft-bench-") as tmp:
        tokens = max(cfg.block_size + 1, cfg.batch_size * (cfg.block_size + 1) * 4)
        synthetic_dataset(tmp, vocab, tokens)
        overrides = {"data_dir": tmp, "dataset": "synthetic", "out_dir": os.path.join(tmp, "out"),
                     "max_iters": 2 * n, "log_interval": n, "eval_interval": 2 * n, "eval_iters": 1,
                     "eval_only": False, "full_val": False, "init_from": "scratch", "device": device,
                     "always_save_checkpoint": False, "warmup_iters": 0}  # fmt: skip
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats(device)
        loop.main(train_args(cfg, **overrides))
        memory = peak_memory_bytes(device)
        rows = [json.loads(line) for line in open(os.path.join(tmp, "out", "log.jsonl"))]
    timed = [r for r in rows if r.get("iter") == 2 * n and "ms_per_iter" in r][0]
    tokens_per_iter = cfg.gradient_accumulation_steps * cfg.batch_size * cfg.block_size
    mfu = flops_per_token * timed["tokens_per_s"] / peak if peak else None
    return {"ms_per_iter": timed["ms_per_iter"], "tokens_per_iter": tokens_per_iter,
            "tokens_per_s": timed["tokens_per_s"], "mfu": mfu, "peak_memory_bytes": memory}  # fmt: skip


def side_by_side(cfg, device, vocab, flops_per_token, peak, reference):
    """bench_training cfg.repeats times, each followed by nanoGPT's train.py on the same recipe when
    cfg.nanogpt_dir is set (timed by `reference`, tools/time_nanogpt.py): the figures of the run with the
    median ms/iter, each run's ms/iter and nanoGPT's, and the ratio of the medians."""
    runs, timings = [], []
    for _ in range(cfg.repeats):
        runs.append(bench_training(cfg, device, vocab, flops_per_token, peak))
        if cfg.nanogpt_dir:
            timings.append(reference.time_steps(cfg.nanogpt_dir, cfg, vocab, cfg.bench_iters))
    ms = [r["ms_per_iter"] for r in runs]
    result = dict(sorted(runs, key=lambda r: r["ms_per_iter"])[len(runs) // 2], runs_ms_per_iter=ms)
    if timings:
        result |= {"nanogpt_ms_per_iter": timings, "speedup_vs_nanogpt": statistics.median(timings) /
                   statistics.median(ms)}  # fmt: skip
    return result


def timed_decode(model, prompt, n, use_cache, device, decode=decode_one_token):
    """Seconds to decode n tokens after each sequence of prompt (B, P), greedy."""
    hardware.synchronize(device)
    t0 = time.perf_counter()
    for _ in decode_n_tokens(model, prompt, n, temperature=0, use_cache=use_cache, decode=decode):
        pass
    hardware.synchronize(device)
    return time.perf_counter() - t0


def decode_bounds(model, batch, bandwidth, peak):
    """Upper bounds on decoding tokens/s: a step must read every weight that does matmul work once
    (bandwidth bound, batch tokens per read) and do 2 FLOP per such weight per token (compute bound)."""
    n = model.num_params()
    weight_bytes = n * next(model.parameters()).element_size()
    return {"weight_bytes": weight_bytes, "memory_bandwidth": bandwidth,
            "bandwidth_bound": batch * bandwidth / weight_bytes,
            "compute_bound": peak / (2 * n) if peak else None}  # fmt: skip


def matmul_rate(model, batch, device, repeats=5):
    """Tokens/s of a decoding step's matmuls alone: one F.linear per Linear of the model, in order,
    on (batch, in_features) inputs, best of `repeats` passes. The weights stream from memory as in
    decoding, so this is what torch's kernels reach on these shapes before any other operator."""
    weights = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)]
    inputs = {w.shape[1]: torch.randn(batch, w.shape[1], device=device) for w in weights}

    def one_pass():
        for w in weights:
            torch.nn.functional.linear(inputs[w.shape[1]], w)

    one_pass()
    best = float("inf")
    for _ in range(repeats):
        hardware.synchronize(device)
        t0 = time.perf_counter()
        one_pass()
        hardware.synchronize(device)
        best = min(best, time.perf_counter() - t0)
    return batch / best


def bench_sampling(cfg, device, dtype, vocab, peak):
    """Prompt (prefill) tokens/s, then decode tokens/s with the KV cache (eager, and compiled with
    --compile=True) and by full recomputation, over all sample_batch sequences together, each next
    to the bounds of decode_bounds."""
    model_args = cfg.model_args() | {"vocab_size": vocab}
    torch.manual_seed(cfg.seed)
    model = GPT(GPTConfig(**model_args)).to(device).eval()
    P = cfg.prompt_tokens or max(1, cfg.block_size // 2)
    B, n = cfg.sample_batch, cfg.sample_tokens
    prompt = torch.randint(0, vocab, (B, P), device=device)
    rates = {}
    with hardware.autocast(device, dtype):
        prefill(model, prompt)  # warm-up
        timed_decode(model, prompt, min(n, 8), True, device)
        hardware.synchronize(device)
        t0 = time.perf_counter()
        prefill(model, prompt)
        hardware.synchronize(device)
        prefill_s = time.perf_counter() - t0
        rates["cached"] = B * n / timed_decode(model, prompt, n, True, device)
        if cfg.compile:
            step = compile_decoder("reduce-overhead" if device.startswith("cuda") else None)
            t0 = time.perf_counter()
            timed_decode(model, prompt, 2, True, device, step)  # compiles at its first decoding step
            compile_s = time.perf_counter() - t0
            rates["compiled"] = B * n / timed_decode(model, prompt, n, True, device, step)
        rates["full"] = B * n / timed_decode(model, prompt, n, False, device)
        matmuls = matmul_rate(model, B, device)
    bounds = decode_bounds(model, B, hardware.memory_bandwidth(device), peak)
    bound = min(b for b in (bounds["bandwidth_bound"], bounds["compute_bound"]) if b)
    best = max(rates["cached"], rates.get("compiled", 0.0))
    return {"batch": B, "prompt_tokens": P, "new_tokens": n, "prompt_tokens_per_s": B * P / prefill_s,
            **{f"decode_tokens_per_s_{k}": v for k, v in rates.items()}, **bounds,
            "fraction_of_bound": best / bound, "cache_speedup": best / rates["full"],
            "matmul_tokens_per_s": matmuls, "fraction_of_matmuls": best / matmuls,
            "compile_seconds": compile_s if cfg.compile else None}  # fmt: skip


def table(results):
    """The results as aligned text lines."""
    peak = f"{results['peak_flops'] / 1e12:.2f} TFLOP/s" if results["peak_flops"] else "unknown"
    params, flops = results["params"] / 1e6, results["flops_per_token"] / 1e6
    lines = [f"{results['device']}, {results['dtype']}, compile {results['compile']}, peak {peak}",
             f"model: {params:.2f}M parameters, {flops:.1f} MFLOP/token"]  # fmt: skip
    t, s = results.get("training"), results.get("sampling")
    if t:
        mfu = f"{100 * t['mfu']:.1f}%" if t["mfu"] is not None else "n/a"
        rows = [("ms/iter", f"{t['ms_per_iter']:.1f}"), ("tokens/iter", f"{t['tokens_per_iter']:,d}"),
                ("tokens/s", f"{t['tokens_per_s']:,.0f}"), ("MFU", mfu),
                ("peak memory (MiB)", f"{t['peak_memory_bytes'] / 2**20:,.0f}")]  # fmt: skip
        if len(t["runs_ms_per_iter"]) > 1:
            rows.append(("ms/iter of each run", ", ".join(f"{ms:.1f}" for ms in t["runs_ms_per_iter"])))
        if "nanogpt_ms_per_iter" in t:
            rows += [("nanoGPT ms/iter, each run", ", ".join(f"{ms:.1f}" for ms in t["nanogpt_ms_per_iter"])),
                     ("speed-up vs nanoGPT", f"{t['speedup_vs_nanogpt']:.2f}x")]  # fmt: skip
        lines += ["", "training" + (" (median run)" if len(t["runs_ms_per_iter"]) > 1 else "")]
        lines += [f"  {name:28s}{value:>16}" for name, value in rows]
    if s:
        bw, cb, compiled = s["bandwidth_bound"], s["compute_bound"], s.get("decode_tokens_per_s_compiled")
        rows = [("prompt tokens/s", f"{s['prompt_tokens_per_s']:,.0f}"),
                ("decode tokens/s, KV cache", f"{s['decode_tokens_per_s_cached']:,.1f}"),
                ("decode tokens/s, compiled", f"{compiled:,.1f}" if compiled else "--compile=True"),
                ("compiling it (first step)", f"{s['compile_seconds']:.1f} s" if compiled else "n/a"),
                ("decode tokens/s, recompute", f"{s['decode_tokens_per_s_full']:,.1f}"),
                ("memory bandwidth (copy)", f"{s['memory_bandwidth'] / 1e9:.1f} GB/s"),
                ("bound: weights / bandwidth", f"{bw:,.1f}"),
                ("bound: compute", f"{cb:,.1f}" if cb else "n/a"),
                ("best decode / bound", f"{100 * s['fraction_of_bound']:.0f}%"),
                ("matmuls alone (torch kernels)", f"{s['matmul_tokens_per_s']:,.1f}"),
                ("best decode / matmuls alone", f"{100 * s['fraction_of_matmuls']:.0f}%"),
                ("best decode / recompute", f"{s['cache_speedup']:.1f}x")]  # fmt: skip
        lines += ["", f"sampling: prompt of {s['prompt_tokens']}, {s['new_tokens']} new tokens, batch {s['batch']}, "
                      f"{s['weight_bytes'] / 1e6:.1f} MB of weights read per step"]  # fmt: skip
        lines += [f"  {name:28s}{value:>16}" for name, value in rows]
    if "speedrun" in results:
        r = results["speedrun"]
        lines += ["", f"speedrun: {len(r['runs'])} runs, median {r['median_seconds']:.1f} s from process start "
                      f"to the last step, median full val loss {r['median_full_val_loss']:.4f}"]  # fmt: skip
    return "\n".join(lines)


def main(argv=None, reference=None):
    """reference: the module that times a nanoGPT checkout (tools/time_nanogpt.py, which is not installed:
    bench.py at the repository's root passes it)."""
    cfg = parse_args(sys.argv[1:] if argv is None else argv)
    if cfg.nanogpt_dir:
        if reference is None:
            raise ConfigError("--nanogpt_dir is a developer tool (tools/time_nanogpt.py): run python bench.py from a "
                              "gptcraft checkout")  # fmt: skip
        reference.check_checkout(cfg.nanogpt_dir)
    device = hardware.resolve_device(cfg.device)
    dtype = hardware.resolve_dtype(cfg.dtype, device)
    if cfg.json:
        check_writable(os.path.dirname(os.path.abspath(cfg.json)))  # fail now, not after the run
    if cfg.speedrun and not os.path.exists(os.path.join(cfg.data_dir, cfg.dataset, "meta.json")):
        raise ConfigError(f"dataset {cfg.dataset} is not prepared in {cfg.data_dir}: prepare it first (not timed)")
    vocab = vocab_size(cfg)
    with torch.device("meta"):
        shape = GPT(GPTConfig(**cfg.model_args(), vocab_size=vocab))
    results = {"date": time.strftime("%Y-%m-%d"), "device": device_name(device), "dtype": dtype,
               "compile": cfg.compile, "params": shape.num_params(), "flops_per_token": shape.flops_per_token(),
               "peak_flops": hardware.peak_flops(device, dtype),
               "config": {k: v for k, v in asdict(cfg).items() if k != "json"}}  # fmt: skip
    if cfg.speedrun:
        results["speedrun"] = bench_speedrun(cfg)
    elif cfg.bench_iters:
        results["training"] = side_by_side(
            cfg, device, vocab, results["flops_per_token"], results["peak_flops"], reference
        )
    if cfg.sample_tokens and not cfg.speedrun:
        results["sampling"] = bench_sampling(cfg, device, dtype, vocab, results["peak_flops"])
    print(table(results))
    if cfg.json:
        text = json.dumps(results, indent=1).encode()
        write_atomic(cfg.json, lambda f: f.write(text))
        print(f"wrote {cfg.json}")
    return results


if __name__ == "__main__":
    run_cli(main)
