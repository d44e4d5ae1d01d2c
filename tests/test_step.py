"""The training step leaves the device's queue alone: it reads nothing back on the host, its flags
are read one step late, and Muon masks a NaN step on the device, orthogonalizes matrices of one
shape as a batch and shares them out over DDP ranks."""

import json
import time

import pytest
import torch
from conftest import run_script, tiny_train_args

from gptcraft.config import ConfigError
from gptcraft.runs import checkpoint
from gptcraft.train import loop, optimizer
from gptcraft.train.config import TrainConfig

HOST_READS = ("item", "tolist", "__bool__", "__float__", "__int__")


def test_one_process_stopped_during_step_k_saves_after_it(char_data_dir, tmp_path, monkeypatch, capsys):
    """docs/training-at-scale.md: one process needs no agreement with others, so a stop raised in
    step 7 (iterations count from 0) saves at iteration 8, with every step done logged."""
    stops, schedule = [], loop.learning_rate

    class RecordedStop(loop.GracefulStop):
        def __enter__(self):
            stops.append(self)
            return super().__enter__()

    def signal_in_step_7(cfg, it):
        if it == 7:
            stops[-1].requested = "SIGTERM"
        return schedule(cfg, it)

    monkeypatch.setattr(loop, "GracefulStop", RecordedStop)
    monkeypatch.setattr(loop, "learning_rate", signal_in_step_7)
    out = tmp_path / "run"
    loop.main(tiny_train_args(char_data_dir, out, max_iters=20, eval_interval=20, log_interval=1))
    assert "stopped by SIGTERM at iteration 8" in capsys.readouterr().out
    assert checkpoint.load_checkpoint(out / "ckpt.pt")["iter_num"] == 8
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in rows if "loss" in r] == list(range(1, 9))  # the last queued step too


def test_the_host_reads_a_steps_flags_once_the_next_step_is_queued(char_data_dir, tmp_path, monkeypatch):
    """docs/training-at-scale.md: after step k + 1 is launched the host reads step k's flags, never
    those of the step it has just launched (on a GPU that read would wait for it)."""
    seen, real_step, real_read, after_step = [], loop.train_step, loop.read_flags, [False]

    def step(*args):
        after_step[0] = True
        return real_step(*args)

    def read(job, run):
        if after_step[0] and run.flags.pending is not None:
            seen.append((run.iter_num, run.flags.pending[3]["iter"]))  # (steps done, the step read)
        after_step[0] = False
        return real_read(job, run)

    monkeypatch.setattr(loop, "train_step", step)
    monkeypatch.setattr(loop, "read_flags", read)
    loop.main(tiny_train_args(char_data_dir, tmp_path / "run", max_iters=6, eval_interval=6, log_interval=1))
    assert seen == [(k, k - 1) for k in range(2, 7)]


@pytest.mark.parametrize("name", ["adamw", "muon"])
def test_the_step_reads_nothing_back_on_the_host(name, char_data_dir, tmp_path, monkeypatch):
    """docs/gpu-acceptance.md: no .item(), .tolist() or bool() of a tensor inside the step, log
    steps included (on a GPU each would wait for the work just queued)."""
    reads, real_step = [], loop.train_step

    def counting_step(*args):
        real = {n: getattr(torch.Tensor, n) for n in HOST_READS}
        for n in HOST_READS:
            monkeypatch.setattr(
                torch.Tensor, n, lambda self, *a, _n=n, **k: reads.append(_n) or real[_n](self, *a, **k)
            )
        try:
            return real_step(*args)
        finally:
            for n in HOST_READS:
                monkeypatch.setattr(torch.Tensor, n, real[n])

    monkeypatch.setattr(loop, "train_step", counting_step)
    out = tmp_path / "run"
    loop.main(tiny_train_args(char_data_dir, out, max_iters=6, eval_interval=6, log_interval=1, optimizer=name))
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in rows if "loss" in r] == list(range(1, 7))
    assert reads == []


def muon_pair(world_size=1, rank=0, shapes=((64, 32), (64, 32), (32, 96))):
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    opt = optimizer.Muon(params, lr=0.02, weight_decay=0.1, ns_dtype=torch.float32, world_size=world_size, rank=rank)
    return params, opt


def test_muon_masks_a_skipped_step_on_the_device():
    params, opt = muon_pair()
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step(skip=torch.tensor(False))
    before = [p.detach().clone() for p in params], [opt.state[p]["momentum_buffer"].clone() for p in params]
    for p in params:
        p.grad = torch.full_like(p, float("nan"))
    opt.step(skip=torch.tensor(True))
    assert all(torch.equal(p, b) for p, b in zip(params, before[0], strict=True))
    assert all(torch.equal(opt.state[p]["momentum_buffer"], b) for p, b in zip(params, before[1], strict=True))


def test_muon_orthogonalizes_a_batch_as_it_does_each_matrix():
    torch.manual_seed(0)
    batch = torch.randn(3, 64, 32)
    one_by_one = torch.stack([optimizer.orthogonalize(g, (3.4445, -4.7750, 2.0315), 5, 1e-7, torch.float32)
                              for g in batch])  # fmt: skip
    together = optimizer.orthogonalize(batch, (3.4445, -4.7750, 2.0315), 5, 1e-7, torch.float32)
    torch.testing.assert_close(together, one_by_one, rtol=0, atol=1e-5)


def test_muon_refuses_fsdp_before_any_compute():
    with pytest.raises(ConfigError, match="optimizer=muon does not run under fsdp=True"):
        TrainConfig(optimizer="muon", fsdp=True)


def test_muon_under_ddp_on_two_processes_matches_one_process(char_data_dir, tmp_path):
    """docs/training-at-scale.md: two DDP ranks (gloo) share Muon's orthogonalizations (each takes
    one of every pair of equal-shaped matrices and all-gathers the other) and train as one process
    does; the losses agree to within 1e-4 (measured on a 2-core CPU: bit for bit, 0.0)."""
    run = {"max_iters": 10, "eval_interval": 10, "log_interval": 1, "gradient_accumulation_steps": 2,
           "optimizer": "muon", "learning_rate": 3e-3, "min_lr": 3e-4}  # fmt: skip
    one, two = tmp_path / "one", tmp_path / "two"
    loop.main(tiny_train_args(char_data_dir, one, **run))
    args = tiny_train_args(char_data_dir, two, backend="gloo", **run)
    torchrun = ("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py")
    result = run_script(*torchrun, *args, env={"OMP_NUM_THREADS": "1"})
    assert "2 process(es)" in result.stdout
    a, b = losses(one), losses(two)
    assert list(a) == list(b) == list(range(1, 11))
    assert all(abs(a[i] - b[i]) < 1e-4 for i in a), (a, b)


def losses(out_dir):
    rows = [json.loads(line) for line in (out_dir / "log.jsonl").read_text().splitlines()]
    return {r["iter"]: r["loss"] for r in rows if "loss" in r}


def test_the_pace_after_a_checkpoint_leaves_the_save_out(char_data_dir, tmp_path, monkeypatch):
    """A save due to checkpoint_interval restarts the step clock: the next logged ms/iter is the
    steps' own. The save is made to take 1000 s of a faked clock, 200,000 ms for each of the 5
    steps after it were it counted."""
    real_save, real_time, skipped = loop.resume.save_latest, time.time, [0.0]
    monkeypatch.setattr(time, "time", lambda: real_time() + skipped[0])

    def slow_save(*args):
        skipped[0] += 1000
        return real_save(*args)

    monkeypatch.setattr(loop.resume, "save_latest", slow_save)
    out = tmp_path / "run"
    loop.main(tiny_train_args(char_data_dir, out, max_iters=10, eval_interval=10, log_interval=5,
                              checkpoint_interval=5))  # fmt: skip
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in rows if "loss" in r] == [5, 10]
    assert [r["ms_per_iter"] for r in rows if r.get("iter") == 10 and "loss" in r][0] < 100_000


def test_hellaswag_rows_come_in_a_few_widths():
    """HellaSwag in training pads its rows to a few widths (a compiled model recompiles per width)."""
    from gptcraft.evaluate.hellaswag import padded_width

    widths = {padded_width(w, 1024) for w in range(2, 1026)}
    assert widths == {65, 129, 257, 513, 1025}
    assert padded_width(30, 1024) == 65 and padded_width(66, 1024) == 129 and padded_width(300, 256) == 257
