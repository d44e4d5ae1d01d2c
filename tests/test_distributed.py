"""Several processes through torchrun on CPU (gloo): DDP and FSDP2 see the same batches as one
process, so their loss curves agree; FSDP2 checkpoints through torch.distributed.checkpoint; a run
resumes from either kind of checkpoint on another number of processes; stop signals reach every rank."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, run_script, tiny_train_args
from test_resume import assert_same_run
from test_tracking import TINY_FLOPS_PER_TOKEN

from gptcraft.errors import GptcraftError
from gptcraft.model import GPT, GPTConfig
from gptcraft.runs import checkpoint
from gptcraft.system import distributed, hardware
from gptcraft.train import loop
from gptcraft.train.parallelize import parallelize

# gradient_accumulation_steps is global: 2 micro-batches per step, one on each of 2 ranks. At a
# learning rate of 1e-2 AdamW grows FSDP's float32 rounding differences past 1e-3 by iteration 20.
RUN = {"max_iters": 20, "eval_interval": 10, "log_interval": 1, "gradient_accumulation_steps": 2, "dropout": 0.0,
       "learning_rate": 3e-3, "min_lr": 3e-4}  # fmt: skip


def losses(out_dir):
    rows = [json.loads(line) for line in (out_dir / "log.jsonl").read_text().splitlines()]
    return {r["iter"]: r["loss"] for r in rows if "loss" in r}


def torchrun(*args):
    return run_script("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py", *args,
                      env={"OMP_NUM_THREADS": "1"})  # fmt: skip


@pytest.fixture(scope="module")
def one_process(char_data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("one")
    loop.main(tiny_train_args(char_data_dir, out, **RUN))
    return out


@pytest.fixture(scope="module")
def ddp_run(char_data_dir, tmp_path_factory):
    """Two DDP processes through torchrun (gloo), uninterrupted: (out_dir, the launcher's result)."""
    out = tmp_path_factory.mktemp("ddp") / "run"
    return out, torchrun(*tiny_train_args(char_data_dir, out, backend="gloo", **RUN))


@pytest.fixture(scope="module")
def fsdp_at_10(char_data_dir, tmp_path_factory):
    """Two FSDP processes stopped at iteration 10: a ckpt.dcp/ to resume from (copy it first)."""
    out = tmp_path_factory.mktemp("fsdp") / "run"
    torchrun(*tiny_train_args(char_data_dir, out, fsdp=True, **{**RUN, "max_iters": 10}))
    return out


def assert_same_curve(a, b, iters=range(1, 21)):
    assert list(a) == list(b) == list(iters)
    for it in a:
        assert abs(a[it] - b[it]) < 1e-4, (it, a[it], b[it])


def test_ddp_two_processes_match_one_process(one_process, ddp_run):
    out, result = ddp_run
    assert "2 process(es)" in result.stdout
    assert_same_curve(losses(one_process), losses(out))


def test_fsdp_two_processes_train_save_sharded_and_resume(one_process, fsdp_at_10, char_data_dir, tmp_path):
    out = tmp_path / "fsdp"
    shutil.copytree(fsdp_at_10, out)
    # A torch.distributed.checkpoint directory with one shard file per rank; no ckpt.pt.
    assert (out / "ckpt.dcp" / ".metadata").exists() and not (out / "ckpt.pt").exists()
    assert len(list((out / "ckpt.dcp").glob("*.distcp"))) == 2
    # The second half recomputes activations in backward (the same numbers, less memory) and
    # scores the whole val split at the end, each rank running as many forwards as the other.
    result = torchrun(*tiny_train_args(char_data_dir, out, fsdp=True, activation_checkpointing=True,
                                       full_val=True, init_from="resume", **RUN))  # fmt: skip
    assert "full val loss" in result.stdout
    assert "resumed from" in result.stdout and "at iteration 10" in result.stdout
    assert_same_curve(losses(one_process), losses(out))
    # best.pt holds the full weights, gathered from both shards, for sampling on one device.
    best = torch.load(out / "best.pt", weights_only=True)
    reference = torch.load(one_process / "best.pt", weights_only=True)
    assert best["iter_num"] == reference["iter_num"] == 20
    for name, tensor in reference["model"].items():
        torch.testing.assert_close(best["model"][name], tensor, rtol=0, atol=1e-4)


def test_a_sharded_checkpoint_is_read_only_by_an_fsdp_run(fsdp_at_10, char_data_dir, tmp_path):
    """ckpt.dcp/'s index is a pickle: a plain resume refuses it, naming --fsdp=True, and leaves it as it was."""
    out = tmp_path / "one"
    shutil.copytree(fsdp_at_10, out)
    with pytest.raises(GptcraftError, match=r"only the FSDP checkpoint ckpt.dcp/.*resume it with --fsdp=True"):
        loop.main(tiny_train_args(char_data_dir, out, init_from="resume", **RUN))
    assert (out / "ckpt.dcp" / ".metadata").exists() and not (out / "ckpt.pt").exists()


def test_a_full_checkpoint_resumes_under_fsdp_on_two_processes(one_process, char_data_dir, tmp_path):
    out = tmp_path / "full"
    loop.main(tiny_train_args(char_data_dir, out, **{**RUN, "max_iters": 10}))
    result = torchrun(*tiny_train_args(char_data_dir, out, fsdp=True, init_from="resume", **RUN))
    assert "saved by 1 process(es), this run has 2" in result.stdout
    assert_same_curve(losses(one_process), losses(out))
    assert len(list((out / "ckpt.dcp").glob("*.distcp"))) == 2 and not (out / "ckpt.pt").exists()


def test_one_micro_batch_per_step_resumes_on_two_processes_from_the_next_batch(char_data_dir, tmp_path):
    """gradient_accumulation_steps=1: one process draws one micro-batch per step, two draw two
    (one each). Resumed on two, the run goes on from the batch the checkpoint was to draw next:
    none drawn twice, none skipped, every token counted once."""
    out = tmp_path / "run"
    one = {**RUN, "gradient_accumulation_steps": 1, "max_iters": 10}
    loop.main(tiny_train_args(char_data_dir, out, **one))
    result = torchrun(*tiny_train_args(char_data_dir, out, backend="gloo", **{**one, "max_iters": 14,
                                                                               "eval_interval": 14}))  # fmt: skip
    assert "each does one micro-batch, 2 per step" in result.stdout
    assert checkpoint.load_checkpoint(out / "ckpt.pt")["loader"]["next_batch"] == 10 + 4 * 2
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    seen = {r["iter"]: r["tokens_seen"] for r in rows if "loss" in r}
    assert [seen[i] // (8 * 32) for i in range(9, 15)] == [9, 10, 12, 14, 16, 18]


def test_a_missing_shard_of_a_sharded_checkpoint_is_named(fsdp_at_10, char_data_dir, tmp_path):
    out = tmp_path / "torn"
    shutil.copytree(fsdp_at_10, out)
    (out / "ckpt.dcp" / "__1_0.distcp").unlink()
    # What an FSDP resume reads (the model's tensors), read here in one process.
    model = GPT(GPTConfig(**checkpoint.load_sharded_state(out / "ckpt.dcp")["model_args"]))
    with pytest.raises(GptcraftError, match=r"ckpt.dcp could not be read \(.*No such file.*__1_0.distcp"):
        checkpoint.load_sharded(out / "ckpt.dcp", {"model": model.state_dict()})
    left = sorted(os.listdir(out / "ckpt.dcp"))
    assert left == [".gptcraft-folder", ".metadata", "__0_0.distcp", "train_state.pt"]  # left as it was


def start_torchrun(args):
    """torchrun with two train.py workers in the background, its output (both streams) piped."""
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             "train.py", *args], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT),
                             "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)  # fmt: skip


def rank_pid(launcher_pid, rank):
    """The pid of the torchrun worker with RANK=rank, found through /proc."""
    for child in Path(f"/proc/{launcher_pid}/task/{launcher_pid}/children").read_text().split():
        environ = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
        if f"RANK={rank}".encode() in environ:
            return int(child)
    raise AssertionError(f"no worker of rank {rank}")


def torchrun_at_iter(args, it):
    """A 2-process training run under torchrun, returned once it has logged iteration `it`."""
    launcher = start_torchrun(args)
    for line in launcher.stdout:
        if line.startswith(f"iter {it}:"):
            break
    return launcher


def test_sigterm_to_one_rank_stops_every_rank_at_the_same_step(char_data_dir, tmp_path):
    out = tmp_path / "stopped"
    args = tiny_train_args(char_data_dir, out, **{**RUN, "max_iters": 500, "eval_interval": 1000})
    launcher = torchrun_at_iter(args, 3)
    os.kill(rank_pid(launcher.pid, 1), signal.SIGTERM)  # rank 0 gets no signal: it learns it from rank 1
    rest, _ = launcher.communicate(timeout=120)
    assert launcher.returncode == 0, rest
    assert "stopped by a signal on another rank at iteration" in rest
    assert 3 <= torch.load(out / "ckpt.pt", weights_only=True)["iter_num"] < 500


def test_sigterm_to_the_launcher_stops_every_rank_which_saves_and_exits_0(char_data_dir, tmp_path):
    out = tmp_path / "stopped"
    args = tiny_train_args(char_data_dir, out, **{**RUN, "max_iters": 500, "eval_interval": 1000})
    launcher = torchrun_at_iter(args, 3)
    launcher.send_signal(signal.SIGTERM)  # torchrun passes it on to both workers
    rest, _ = launcher.communicate(timeout=120)
    assert launcher.returncode == 1, rest  # torchrun reports the signal; the workers exited 0
    stopped_at = int(re.search(r"stopped by SIGTERM at iteration (\d+)", rest).group(1))
    assert re.findall(r"saved ckpt.pt in .* at iter (\d+)", rest) == [str(stopped_at)]  # one save, by all ranks
    assert torch.load(out / "ckpt.pt", weights_only=True)["iter_num"] == stopped_at
    assert "exitcode  : 1" not in rest and "ChildFailedError" not in rest


def test_torchrun_restarts_after_a_killed_worker_resume_and_end_bit_identical(ddp_run, char_data_dir, tmp_path):
    # ddp_run's command and a save every 2 steps (saves change nothing in the run); init_from=auto,
    # the default, resumes after the restart.
    straight, _ = ddp_run
    out = tmp_path / "restarted"
    args = tiny_train_args(char_data_dir, out, backend="gloo", **RUN, checkpoint_interval=2)
    launcher = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                                 "--max-restarts=1", "train.py", *args], cwd=ROOT,
                                env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"},
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    for line in launcher.stdout:
        if line.startswith("iter 7:"):  # after the save at iteration 6
            break
    os.kill(rank_pid(launcher.pid, 1), signal.SIGKILL)
    rest, _ = launcher.communicate(timeout=300)
    assert launcher.returncode == 0, rest
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    starts = [(r["iter"], r["resumed"], r["restart"]) for r in rows if r.get("event") == "start"]
    assert starts[0] == (0, False, "0") and len(starts) == 2, starts
    assert starts[1][0] in range(6, 20, 2) and starts[1][1:] == (True, "1"), starts
    assert_same_run(straight, out)


def test_activation_checkpointing_gives_the_same_run(char_data_dir, tmp_path):
    runs = {}
    for ac in (False, True):
        loop.main(tiny_train_args(char_data_dir, tmp_path / str(ac), activation_checkpointing=ac,
                                   **{**RUN, "max_iters": 10, "dropout": 0.1}))  # fmt: skip
        runs[ac] = torch.load(tmp_path / str(ac) / "ckpt.pt", weights_only=True)["model"]
    for name, tensor in runs[False].items():
        assert torch.equal(tensor, runs[True][name]), name


def test_even_share_gives_every_rank_the_same_number_of_items():
    shares = [distributed.even_share(5, distributed.Dist(rank=r, world_size=2)) for r in (0, 1)]
    assert shares == [[(0, True), (2, True), (4, True)], [(1, True), (3, True), (0, False)]]


def test_batch_settings_must_divide_across_ranks():
    with pytest.raises(GptcraftError, match=r"gradient_accumulation_steps \(3\) must be a multiple .* \(2\)"):
        distributed.local_accumulation(3, distributed.Dist(world_size=2))
    assert distributed.local_accumulation(8, distributed.Dist(world_size=4)) == 2
    # README: fewer than the processes, each runs one micro-batch (the step holds world_size of them)
    assert distributed.local_accumulation(1, distributed.Dist(world_size=2)) == 1
    assert distributed.local_accumulation(3, distributed.Dist(world_size=4)) == 1
    assert distributed.local_accumulation(2, distributed.Dist(world_size=2)) == 1


def test_fewer_micro_batches_than_processes_run_one_each_and_mfu_is_per_process(char_data_dir, tmp_path):
    """README: with gradient_accumulation_steps below the number of processes each runs one micro-batch,
    so a step holds world_size of them. The logged MFU is one process's: the run's pace over the
    number of processes, against one device's peak (fixed here through the calibration file)."""
    cache = tmp_path / "cache"
    (cache / "gptcraft").mkdir(parents=True)
    key = f"{hardware.cpu_model()} | 1 threads | torch {torch.__version__}"  # OMP_NUM_THREADS=1 below
    runs = hardware.CALIBRATION_RUNS
    calibrated = {key: {"flop_s": 1e9, "one_thread_flop_s": 1e9, "runs": runs, "tries": runs}}
    (cache / "gptcraft" / "cpu_peak_calibration.json").write_text(json.dumps(calibrated))
    out = tmp_path / "run"
    args = tiny_train_args(char_data_dir, out, backend="gloo", max_iters=4, eval_interval=4, eval_iters=1,
                           log_interval=2, gradient_accumulation_steps=1)  # fmt: skip
    result = run_script("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py", *args,
                        env={"OMP_NUM_THREADS": "1", "XDG_CACHE_HOME": str(cache)})  # fmt: skip
    assert "each does one micro-batch, 2 per step" in result.stdout
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert [r["tokens_seen"] for r in steps] == [2 * 2 * 8 * 32, 4 * 2 * 8 * 32]  # 2 micro-batches of 8 x 32
    for r in steps:
        assert r["mfu"] == pytest.approx(TINY_FLOPS_PER_TOKEN * r["tokens_per_s"] / 2 / 1e9)


def test_nccl_needs_cuda_and_fsdp_needs_torchrun():
    with pytest.raises(GptcraftError, match="backend nccl needs CUDA"):
        distributed.resolve_backend("nccl", "cpu")
    assert distributed.resolve_backend("auto", "cpu") == "gloo"
    with pytest.raises(GptcraftError, match="launch with torchrun"):
        parallelize(torch.nn.Module(), distributed.Dist(), "cpu", fsdp=True)


@pytest.mark.cuda
def test_ddp_on_nccl_with_bf16_compile_and_activation_checkpointing(char_data_dir, tmp_path):
    n = min(torch.cuda.device_count(), 2)
    out = tmp_path / "nccl"
    args = tiny_train_args(char_data_dir, out, device="cuda", dtype="bfloat16", compile=True, backend="nccl",
                           activation_checkpointing=True, **{**RUN, "gradient_accumulation_steps": n})  # fmt: skip
    run_script("-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}", "train.py", *args)
    curve = losses(out)
    assert curve[20] < curve[1] - 0.3


@pytest.mark.cuda
def test_fsdp_on_gpu_with_activation_checkpointing(char_data_dir, tmp_path):
    out = tmp_path / "fsdp_gpu"
    args = tiny_train_args(char_data_dir, out, device="cuda", dtype="bfloat16", fsdp=True,
                           activation_checkpointing=True, **RUN)  # fmt: skip
    run_script("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", "train.py", *args)
    curve = losses(out)
    assert curve[20] < curve[1] - 0.3


def test_a_directory_other_nodes_cannot_see_is_refused(tmp_path, monkeypatch):
    """Rank 1 on another node without the shared filesystem: it does not see rank 0's marker."""
    monkeypatch.setattr(distributed, "barrier", lambda d: None)
    monkeypatch.setattr(distributed, "all_gather", lambda obj, d: [obj, False if isinstance(obj, bool) else obj])
    with pytest.raises(GptcraftError, match=r"out_dir .* is not visible to rank\(s\) 1: every node needs it"):
        distributed.check_shared(str(tmp_path), distributed.Dist(world_size=2), "out_dir")
    assert list(tmp_path.iterdir()) == []  # the marker is removed
    monkeypatch.setattr(distributed, "all_gather", lambda obj, d: [obj, obj])
    distributed.check_shared(str(tmp_path), distributed.Dist(world_size=2), "out_dir")
