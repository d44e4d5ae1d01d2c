"""Weights for inference: cast to one number format, optionally quantized (weight-only).

Decoding one sequence reads every weight once per token and does 2 FLOP with each: it is bound by
the bytes of the weights, so fewer bytes per weight are more tokens per second. `prepare` casts a
model to the inference dtype (hardware.inference_dtype) and replaces its nn.Linear layers in place:

- int8: per-output-channel scales, w ~ scale[o] * q[o, i] with q in [-127, 127]. On the CPU the
  matmul is torch's `_weight_int8pack_mm` with bfloat16 activations (fast even on AVX2-only CPUs,
  where bf16 matmuls are otherwise emulated; the activations are rounded to bf16 for this matmul only).
  Past KERNEL_ROWS rows, and on CUDA, it is the int8 weights converted for an ordinary matmul
  (on CUDA torch.compile fuses the conversion into the matmul's prologue).
- int4: groups of GROUP_SIZE inputs with a scale and an offset each, w ~ (q - 8) * scale + zero with
  q in [0, 15], through torch's tinygemm kernels (`_weight_int4pack_mm`, on CPU `_for_cpu`).

docs/sampling.md gives the measured speed and val loss of each, and why these kernels.
model.py knows nothing of this: the layers are swapped from outside, the equations stay as they are.
"""

import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

from gptcraft.config import option
from gptcraft.errors import GptcraftError
from gptcraft.system import hardware

SCHEMES = ("none", "int8", "int4")
# Up to this many rows (tokens) the CPU's int8 kernel runs; more rows (a prompt, an evaluation
# batch) are compute-bound, where its bf16 arithmetic is slow without native bf16: there the
# weights are converted to the activations' dtype for one ordinary matmul instead.
KERNEL_ROWS = 16
GROUP_SIZE = 32  # int4: inputs sharing one scale and zero
KERNEL_DEVICES = ("cpu", "cuda")  # where torch has int8 and int4 kernels


def quantize_option():
    """The `quantize` key of the commands that only run the model."""
    return option("none", "weight-only quantization: int8 (per output channel; CPU and CUDA) or int4 (groups of "
                  f"{GROUP_SIZE})", SCHEMES)  # fmt: skip


class QuantizeError(GptcraftError):
    """The quantization asked for has no kernel on this device."""


def check_scheme(scheme, device):
    """Refuse, in one line, a scheme this device cannot run."""
    if scheme not in SCHEMES:
        raise QuantizeError(f"quantize={scheme!r}: choose one of {', '.join(SCHEMES)}")
    if scheme != "none" and device.split(":")[0] not in KERNEL_DEVICES:
        raise QuantizeError(f"quantize={scheme} has no kernel on {device} (torch has them for cpu and cuda); "
                            "use --quantize=none")  # fmt: skip


class Int8Linear(nn.Module):
    """y = x W^T + b with W stored as int8 rows and one scale per output channel."""

    def __init__(self, linear):
        super().__init__()
        w = linear.weight.detach().float()  # (out, in)
        scales = w.abs().amax(dim=1).clamp(min=1e-12) / 127  # (out,): the row's largest weight maps to 127
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("weight", torch.round(w / scales[:, None]).to(torch.int8))
        # The CPU kernel takes its scales, and its activations, in bfloat16.
        on_cpu = w.device.type == "cpu"
        self.register_buffer("scales", scales.to(torch.bfloat16 if on_cpu else linear.weight.dtype))
        self.bias = linear.bias

    def forward(self, x):
        if self.weight.device.type == "cpu" and x.numel() <= KERNEL_ROWS * self.in_features:
            x2 = x.reshape(-1, self.in_features).to(torch.bfloat16)  # (N, in)
            y = torch.ops.aten._weight_int8pack_mm(x2, self.weight, self.scales)
            y = y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)
        else:
            y = (F.linear(x, self.weight.to(x.dtype)) * self.scales).to(x.dtype)
        return y if self.bias is None else y + self.bias


class Int4Linear(nn.Module):
    """y = x W^T + b with W in groups of GROUP_SIZE inputs, 4 bits each, packed for tinygemm."""

    def __init__(self, linear, inner_k_tiles=8):
        super().__init__()
        w = linear.weight.detach().float()  # (out, in)
        out_features, in_features = w.shape
        groups = w.reshape(out_features, in_features // GROUP_SIZE, GROUP_SIZE)
        lo, hi = groups.amin(dim=-1, keepdim=True), groups.amax(dim=-1, keepdim=True)
        scale = ((hi - lo) / 15).clamp(min=1e-6)
        q = torch.round((groups - lo) / scale).clamp(0, 15).to(torch.int32).reshape(out_features, in_features)
        zero = lo + 8 * scale  # tinygemm's form: w = (q - 8) * scale + zero
        # (in / GROUP_SIZE, out, 2): each group's scale and zero, side by side, in bfloat16
        scales_and_zeros = torch.cat((scale, zero), dim=-1).transpose(0, 1)
        self.register_buffer("scales_and_zeros", scales_and_zeros.contiguous().bfloat16())
        if w.device.type == "cpu":
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, inner_k_tiles)
        else:
            # The CUDA kernel takes two 4-bit values per byte, the even input in the high half.
            packed = torch.ops.aten._convert_weight_to_int4pack((q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8),
                                                                inner_k_tiles)  # fmt: skip
        self.register_buffer("weight", packed)
        self.in_features, self.out_features = in_features, out_features
        self.bias = linear.bias

    @staticmethod
    def fits(linear, inner_k_tiles=8):
        """Whether tinygemm takes this layer's shape: gpt-fast's rule for the inputs, outputs by 16 (CPU packing)."""
        k = linear.in_features
        return k % GROUP_SIZE == 0 and k % (inner_k_tiles * 16) == 0 and linear.out_features % 16 == 0

    def forward(self, x):
        x2 = x.reshape(-1, self.in_features).to(torch.bfloat16)  # (N, in)
        if self.weight.device.type == "cpu":
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.weight, GROUP_SIZE, self.scales_and_zeros)
        else:
            y = torch.ops.aten._weight_int4pack_mm(x2, self.weight, GROUP_SIZE, self.scales_and_zeros)
        y = y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)
        return y if self.bias is None else y + self.bias


def quantize(model, scheme):
    """Replace the model's nn.Linear layers by int8 or int4 ones, in place; returns the model.
    The token embedding stays as it is: a lookup reads one row per token. A head tied to it gets
    its own quantized copy (for GPT-2's vocabulary the head is a third of the weights read per token).
    int4 leaves layers whose shape its kernel does not take in their dtype."""
    if scheme == "none":
        return model
    targets = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
               if isinstance(child, nn.Linear)]  # fmt: skip
    for parent, name, linear in targets:
        if scheme == "int8":
            setattr(parent, name, Int8Linear(linear))
        elif Int4Linear.fits(linear):
            setattr(parent, name, Int4Linear(linear))
    return model


@torch.no_grad()
def prepare(model, dtype, scheme="none"):
    """The model in eval mode with its floating-point weights in `dtype` (a torch.dtype), then
    quantized by `scheme` (see quantize); in place, returned."""
    return quantize(model.eval().to(dtype), scheme)


def for_inference(model, device, dtype="auto", scheme="none"):
    """The model ready to run on device: weights cast to the inference dtype (hardware.inference_dtype)
    and quantized by scheme. Says on stderr which dtype and why. Returns (model, dtype name)."""
    check_scheme(scheme, device)
    name, why = hardware.inference_dtype(dtype, device)
    quantized = f", weights quantized to {scheme}" if scheme != "none" else ""
    print(f"inference in {name} ({why}){quantized}", file=sys.stderr)
    return prepare(model, hardware.DTYPES[name], scheme), name


def weight_bytes(model):
    """Bytes of the weights a decoding step reads: every parameter and buffer but the lookup tables
    (embeddings that are not also the head, fixed position tables), which give one row per token."""
    head = {id(t) for m in model.modules() if not isinstance(m, nn.Embedding) for t in m.parameters(recurse=False)}
    lookups = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)} - head
    lookups |= {id(t) for name, t in model.named_buffers() if name in ("pe", "rope_cos", "rope_sin")}
    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()] if id(t) not in lookups}
    return sum(t.numel() * t.element_size() for t in tensors.values())
