"""Stopping a run by hand: the first Ctrl-C or SIGTERM says what it will do and stops within a
step or an evaluation batch, on one process or under torchrun; a second Ctrl-C exits with one line."""

import signal

import pytest
import torch
from conftest import tiny_train_args
from test_distributed import start_torchrun
from test_resume import start, wait_for_line

from gptcraft.config import run_cli
from gptcraft.track.logfile import read_log
from gptcraft.train import loop

# An evaluation of a million batches per split: a stop that waited for its end would never come.
ENDLESS_EVAL = {"max_iters": 20, "eval_interval": 10, "eval_iters": 10**6, "log_interval": 1}


def test_ctrl_c_during_an_evaluation_says_so_and_stops_at_the_next_batch(char_data_dir, tmp_path):
    out = tmp_path / "run"
    proc = start(tiny_train_args(char_data_dir, out, **ENDLESS_EVAL))
    wait_for_line(proc, "evaluating 1000000 batches per split")  # printed as the evaluation begins
    proc.send_signal(signal.SIGINT)
    rest, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, rest
    notice = "Ctrl-C: stopping after this step or evaluation batch, then saving; Ctrl-C again to stop now"
    assert rest.index(notice) < rest.index("stopped by SIGINT at iteration 0")
    assert "Traceback" not in rest
    assert torch.load(out / "ckpt.pt", weights_only=True)["evaluated"] is False  # the resumed run evaluates
    assert not [r for r in read_log(out) if "val_loss" in r]
    # The same command continues: it evaluates at iteration 0 (now briefly) and trains on.
    loop.main(tiny_train_args(char_data_dir, out, **{**ENDLESS_EVAL, "eval_iters": 2}))
    assert [r["iter"] for r in read_log(out) if "val_loss" in r] == [0, 10, 20]


def test_sigterm_under_torchrun_stops_the_workers_in_the_middle_of_an_evaluation(char_data_dir, tmp_path):
    out = tmp_path / "run"
    launcher = start_torchrun(tiny_train_args(char_data_dir, out, backend="gloo", **ENDLESS_EVAL))
    wait_for_line(launcher, "evaluating 1000000 batches per split")
    launcher.send_signal(signal.SIGTERM)  # torchrun passes it on to both workers
    rest, _ = launcher.communicate(timeout=90)
    assert "stopped by SIGTERM at iteration 0" in rest, rest
    assert "exitcode  : 1" not in rest and "ChildFailedError" not in rest  # the workers exited 0
    assert torch.load(out / "ckpt.pt", weights_only=True)["iter_num"] == 0


def test_a_second_ctrl_c_exits_with_one_line(capsys):
    def interrupted():
        raise KeyboardInterrupt  # what the second SIGINT raises wherever the run is

    with pytest.raises(SystemExit) as exit_:
        run_cli(interrupted)
    assert exit_.value.code == 130
    assert capsys.readouterr().err.strip() == "interrupted by Ctrl-C: stopped at once"
