"""The GPU acceptance run: each speed claim of docs/gpu-acceptance.md checked on this machine.

python tools/gpu_acceptance.py          on a GPU node: every check, on 1 GPU and on all of them
python tools/gpu_acceptance.py --cpu    the same checks at toy scale on the CPU (what CI runs)

Each check prints one line, `ok` or `FAIL`, with its figures; the exit status is 1 when any
failed. The data comes from $GPTCRAFT_SHARED_DATA (a folder holding tinyshakespeare.txt), else
../shared/data beside the repository: an offline node needs one of them.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gptcraft import generate  # noqa: E402
from gptcraft.bench import speed  # noqa: E402
from gptcraft.train import loop  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402

MFU_TARGET = 0.45  # GPT-2 124M, bf16, compiled, on an H100 SXM
HOST_READS = ("item", "tolist", "__bool__", "__float__", "__int__")
TINY = {"dataset": "shakespeare_char", "compile": False, "n_layer": 2, "n_head": 2, "n_embd": 128,
        "block_size": 64, "batch_size": 8, "gradient_accumulation_steps": 2, "eval_interval": 8,
        "eval_iters": 2, "log_interval": 1, "max_iters": 8, "dropout": 0.0, "learning_rate": 3e-3}  # fmt: skip


def shared_data():
    folder = Path(os.environ.get("GPTCRAFT_SHARED_DATA", ROOT.parent / "shared" / "data"))
    if not (folder / "tinyshakespeare.txt").exists():
        sys.exit(f"error: {folder}/tinyshakespeare.txt is missing: set GPTCRAFT_SHARED_DATA to a folder holding it")
    return folder


def prepared_data(tmp):
    """data_dir with shakespeare_char prepared from the local copy (no download)."""
    data_dir = Path(tmp) / "data"
    text = shared_data() / "tinyshakespeare.txt"
    prepare = ["prepare/shakespeare_char.py", "--input", str(text), "--out_dir", str(data_dir / "shakespeare_char")]
    subprocess.run([sys.executable, *prepare], cwd=ROOT, check=True, capture_output=True)
    return data_dir


def args_of(values):
    return [f"--{k}={v}" for k, v in values.items()]


def kernel_names(fn):
    """Names of every kernel and operator `fn` ran, from the profiler."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        fn()
    return {event.key for event in prof.key_averages()}


def check_flash_under_compile(device):
    """The compiled training step's attention runs a flash kernel (its name says so)."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=256, vocab_size=512, n_layer=2, n_head=4, n_embd=256, dropout=0.0)).to(device)
    model.compile()
    idx = torch.randint(0, 512, (4, 256), device=device)

    def step():
        with torch.autocast(device, dtype=torch.bfloat16 if device == "cuda" else torch.float32):
            model(idx, idx)[1].backward()

    step()  # compiles
    flash = sorted(name for name in kernel_names(step) if "flash" in name.lower())
    return bool(flash), f"flash kernels: {flash[:3] or 'none'}"


def check_no_host_sync_in_step(device, data_dir, tmp):
    """No host sync inside the training step after warm-up: on a GPU under
    torch.cuda.set_sync_debug_mode("error"), on the CPU by counting host reads of tensors."""
    reads, real_step = [], loop.train_step

    def watched_step(job, run, *rest):
        if run.iter_num < 3:  # warm-up: compilation and allocator may sync
            return real_step(job, run, *rest)
        if device == "cuda":
            torch.cuda.set_sync_debug_mode("error")
            try:
                return real_step(job, run, *rest)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        real = {n: getattr(torch.Tensor, n) for n in HOST_READS}
        for n in HOST_READS:
            setattr(torch.Tensor, n, lambda self, *a, _n=n, **k: reads.append(_n) or real[_n](self, *a, **k))
        try:
            return real_step(job, run, *rest)
        finally:
            for n, method in real.items():
                setattr(torch.Tensor, n, method)

    loop.train_step = watched_step
    try:
        for optimizer in ("adamw", "muon"):
            run = {**TINY, "device": device, "optimizer": optimizer, "compile": device == "cuda"}
            loop.main(args_of({**run, "data_dir": data_dir, "out_dir": Path(tmp) / f"sync-{optimizer}"}))
    except RuntimeError as e:  # what sync debug mode raises
        return False, f"a host sync inside the step: {e}"
    finally:
        loop.train_step = real_step
    return not reads, f"host reads inside steps 3-8 (adamw and muon): {len(reads)}"


def check_decode_without_recapture(device):
    """Compiled decoding (a CUDA graph on a GPU) neither recompiles nor captures again once warm."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=128, vocab_size=256, n_layer=2, n_head=4, n_embd=128, dropout=0.0)).to(device)
    model.eval()
    decode = generate.compile_decoder("reduce-overhead" if device == "cuda" else None)
    idx = torch.zeros(1, 1, dtype=torch.long, device=device)

    def tokens():
        with torch.no_grad():
            return list(generate.decode_n_tokens(model, idx, 40, top_k=1, decode=decode))

    tokens()  # compiles and captures
    captures, begin = [], torch.cuda.CUDAGraph.capture_begin
    torch.cuda.CUDAGraph.capture_begin = lambda self, *a, **k: captures.append(1) or begin(self, *a, **k)
    try:
        with torch.compiler.set_stance("fail_on_recompile"):
            tokens()
    except RuntimeError as e:
        return False, f"recompiled: {e}"
    finally:
        torch.cuda.CUDAGraph.capture_begin = begin
    return not captures, f"CUDA graph captures after warm-up: {len(captures)}"


def check_mfu(device, data_dir, tmp):
    """GPT-2 124M, bf16, compiled: MFU printed with the device name; below 45% on an H100 fails."""
    json_path = Path(tmp) / "bench.json"
    config = ROOT / ("configs/train_gpt2.py" if device == "cuda" else "configs/train_shakespeare_char_cpu.py")
    extra = {"bench_iters": 20} if device == "cuda" else {"bench_iters": 4, "data_dir": data_dir}
    results = speed.main([str(config), f"--device={device}", "--sample_tokens=0", "--json", str(json_path),
                          *args_of(extra)])  # fmt: skip
    mfu, name = results["training"]["mfu"], results["device"]
    figure = f"{name}: MFU {100 * mfu:.1f}%" if mfu is not None else f"{name}: no MFU (peak unknown)"
    if device == "cuda" and "H100" in name:
        return mfu is not None and mfu >= MFU_TARGET, f"{figure} (target {100 * MFU_TARGET:.0f}%)"
    return True, f"{figure} (the {100 * MFU_TARGET:.0f}% target holds on an H100 only)"


def losses(out_dir):
    rows = [json.loads(line) for line in (Path(out_dir) / "log.jsonl").read_text().splitlines()]
    return {r["iter"]: r["loss"] for r in rows if "loss" in r}


def check_parallel_agrees(device, data_dir, tmp, wrapper):
    """DDP or FSDP on every GPU (2 gloo processes on the CPU) follows one process for 8 steps, in float32."""
    n = torch.cuda.device_count() if device == "cuda" else 2
    run = {**TINY, "device": device, "dtype": "float32", "data_dir": data_dir, "fsdp": wrapper == "fsdp"}
    one, many = Path(tmp) / f"one-{wrapper}", Path(tmp) / f"{wrapper}-{n}"
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}", "train.py"]
    for out, cmd in ((one, launch[:4] + ["--nproc_per_node=1", "train.py"]), (many, launch)):
        subprocess.run([*cmd, *args_of({**run, "out_dir": out})], cwd=ROOT, check=True, capture_output=True,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    a, b = losses(one), losses(many)
    worst = max(abs(a[i] - b[i]) for i in a) if a and list(a) == list(b) else float("inf")
    return worst < 1e-3, f"{wrapper} on {n} processes against 1: largest loss difference {worst:.2e} (bound 1e-3)"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu", action="store_true", help="run the checks at toy scale on the CPU")
    cfg = parser.parse_args(argv)
    device = "cpu" if cfg.cpu else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        sys.exit("error: no CUDA GPU here; --cpu runs the checks on the CPU")
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = prepared_data(tmp)
        checks = {
            "flash attention under compile": lambda: check_flash_under_compile(device),
            "no host sync in the step": lambda: check_no_host_sync_in_step(device, data_dir, tmp),
            "compiled decoding, no re-capture": lambda: check_decode_without_recapture(device),
            "GPT-2 124M MFU": lambda: check_mfu(device, data_dir, tmp),
            "DDP agrees with one process": lambda: check_parallel_agrees(device, data_dir, tmp, "ddp"),
            "FSDP agrees with one process": lambda: check_parallel_agrees(device, data_dir, tmp, "fsdp"),
        }
        failed = []
        for name, check in checks.items():
            ok, detail = check()
            print(f"{'ok  ' if ok else 'FAIL'} {name}: {detail}", flush=True)
            if not ok:
                failed.append(name)
    print(f"{len(checks) - len(failed)} of {len(checks)} checks passed on {speed.device_name(device)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
