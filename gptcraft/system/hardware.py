"""Which device and precision to run on, and how many FLOP/s that hardware can do at best."""

import contextlib
import json
import os
import platform
import re
import time

import torch

from gptcraft.errors import GptcraftError
from gptcraft.files import write_atomic


class DeviceError(GptcraftError):
    """The device asked for is not available here."""


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# Dense data-sheet peaks in FLOP/s: (16-bit tensor cores: bf16, or fp16 where there is no bf16;
# float32 matmuls, which run as TF32 where the GPU has it: setup allows TF32). A key matches a
# whole word of the device name; the longest matching key wins ("H100 NVL" over "H100").
GPU_PEAKS = {
    "H200": (989e12, 495e12),
    "H200 NVL": (835e12, 418e12),
    "H100": (989e12, 495e12),  # SXM
    # GH200: an H100 (132 SMs at 1980 MHz) beside a Grace CPU, the H100 SXM's figures. H800: the
    # H100 made for export, its NVLink narrowed and its tensor cores unchanged.
    "GH200": (989e12, 495e12),
    "H800": (989e12, 495e12),  # SXM
    "H800 PCIe": (756e12, 378e12),
    "H100 PCIe": (756e12, 378e12),
    "H100 NVL": (835e12, 418e12),
    "A100": (312e12, 156e12),
    "A10G": (70e12, 35e12),
    "L40S": (362e12, 183e12),
    "L40": (181e12, 90e12),
    "L4": (121e12, 60e12),
    "4090": (165e12, 83e12),
    "3090": (71e12, 36e12),
    "V100": (125e12, 15.7e12),  # fp16; no bf16 and no TF32
    "T4": (65e12, 8.1e12),  # fp16; no bf16 and no TF32
}


def resolve_device(name):
    """'auto' picks cuda, then mps, then cpu; anything else must be available here."""
    if name == "auto":
        if torch.cuda.is_available():
            return "cuda"
        if torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    kind = name.split(":")[0]
    if kind == "cuda" and not torch.cuda.is_available():
        raise DeviceError(f"device {name!r} asked for but CUDA is not available here; use --device=cpu or auto")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise DeviceError("device 'mps' asked for but MPS is not available here; use --device=cpu or auto")
    if kind not in ("cpu", "cuda", "mps"):
        raise DeviceError(f"unknown device {name!r}; use auto, cpu, cuda, cuda:N or mps")
    return name


def resolve_dtype(name, device):
    """'auto': bfloat16 on CUDA where supported, else float16 on CUDA, float32 elsewhere.
    CPUs without native bf16 run bf16 matmuls hundreds of times slower than fp32."""
    if name == "auto":
        if device.startswith("cuda"):
            # Emulated bf16 (V100, T4) has no tensor cores and inductor refuses it: float16 there.
            return "bfloat16" if torch.cuda.is_bf16_supported(including_emulation=False) else "float16"
        return "float32"
    return name


def cpu_flags():
    """The CPU's vector and matrix extensions that decide the fastest number format, as torch sees them."""
    checks = {"AVX2": torch.cpu._is_avx2_supported, "AVX-512": torch.cpu._is_avx512_supported,
              "avx512_bf16": torch.cpu._is_avx512_bf16_supported, "AMX": torch.cpu._is_amx_tile_supported}  # fmt: skip
    return [name for name, supported in checks.items() if supported()]


def cpu_has_native_bf16():
    """bf16 matmuls in hardware (avx512_bf16 or AMX tiles): else torch emulates them, hundreds of times
    slower than fp32."""
    return bool({"avx512_bf16", "AMX"} & set(cpu_flags()))


def inference_dtype(name, device):
    """(dtype name, why) for commands that only run the model: the fastest format the device has.
    'auto': bfloat16 on CUDA (float16 where bf16 is emulated), bfloat16 on a CPU with native bf16,
    float32 on other CPUs and devices. The weights are cast to it; there is no autocast."""
    if name != "auto":
        return name, "asked for"
    if device.startswith("cuda"):
        dtype = resolve_dtype("auto", device)
        return dtype, "CUDA" + ("" if dtype == "bfloat16" else " without native bfloat16")
    if device == "cpu" and cpu_has_native_bf16():
        return "bfloat16", f"this CPU has native bfloat16 ({', '.join(cpu_flags())})"
    if device == "cpu":
        flags = ", ".join(cpu_flags()) or "no AVX2"
        return "float32", f"this CPU has no native bfloat16 ({flags}): emulated, it is slower"
    return "float32", f"auto on {device}"


def resolve_compile(compile, device):
    """None (auto): torch.compile on CUDA only. On the CPU recipe it took about 37 s to compile and
    ran no faster per iteration."""
    return device.startswith("cuda") if compile is None else compile


def autocast(device, dtype):
    """Mixed-precision context for forward passes; a no-op for float32, and for None (a model already cast)."""
    if dtype in (None, "float32"):
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.split(":")[0], dtype=DTYPES[dtype])


def measured_cpu_peak(n=2048, repeats=5, threads=None):
    """Best fp32 matmul FLOP/s of this CPU in `repeats` large square matmuls, on `threads`
    threads (None: torch's current number)."""
    # Its own generator: whether a run measures (see cpu_peak) must not change its random streams.
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(n, n, generator=g), torch.randn(n, n, generator=g)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads or previous)
    try:
        a @ b  # warm up the thread pool
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            a @ b
            best = min(best, time.perf_counter() - t0)
    finally:
        torch.set_num_threads(previous)
    return 2 * n**3 / best


def memory_bandwidth(device, mbytes=512, repeats=5):
    """Bytes/s of the best of `repeats` plain copies of an mbytes array (the bytes read and the bytes
    written both count): the rate at which a decoding step can stream the weights in."""
    src = torch.ones(mbytes * 2**20 // 4, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)  # the first copy also faults the pages of dst in: not timed
    best = float("inf")
    for _ in range(repeats):
        synchronize(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        synchronize(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * src.nbytes / best


def synchronize(device):
    """Wait for the device's queued work, so that host clocks time it (a no-op on the CPU)."""
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def cpu_peak_cache():
    """The file that keeps the CPU peak's calibration, one entry per CPU model, thread count and torch."""
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, "gptcraft", "cpu_peak_calibration.json")


# Runs that measure the CPU peak before it is trusted: the best of them is the calibration. Runs
# on a busy machine do not count, but a machine that is always busy stops measuring after MAX_TRIES.
CALIBRATION_RUNS = 5
MAX_TRIES = 20
_MEASURED = {}  # (path, key) -> what this process measured: one process measures once


def calibration_measurement():
    """(what one thread measured, what all of torch's threads measured or None if the machine
    was busy). A busy measurement is no peak: other processes held cores while it ran, which
    shows as a load average that fills every core or as all the threads together measuring
    less than one alone."""
    one = measured_cpu_peak(n=1024, threads=1)
    together = measured_cpu_peak() if torch.get_num_threads() > 1 else one
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    busy = together < one or load >= (os.cpu_count() or 1)
    return one, None if busy else together


def cpu_peak(path=None):
    """The CPU's fp32 matmul peak for this CPU, thread count and torch: the best of the first
    CALIBRATION_RUNS measurements on an idle machine (one per process, kept in `path`), then read
    without measuring; never below what one thread measured. A run on a busy machine would
    measure a low peak (and MFU above 100%): it keeps its one-thread figure as a floor and does
    not count. Deleting the file starts a new calibration."""
    path = path or cpu_peak_cache()
    key = f"{cpu_model()} | {torch.get_num_threads()} threads | torch {torch.__version__}"
    try:
        with open(path) as f:
            cached = json.load(f)
    except (OSError, ValueError):
        cached = {}
    if not isinstance(cached, dict):
        cached = {}
    entry = cached.get(key)
    counts, figures = ("runs", "tries"), ("flop_s", "one_thread_flop_s")
    if not (isinstance(entry, dict) and all(isinstance(entry.get(k), int) for k in counts)
            and all(isinstance(entry.get(k), float) for k in figures)):  # fmt: skip
        entry = {"flop_s": 0.0, "one_thread_flop_s": 0.0, "runs": 0, "tries": 0}  # also an older entry: no floor
    here = _MEASURED.get((path, key))
    if entry["runs"] >= CALIBRATION_RUNS or entry["tries"] >= MAX_TRIES or here is not None:
        return max(entry["flop_s"], here or 0.0)  # calibrated, or measured already by this process
    one, together = calibration_measurement()
    entry = {"flop_s": max(together or one, entry["flop_s"]), "one_thread_flop_s": max(one, entry["one_thread_flop_s"]),
             "runs": entry["runs"] + (together is not None), "tries": entry["tries"] + 1}  # fmt: skip
    _MEASURED[(path, key)] = entry["flop_s"]
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        write_atomic(path, lambda f: f.write(json.dumps({**cached, key: entry}, indent=1).encode()))
    except OSError:
        pass  # a read-only home: the figure of this run alone
    return entry["flop_s"]


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            names = re.findall(r"^model name\s*:\s*(.+)$", f.read(), re.M)
        if names:
            return names[0].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def gpu_peak(name, dtype):
    """The data-sheet peak of the GPU called `name` for a run in `dtype`, None if it is unknown."""
    matches = [key for key in GPU_PEAKS if re.search(rf"\b{re.escape(key)}\b", name)]
    if not matches:
        return None
    half, full = GPU_PEAKS[max(matches, key=len)]
    return full if dtype == "float32" else half


def peak_flops(device, dtype):
    """The FLOP/s that MFU is measured against: a data-sheet peak for known GPUs (16-bit or
    TF32/fp32 by dtype), the best measured fp32 matmul peak on CPU, None where unknown."""
    if device.startswith("cuda"):
        return gpu_peak(torch.cuda.get_device_name(device), dtype)
    if device == "cpu":
        return cpu_peak()
    return None
