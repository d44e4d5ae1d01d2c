"""device=auto and dtype=auto, with the CUDA and MPS queries faked, the peak MFU is measured against,
and the CUDA device and process group a run sets up."""

import datetime
import json
import os

import pytest
import torch

from gptcraft.runs.checkpoint import load_checkpoint
from gptcraft.system import distributed, hardware
from gptcraft.track.runlog import train_line
from gptcraft.train.config import TrainConfig


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


@pytest.mark.parametrize("native_bf16, expected", [(True, "bfloat16"), (False, "float16")])
def test_dtype_auto_counts_only_native_bf16(monkeypatch, native_bf16, expected):
    # A V100 or T4 answers True with emulation counted and False without.
    monkeypatch.setattr(
        torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation or native_bf16
    )
    assert hardware.resolve_dtype("auto", "cuda") == expected
    assert hardware.resolve_dtype("auto", "cpu") == "float32"


@pytest.mark.parametrize(
    "name, dtype, peak",
    [("NVIDIA H100 80GB HBM3", "bfloat16", 989e12), ("NVIDIA H100 PCIe", "bfloat16", 756e12),
     ("NVIDIA H100 NVL", "float16", 835e12), ("NVIDIA H100 80GB HBM3", "float32", 495e12),
     ("NVIDIA L40", "bfloat16", 181e12), ("NVIDIA L40S", "bfloat16", 362e12), ("NVIDIA L4", "bfloat16", 121e12),
     ("NVIDIA A100-SXM4-80GB", "float32", 156e12), ("Tesla V100-SXM2-16GB", "float16", 125e12),
     ("NVIDIA GeForce RTX 4090", "bfloat16", 165e12), ("NVIDIA GH200 480GB", "bfloat16", 989e12),
     ("NVIDIA H800", "float32", 495e12), ("NVIDIA H800 PCIe", "bfloat16", 756e12),
     ("Some Future GPU", "bfloat16", None)],
)  # fmt: skip
def test_gpu_peak_by_name_and_dtype(monkeypatch, name, dtype, peak):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    assert hardware.peak_flops("cuda:0", dtype) == peak


def test_cpu_peak_keeps_the_best_of_its_calibration_runs_then_stops_measuring(monkeypatch, tmp_path):
    cache = tmp_path / "cpu_peak_calibration.json"
    # (one thread, all threads or None on a busy machine) per process
    figures = [(50e9, 100e9), (60e9, None), (50e9, 120e9), (50e9, 90e9), (50e9, 110e9), (50e9, 95e9)]
    measured = []
    monkeypatch.setattr(hardware, "calibration_measurement", lambda: measured.append(1) or figures[len(measured) - 1])

    def new_process():
        monkeypatch.setattr(hardware, "_MEASURED", {})
        return hardware.cpu_peak(cache)

    # The busy run uses its own figure and does not count: five idle runs make the calibration.
    assert [new_process() for _ in range(6)] == [100e9, 100e9, 120e9, 120e9, 120e9, 120e9]
    assert [new_process() for _ in range(3)] == [120e9] * 3 and len(measured) == hardware.CALIBRATION_RUNS + 1
    [entry] = json.loads(cache.read_text()).values()
    assert entry == {"flop_s": 120e9, "one_thread_flop_s": 60e9, "runs": hardware.CALIBRATION_RUNS, "tries": 6}

    cache.write_text("not json")  # a damaged cache is a new calibration; one process measures once
    figures[:] = [(50e9, 90e9)]
    measured.clear()
    assert [new_process(), hardware.cpu_peak(cache)] == [90e9, 90e9] and len(measured) == 1
    # An entry of an earlier version (no one-thread floor, maybe measured on a busy machine) is redone.
    cache.write_text(json.dumps({key: {"flop_s": 10e9, "runs": 5} for key in json.loads(cache.read_text())}))
    figures.append((50e9, 90e9))
    assert new_process() == 90e9 and len(measured) == 2
    # A machine that is always busy: the best one-thread figure, and no measuring after MAX_TRIES.
    cache.unlink()
    figures[:] = [(40e9 + i * 1e9, None) for i in range(hardware.MAX_TRIES)]
    measured.clear()
    assert [new_process() for _ in range(hardware.MAX_TRIES + 2)][-3:] == [59e9] * 3
    assert len(measured) == hardware.MAX_TRIES
    cache.unlink()
    cache.mkdir()  # unwritable: the process keeps its own figure
    figures.append((50e9, 90e9))
    assert new_process() == 90e9 and len(measured) == hardware.MAX_TRIES + 1


@pytest.mark.parametrize(
    "one, together, load, expected",
    [(90.7e9, 85.9e9, 0.2, None),  # two threads slower than one: other processes held a core
     (50e9, 95e9, 4.0, None),  # every core already busy
     (50e9, 95e9, 0.2, 95e9)],
)  # fmt: skip
def test_a_calibration_measured_on_a_busy_machine_is_dropped(monkeypatch, one, together, load, expected):
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    monkeypatch.setattr(os, "getloadavg", lambda: (load, load, load))
    monkeypatch.setattr(
        hardware, "measured_cpu_peak", lambda n=2048, repeats=5, threads=None: one if threads == 1 else together
    )
    assert hardware.calibration_measurement() == (one, expected)


def test_measuring_the_cpu_peak_leaves_the_random_streams_alone():
    """Only calibration runs measure: a run's dropout masks must not depend on whether it did."""
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    assert hardware.measured_cpu_peak(n=64, repeats=1) > 0
    assert torch.equal(torch.rand(3), expected)


def test_mfu_above_100_percent_is_flagged():
    row = {"iter": 10, "loss": 2.0, "lr": 1e-3, "ms_per_iter": 5.0, "tokens_per_s": 1000.0, "mfu": 1.2}
    assert (
        f"cannot be: the peak it is measured against is too low; on a CPU, delete {hardware.cpu_peak_cache()}"
        in train_line(row, None)
    )
    assert "cannot be" not in train_line({**row, "mfu": 0.4}, None)


def test_single_process_sets_its_cuda_device(monkeypatch):
    chosen = []
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    monkeypatch.delenv("RANK", raising=False)
    assert distributed.init("cuda:1") == (distributed.Dist(), "cuda:1")
    assert chosen == ["cuda:1"]
    distributed.init("cpu")
    assert chosen == ["cuda:1"]


def test_the_process_group_waits_dist_timeout_s(monkeypatch):
    seen = {}
    monkeypatch.setattr(distributed.dist, "init_process_group", lambda **kwargs: seen.update(kwargs))
    monkeypatch.setattr(distributed.dist, "rendezvous", lambda url: iter([(distributed.dist.HashStore(), 1, 2)]))
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    d, device = distributed.init("cpu", "auto", timeout_s=3600)
    assert (d.rank, d.world_size, device) == (1, 2, "cpu")
    assert (seen["backend"], seen["rank"], seen["world_size"]) == ("gloo", 1, 2)
    assert seen["timeout"] == datetime.timedelta(seconds=3600)
    assert TrainConfig().dist_timeout_s > 600  # longer than torch's default of 10 minutes, for big saves


def test_checkpoints_are_memory_mapped_on_load(tmp_path, monkeypatch):
    torch.save({"w": torch.zeros(3)}, tmp_path / "ckpt.pt")
    calls, real = [], torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: calls.append(k) or real(*a, **k))
    load_checkpoint(tmp_path / "ckpt.pt")
    assert calls[0]["mmap"] is True and calls[0]["weights_only"] is True
