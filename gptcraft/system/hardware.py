"""Which device and precision to run on, and how many FLOP/s that hardware can do at best."""

import contextlib
import json
import os
import platform
import re
import time

import torch

from gptcraft.errors import GptcraftError


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


def autocast(device, dtype):
    """Mixed-precision context for forward passes; a no-op for float32."""
    if dtype == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.split(":")[0], dtype=DTYPES[dtype])


def measured_cpu_peak(n=2048, repeats=5):
    """Best fp32 matmul FLOP/s of this CPU in `repeats` large square matmuls."""
    # Its own generator: whether a run measures (see cpu_peak) must not change its random streams.
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(n, n, generator=g), torch.randn(n, n, generator=g)
    a @ b  # warm up the thread pool
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
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


# Runs that measure the CPU peak before it is trusted: the best of them is the calibration.
CALIBRATION_RUNS = 5
_MEASURED = {}  # (path, key) -> what this process measured: one process measures once


def cpu_peak(path=None):
    """The CPU's fp32 matmul peak for this CPU, thread count and torch: the best of the first
    CALIBRATION_RUNS measurements (one per process, kept in `path`), then read without measuring.
    One measurement on a busy machine comes out low (and MFU above 100%); the best of several
    does not. Deleting the file starts a new calibration."""
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
    if not (isinstance(entry, dict) and isinstance(entry.get("flop_s"), float) and isinstance(entry.get("runs"), int)):
        entry = {"flop_s": 0.0, "runs": 0}
    here = _MEASURED.get((path, key))
    if entry["runs"] >= CALIBRATION_RUNS or here is not None:
        return max(entry["flop_s"], here or 0.0)  # calibrated, or measured already by this process
    entry = {"flop_s": max(measured_cpu_peak(), entry["flop_s"]), "runs": entry["runs"] + 1}
    _MEASURED[(path, key)] = entry["flop_s"]
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump({**cached, key: entry}, f, indent=1)
        os.replace(tmp, path)
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
