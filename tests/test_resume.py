"""Exact resume on CPU: a run stopped at a checkpoint (by max_iters, SIGTERM or kill -9, even in
the middle of a save) and resumed ends with the same weights, bit for bit, as one that never stopped."""

import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import ROOT, tiny_train_args

from gptcraft.files import TEMP_PREFIX
from gptcraft.track.logfile import read_log
from gptcraft.train import loop
from gptcraft.train.stops import GracefulStop

# Dropout on, so that a resumed run also needs the RNG states; two micro-steps per update.
COMMON = {"max_iters": 30, "eval_interval": 10, "dropout": 0.1, "gradient_accumulation_steps": 2, "log_interval": 5}


def assert_same_run(a_dir, b_dir):
    """Same weights, optimizer state, scaler and progress in the two runs' ckpt.pt, bit for bit."""
    a = torch.load(a_dir / "ckpt.pt", weights_only=True)
    b = torch.load(b_dir / "ckpt.pt", weights_only=True)
    assert a["iter_num"] == b["iter_num"] and a["best_val_loss"] == b["best_val_loss"]
    assert a["scaler"] == b["scaler"]
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name
    for name, state in a["optimizer"]["state"].items():
        for key, value in state.items():
            assert torch.equal(value, b["optimizer"]["state"][name][key]), (name, key)


@pytest.mark.parametrize("dtype, stops", [("float32", (10,)), ("bfloat16", (10,)), ("float16", (20,))])
def test_stopped_at_a_checkpoint_and_resumed_is_bit_identical(char_data_dir, tmp_path, dtype, stops):
    straight = tmp_path / "straight"
    loop.main(tiny_train_args(char_data_dir, straight, dtype=dtype, **COMMON))
    for stop in stops:
        out = tmp_path / f"stopped_at_{stop}"
        loop.main(tiny_train_args(char_data_dir, out, dtype=dtype, **{**COMMON, "max_iters": stop}))
        assert torch.load(out / "ckpt.pt", weights_only=True)["iter_num"] == stop
        loop.main(tiny_train_args(char_data_dir, out, dtype=dtype, init_from="resume", **COMMON))
        assert_same_run(straight, out)
    if dtype == "float16":  # the grad scaler's state went through the checkpoint
        assert torch.load(straight / "ckpt.pt", weights_only=True)["scaler"]["_growth_tracker"] > 0


# Checkpoints every 2 steps, so that kills often land in or near a save.
KILL_RUN = {**COMMON, "max_iters": 80, "eval_interval": 2, "eval_iters": 1, "log_interval": 1}
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def start(args, code=None):
    """train.py in a child process (or `code`, which runs loop.main on sys.argv), stdout piped."""
    command = ["-c", code, *args] if code else ["train.py", *args]
    return subprocess.Popen([sys.executable, *command], cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)  # fmt: skip


def wait_for_line(proc, prefix, timeout=120):
    """Read the child's output until a line starts with `prefix`; return that line."""
    deadline = time.time() + timeout
    for line in proc.stdout:
        if line.startswith(prefix):
            return line
        assert time.time() < deadline, f"no line starting with {prefix!r}"
    raise AssertionError(f"the run ended before printing a line starting with {prefix!r}")


@pytest.fixture
def one_thread():
    """In-process runs use one thread like the child processes (OMP_NUM_THREADS=1), so that their
    floating-point sums are done in the same order."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# torch.save writes half a checkpoint, then the process is killed: the worst moment of a save.
DIE_IN_SAVE = """
import os, signal, sys, torch
from gptcraft.train import loop
real_save = torch.save
def save_then_die(obj, f, *args, **kwargs):
    real_save(obj, f, *args, **kwargs)
    f.truncate(f.tell() // 2)
    f.flush()
    os.kill(os.getpid(), signal.SIGKILL)
torch.save = save_then_die
loop.main(sys.argv[1:])
"""


def test_kill_9_at_random_moments_then_resume_is_bit_identical(char_data_dir, tmp_path, one_thread):
    straight, out = tmp_path / "straight", tmp_path / "killed"
    loop.main(tiny_train_args(char_data_dir, straight, **KILL_RUN))

    resume_args = tiny_train_args(char_data_dir, out, init_from="resume", **KILL_RUN)
    rng = random.Random(4)
    for args, after in ((tiny_train_args(char_data_dir, out, **KILL_RUN), "saved "), (resume_args, "iter ")):
        proc = start(args)
        wait_for_line(proc, after)  # after the first save, so that the next run can resume
        time.sleep(rng.uniform(0.0, 0.1))
        proc.kill()
        proc.wait()
    proc = start(resume_args, code=DIE_IN_SAVE)  # killed half-way through writing a checkpoint
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    assert any(name.startswith(TEMP_PREFIX) for name in os.listdir(out))  # the torn temporary, never ckpt.pt

    loop.main(resume_args)
    assert not any(name.startswith(TEMP_PREFIX) for name in os.listdir(out))  # cleaned up
    assert_same_run(straight, out)


def test_sigterm_finishes_the_step_saves_and_exits_0_then_resumes_exactly(char_data_dir, tmp_path, one_thread):
    straight, out = tmp_path / "straight", tmp_path / "stopped"
    args = {**KILL_RUN, "eval_interval": 100}  # no checkpoint but the one the signal asks for
    loop.main(tiny_train_args(char_data_dir, straight, **args))
    proc = start(tiny_train_args(char_data_dir, out, **args))
    wait_for_line(proc, "iter 3:")
    proc.send_signal(signal.SIGTERM)
    rest, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, rest
    assert "stopped by SIGTERM at iteration" in rest
    stopped_at = torch.load(out / "ckpt.pt", weights_only=True)["iter_num"]
    assert 3 <= stopped_at < args["max_iters"]
    loop.main(tiny_train_args(char_data_dir, out, init_from="resume", **args))
    assert_same_run(straight, out)


def test_a_second_ctrl_c_stops_at_once():
    """The first SIGINT only asks the loop to stop; the second raises KeyboardInterrupt there and then."""
    # Python's own Ctrl-C handler, set explicitly: pytest started with SIGINT ignored (a background
    # job of a non-interactive shell) would hand the run an ignored SIGINT, and nothing would stop it.
    original = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with GracefulStop() as stop:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.01)  # the handler runs in the main thread between bytecodes
            assert stop.requested == "SIGINT"
            with pytest.raises(KeyboardInterrupt):
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(1)
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, original)


def test_a_stop_at_the_last_step_leaves_the_final_evaluation_to_the_resumed_run(char_data_dir, tmp_path, monkeypatch):
    """A stop signal saves before the evaluation due at that step; the resumed run does it and
    saves after it, so it ends as the run that never stopped."""
    stops, schedule = [], loop.learning_rate

    class RecordedStop(loop.GracefulStop):
        def __enter__(self):
            stops.append(self)
            return super().__enter__()

    def signal_in_the_last_step(cfg, it):
        if it == cfg.max_iters - 1:
            stops[-1].requested = "SIGTERM"
        return schedule(cfg, it)

    straight, out = tmp_path / "straight", tmp_path / "stopped"
    args = {**COMMON, "max_iters": 20}
    loop.main(tiny_train_args(char_data_dir, straight, **args))
    monkeypatch.setattr(loop, "GracefulStop", RecordedStop)
    monkeypatch.setattr(loop, "learning_rate", signal_in_the_last_step)
    loop.main(tiny_train_args(char_data_dir, out, **args))
    assert [r["iter"] for r in read_log(out) if "val_loss" in r] == [0, 10]  # stopped before the last one
    loop.main(tiny_train_args(char_data_dir, out, init_from="resume", **args))
    assert [r["iter"] for r in read_log(out) if "val_loss" in r] == [0, 10, 20]
    assert_same_run(straight, out)


@pytest.mark.cuda
def test_float16_on_gpu_carries_the_grad_scaler_through_a_resume(char_data_dir, tmp_path):
    args = {**COMMON, "device": "cuda", "dtype": "float16"}
    straight, out = tmp_path / "straight", tmp_path / "resumed"
    loop.main(tiny_train_args(char_data_dir, straight, **args))
    loop.main(tiny_train_args(char_data_dir, out, **{**args, "max_iters": 10}))
    loop.main(tiny_train_args(char_data_dir, out, init_from="resume", **args))
    a = torch.load(straight / "ckpt.pt", weights_only=True)
    b = torch.load(out / "ckpt.pt", weights_only=True)
    assert a["scaler"] == b["scaler"] and a["scaler"]["scale"] > 0
    assert abs(a["best_val_loss"] - b["best_val_loss"]) < 1e-2  # GPU kernels need not be bitwise reproducible
