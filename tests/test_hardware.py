"""device=auto and dtype=auto, with the CUDA and MPS queries faked, and the peak MFU is measured against."""

import pytest
import torch

from gptcraft.system import hardware


def fake_hardware(monkeypatch, cuda=False, mps=False, bf16=False, name="NVIDIA H100 80GB HBM3"):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)
    # Any arguments: the call may pass including_emulation=False.
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, **k: name)


@pytest.mark.parametrize("cuda, mps, expected", [(True, True, "cuda"), (False, True, "mps"), (False, False, "cpu")])
def test_device_auto_prefers_cuda_then_mps_then_cpu(monkeypatch, cuda, mps, expected):
    fake_hardware(monkeypatch, cuda=cuda, mps=mps)
    assert hardware.resolve_device("auto") == expected


@pytest.mark.parametrize(
    "device, bf16, expected",
    [("cuda", True, "bfloat16"), ("cuda:1", False, "float16"), ("cpu", True, "float32"), ("mps", True, "float32")],
)
def test_dtype_auto_is_bf16_where_cuda_supports_it_else_fp16_and_fp32_off_cuda(monkeypatch, device, bf16, expected):
    fake_hardware(monkeypatch, cuda=True, bf16=bf16)
    assert hardware.resolve_dtype("auto", device) == expected
    assert hardware.resolve_dtype("float32", device) == "float32"  # an explicit choice stays


def test_peak_is_the_data_sheet_figure_of_a_known_gpu_and_none_for_an_unknown_one(monkeypatch):
    fake_hardware(monkeypatch, cuda=True, name="NVIDIA A100-SXM4-40GB")
    assert hardware.peak_flops("cuda", "bfloat16") == 312e12
    fake_hardware(monkeypatch, cuda=True, name="Some Future GPU")
    assert hardware.peak_flops("cuda:0", "bfloat16") is None
    assert hardware.peak_flops("mps", "float32") is None
