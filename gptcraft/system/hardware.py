"""Which device and precision to run on, and how many FLOP/s that hardware can do at best."""

import contextlib
import time

import torch

from gptcraft.config import option
from gptcraft.errors import GptcraftError


class DeviceError(GptcraftError):
    """The device asked for is not available here."""


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# Dense bf16 tensor-core peaks from the vendors' data sheets, in FLOP/s; matched by substring.
GPU_BF16_PEAK = [
    ("H200", 989e12),
    ("H100 PCIe", 756e12),
    ("H100", 989e12),
    ("A100", 312e12),
    ("A10G", 70e12),
    ("L40S", 362e12),
    ("L4", 121e12),
    ("4090", 165e12),
    ("3090", 71e12),
    ("V100", 125e12),  # fp16: the V100 has no bf16
]


def device_option():
    """The `device` key that every script shares."""
    return option("auto", "auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps")


def dtype_option():
    """The `dtype` key that every script shares."""
    return option("auto", "auto: bfloat16 on CUDA where supported, else float16; float32 on CPU",
                  ("auto", *DTYPES))  # fmt: skip


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
            return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
        return "float32"
    return name


def autocast(device, dtype):
    """Mixed-precision context for forward passes; a no-op for float32."""
    if dtype == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.split(":")[0], dtype=DTYPES[dtype])


def measured_cpu_peak(n=2048, repeats=5):
    """Best fp32 matmul FLOP/s of this CPU, measured with a large square matmul."""
    a, b = torch.randn(n, n), torch.randn(n, n)
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


def peak_flops(device, dtype):
    """The FLOP/s that MFU is measured against: a data-sheet bf16 peak for known GPUs,
    a measured fp32 matmul peak on CPU, None where unknown."""
    if device.startswith("cuda"):
        name = torch.cuda.get_device_name(device)
        for key, peak in GPU_BF16_PEAK:
            if key in name:
                return peak
        return None
    if device == "cpu":
        return measured_cpu_peak()
    return None
