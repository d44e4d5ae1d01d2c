"""Run tracking: log.jsonl rows, the end-of-run summary, Weights & Biases (offline), the ETA and resumed logs."""

import io
import json
import math
import subprocess
import sys
import time
import types

import pytest
import torch
from conftest import ROOT, run_script, tiny_train_args

from gptcraft.errors import GptcraftError
from gptcraft.files import TEMP_PREFIX
from gptcraft.track.logfile import metric_rows, read_log, read_rows, summarize
from gptcraft.track.runlog import RunLog
from gptcraft.train.stops import GracefulStop

TOKENS_PER_ITER = 8 * 32  # tiny_train_args: batch_size 8, block_size 32, one micro-step
TRAIN_KEYS = {"loss", "val_loss", "lr", "tokens_per_s", "mfu", "grad_norm", "tokens_seen"}


@pytest.fixture(scope="module")
def wandb_run(char_data_dir, tmp_path_factory):
    """A 40-iteration run that logs to wandb offline and redraws its loss plot at every eval."""
    out_dir = tmp_path_factory.mktemp("run") / "tiny"
    args = tiny_train_args(char_data_dir, out_dir, wandb_log=True, wandb_project="gptcraft-test", plot_loss=True)
    result = run_script("train.py", *args, env={"WANDB_MODE": "offline", "WANDB_SILENT": "true"})
    return out_dir, result


def lines(out_dir):
    return [json.loads(line) for line in (out_dir / "log.jsonl").read_text().splitlines()]


def test_rows_hold_grad_norm_and_tokens_seen(wandb_run):
    out_dir, _ = wandb_run
    rows = read_log(out_dir)
    train = [r for r in rows if "loss" in r]
    evals = [r for r in rows if "val_loss" in r]
    assert [r["iter"] for r in train] == [10, 20, 30, 40]
    assert [r["iter"] for r in evals] == [0, 20, 40]
    for r in rows:
        assert r["tokens_seen"] == r["iter"] * TOKENS_PER_ITER
    for r in train:
        assert math.isfinite(r["grad_norm"]) and r["grad_norm"] > 0
    times = [r["time_s"] for r in lines(out_dir)]
    assert times == sorted(times)


def test_summary_matches_log(wandb_run):
    out_dir, result = wandb_run
    *rows, last = lines(out_dir)
    assert last["event"] == "summary"
    evals = [r for r in rows if "val_loss" in r]
    train = [r for r in rows if "loss" in r]
    best = min(evals, key=lambda r: r["val_loss"])
    assert last["best_val_loss"] == best["val_loss"] and last["best_val_iter"] == best["iter"]
    assert last["iters"] == 40 and last["tokens_seen"] == 40 * TOKENS_PER_ITER
    assert last["mean_tokens_per_s"] == pytest.approx(sum(r["tokens_per_s"] for r in train) / len(train))
    assert last["checkpoints"] == [str(out_dir / "ckpt.pt"), str(out_dir / "best.pt")]
    assert rows[-1]["time_s"] <= last["wall_time_s"]
    assert f"best val loss {best['val_loss']:.4f} at iter {best['iter']}" in result.stdout
    assert f"{40 * TOKENS_PER_ITER:,} tokens seen" in result.stdout
    assert f"checkpoint {out_dir / 'ckpt.pt'}" in result.stdout


def test_console_lines_have_eta_and_no_bar_off_a_terminal(wandb_run):
    _, result = wandb_run
    iter_lines = [line for line in result.stdout.splitlines() if line.startswith("iter ")]
    assert len(iter_lines) == 4 and all(", eta " in line and "grad norm" in line for line in iter_lines)
    assert iter_lines[-1].endswith("eta 0:00")
    assert "\r" not in result.stdout + result.stderr  # no progress bar when the output is a pipe


def test_wandb_offline_records_the_rows_and_config(wandb_run):
    out_dir, _ = wandb_run
    (run_dir,) = (out_dir / "wandb").glob("offline-run-*")
    # wandb's own reader of the run's transaction log (run-<id>.wandb), one JSON record per line.
    dump = subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(run_dir)],
                          capture_output=True, text=True, check=True, timeout=120)  # fmt: skip
    records = [json.loads(line) for line in dump.stdout.splitlines() if line.startswith("{")]
    history = [r["history"]["item"] for r in records if r["type"] == "history"]
    keys = set().union(*history)
    assert TRAIN_KEYS | {"iter", "train_loss"} <= keys
    assert [h["iter"] for h in history if "loss" in h] == [10, 20, 30, 40]
    logged = read_log(out_dir)
    assert [h["val_loss"] for h in history if "val_loss" in h] == pytest.approx(
        [r["val_loss"] for r in logged if "val_loss" in r]
    )
    (run,) = [r["run"] for r in records if r["type"] == "run"]
    assert run["project"] == "gptcraft-test" and run["display_name"] == "tiny"
    config = run["config"]["update"]
    assert config["n_layer"] == 2 and config["max_iters"] == 40 and config["wandb_log"] is True
    start = lines(out_dir)[0]
    assert start["event"] == "start" and start["wandb_id"] == run["run_id"]


def test_plot_loss_leaves_a_png(wandb_run):
    out_dir, _ = wandb_run
    assert (out_dir / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(out_dir.glob(TEMP_PREFIX + "*"))


def test_plot_loss_redraws_the_png_at_each_eval(tmp_path):
    """Each evaluation redraws the figure with the rows logged so far; a train row alone does not."""
    log = RunLog(str(tmp_path), True, start_iter=0, max_iters=20, config={"plot_loss": True})
    drawn = []
    for it, loss in ((10, 3.0), (20, 2.0)):
        log.record({"iter": it, "loss": loss, "lr": 1e-3, "ms_per_iter": 1.0, "tokens_per_s": 1.0})
        assert len(drawn) == len(list(tmp_path.glob("loss.png"))) == it // 10 - 1
        log.record({"iter": it, "train_loss": loss, "val_loss": loss + 0.1})
        drawn.append((tmp_path / "loss.png").read_bytes())
        assert drawn[-1][:8] == b"\x89PNG\r\n\x1a\n"
    log.close()
    assert drawn[0] != drawn[1]


def test_wandb_missing_fails_at_start_with_the_install_command(tmp_path, char_data_dir):
    shadow = tmp_path / "no_wandb" / "wandb"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('No module named wandb')\n")
    out_dir = tmp_path / "out"
    args = tiny_train_args(char_data_dir, out_dir, wandb_log=True)
    result = run_script("train.py", *args, check=False, env={"PYTHONPATH": f"{shadow.parent}:{ROOT}"})
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        'error: wandb_log=True needs the wandb package; install it with: pip install -e ".[wandb]"'
    ]
    assert not out_dir.exists()


def test_resumed_log_drops_rows_past_the_checkpoint_and_keeps_the_clock(tmp_path):
    path = tmp_path / "log.jsonl"
    rows = [
        {"time_s": 0.0, "event": "start", "iter": 0, "wandb_id": "abc"},
        {"time_s": 1.0, "iter": 10, "loss": 3.0},
        {"time_s": 2.0, "iter": 20, "loss": 2.5},
        {"time_s": 2.5, "iter": 20, "train_loss": 2.4, "val_loss": 2.6},
        {"time_s": 3.0, "iter": 30, "loss": 2.2},
    ]
    # A run killed while writing its last row, then resumed from its checkpoint at iter 20.
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"time_s": 3.5, "iter": 4')
    log = RunLog(str(tmp_path), True, start_iter=20, max_iters=40, resumed=True)
    log.write({"iter": 30, "loss": 2.1})
    log.close()
    text = path.read_text()
    assert '{"time_s": 3.5, "iter": 4\n' in text  # the broken line is kept, on its own line
    kept = read_log(str(tmp_path))
    assert [(r["iter"], r.get("loss")) for r in kept] == [(10, 3.0), (20, 2.5), (20, None), (30, 2.1)]
    start = read_rows(str(path))[-2]
    assert start["event"] == "start" and start["iter"] == 20 and start["time_s"] >= 3.0


def test_truncated_line_is_skipped_with_a_warning(tmp_path, capsys):
    path = tmp_path / "log.jsonl"
    path.write_text('{"iter": 10, "loss": 3.0}\n{"iter": 20, "lo')
    assert metric_rows(read_rows(str(path))) == [{"iter": 10, "loss": 3.0}]
    assert "line 2 is incomplete" in capsys.readouterr().err


def test_summary_of_an_empty_run():
    summary = summarize([])
    assert summary["iters"] == 0 and summary["best_val_loss"] is None and summary["mean_tokens_per_s"] is None


def test_summary_skips_a_diverged_val_loss():
    rows = [{"iter": 0, "val_loss": 4.0}, {"iter": 10, "val_loss": 2.0}, {"iter": 20, "val_loss": math.nan}]
    summary = summarize(rows)
    assert (summary["best_val_loss"], summary["best_val_iter"], summary["iters"]) == (2.0, 10, 20)
    assert "full_val_loss" not in summary  # only runs with --full_val=True have one
    summary = summarize([{"iter": 10, "val_loss": 2.0}, {"iter": 20, "val_loss": 1.9, "full_val_loss": 1.95}])
    assert summary["full_val_loss"] == 1.95 and summary["best_val_iter"] == 20


def test_summary_means_are_over_the_rows_that_have_the_figure():
    """A run resumed on a device of unknown peak logs mfu null from there on: the mean MFU is over
    the rows that have one; the mean pace over every train row."""
    rows = [{"iter": 10, "loss": 3.0, "tokens_per_s": 100.0, "mfu": 0.2},
            {"iter": 20, "loss": 2.9, "tokens_per_s": 200.0, "mfu": 0.4},
            {"iter": 30, "loss": 2.8, "tokens_per_s": 600.0, "mfu": None}]  # fmt: skip
    summary = summarize(rows)
    assert summary["mean_mfu"] == pytest.approx(0.3) and summary["mean_tokens_per_s"] == pytest.approx(300.0)


def test_eta_from_the_wall_time_per_iteration(tmp_path, capsys):
    log = RunLog(str(tmp_path), True, start_iter=100, max_iters=400)
    # The first logged step of a session (a resumed one here) goes by its own pace: start-up,
    # compiling and a first evaluation are left out.
    assert log.eta(110, ms_per_iter=50.0) == pytest.approx(0.05 * 290)
    log.record({"iter": 110, "loss": 2.0, "lr": 1e-3, "ms_per_iter": 50.0, "tokens_per_s": 1.0})
    assert "eta 0:14" in capsys.readouterr().out
    assert log.eta_anchor[1] == 110
    # From there on, the mean wall time per iteration since that step, evaluations included.
    log.eta_anchor = (time.time() - 5.0, 110)
    assert log.eta(210, ms_per_iter=1.0) == pytest.approx(5.0 / 100 * 190, rel=0.05)
    log.close()


def test_other_ranks_report_nothing(tmp_path, capsys):
    log = RunLog(str(tmp_path), False, start_iter=0, max_iters=10, config={"wandb_log": True, "plot_loss": True})
    log.record({"iter": 1, "loss": 1.0, "lr": 1e-3, "ms_per_iter": 1.0, "tokens_per_s": 1.0})
    log.print("hello")
    assert log.summary([], 0, 0) is None
    log.close()
    assert not list(tmp_path.iterdir()) and capsys.readouterr().out == ""


def test_ms_per_iter_counts_the_steps_since_an_evaluation_not_before_it(char_data_dir, tmp_path, monkeypatch):
    """Every step takes one second on a fake clock and evaluations none: every logged row says
    1000 ms/iter, also where an evaluation fell between two logged steps."""
    from gptcraft.train import loop
    from gptcraft.train import schedule as schedule_module

    clock, schedule = [0.0], loop.learning_rate

    def one_second_per_step(cfg, it):
        clock[0] += 1.0
        return schedule(cfg, it)

    monkeypatch.setattr(loop, "learning_rate", one_second_per_step)
    for module in (loop, schedule_module):  # the loop's clock and the one stamping the end of each step
        monkeypatch.setattr(module, "time", types.SimpleNamespace(time=lambda: clock[0]))
    loop.main(tiny_train_args(char_data_dir, tmp_path, max_iters=8, eval_interval=3, log_interval=2))
    steps = [r for r in read_log(str(tmp_path)) if "loss" in r]
    assert [(r["iter"], r["ms_per_iter"]) for r in steps] == [(2, 1000.0), (4, 1000.0), (6, 1000.0), (8, 1000.0)]


class FakeTerminal(io.StringIO):
    def isatty(self):
        return True


def test_bar_on_a_terminal_keeps_lines_above_it(tmp_path, monkeypatch, capsys):
    terminal = FakeTerminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    log = RunLog(str(tmp_path), True, start_iter=0, max_iters=20)
    assert log.bar is not None
    for _ in range(10):
        log.step()
    log.record({"iter": 10, "loss": 2.5, "lr": 1e-3, "ms_per_iter": 3.0, "tokens_per_s": 1000.0, "grad_norm": 0.5})
    log.close()
    assert "10/20" in terminal.getvalue()  # the bar, on stderr
    (line,) = [line for line in capsys.readouterr().out.splitlines() if line.startswith("iter")]
    assert line.startswith("iter 10: loss 2.5000, lr 1.00e-03, 3.0 ms/iter, 1,000 tok/s, grad norm 0.500, eta ")


def test_a_run_wandb_refuses_stops_with_its_reason_and_keeps_the_log(tmp_path, monkeypatch):
    class WandbError(Exception):
        pass

    def init(**kwargs):
        raise WandbError("No API key configured. Use `wandb login` to log in.")

    fake = types.SimpleNamespace(init=init, errors=types.SimpleNamespace(Error=WandbError))
    monkeypatch.setitem(sys.modules, "wandb", fake)
    (tmp_path / "log.jsonl").write_text('{"iter": 10, "loss": 3.0}\n')
    with pytest.raises(GptcraftError, match="wandb login.*WANDB_MODE=offline"):
        RunLog(str(tmp_path), True, start_iter=10, max_iters=20, resumed=True, config={"wandb_log": True})
    assert (tmp_path / "log.jsonl").read_text() == '{"iter": 10, "loss": 3.0}\n'


def test_a_resumed_run_continues_the_same_wandb_run(tmp_path, monkeypatch):
    calls = []

    def init(**kwargs):  # a new run gets a new id: run1, run2, ...
        calls.append(kwargs)
        run_id = kwargs["id"] or f"run{len(calls)}"
        return types.SimpleNamespace(id=run_id, define_metric=lambda *a, **k: None, finish=lambda: None)

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=init, errors=types.SimpleNamespace()))
    config = {"wandb_log": True, "wandb_project": "p"}
    RunLog(str(tmp_path), True, start_iter=0, max_iters=20, config=config).close()
    RunLog(str(tmp_path), True, start_iter=10, max_iters=20, resumed=True, config=config).close()
    assert [(c["id"], c["resume"]) for c in calls] == [(None, None), ("run1", "allow")]
    assert [r["wandb_id"] for r in lines(tmp_path) if r.get("event") == "start"] == ["run1", "run1"]


# Training FLOPs per token of tiny_train_args' model, no biases (test_model.py counts SMALL's the
# same way): 6N with N = 2 blocks of 12 * 32^2 + 2 * 32 (LayerNorm gains) = 12,352, ln_f 32 and the
# 65 x 32 token embedding = 26,816, plus 12 L C T for attention.
TINY_FLOPS_PER_TOKEN = 6 * 26_816 + 12 * 2 * 32 * 32


def test_logged_mfu_is_the_models_flops_at_the_logged_pace_over_the_peak(char_data_dir, tmp_path, monkeypatch):
    from gptcraft.train import loop

    monkeypatch.setattr(loop.hardware, "peak_flops", lambda device, dtype: 1e9)
    loop.main(tiny_train_args(char_data_dir, tmp_path, max_iters=4, eval_interval=4, log_interval=2, eval_iters=1))
    *rows, summary = lines(tmp_path)
    steps = [r for r in rows if "loss" in r]
    assert len(steps) == 2
    for r in steps:
        assert r["mfu"] == pytest.approx(TINY_FLOPS_PER_TOKEN * r["tokens_per_s"] / 1e9)
    assert summary["mean_mfu"] == pytest.approx(sum(r["mfu"] for r in steps) / 2)


def test_mfu_is_null_where_the_peak_is_unknown(char_data_dir, tmp_path, monkeypatch, capsys):
    from gptcraft.train import loop

    monkeypatch.setattr(loop.hardware, "peak_flops", lambda device, dtype: None)
    loop.main(tiny_train_args(char_data_dir, tmp_path, max_iters=4, eval_interval=4, log_interval=2, eval_iters=1))
    *rows, summary = lines(tmp_path)
    steps = [r for r in rows if "loss" in r]
    assert len(steps) == 2 and all(r["mfu"] is None and r["tokens_per_s"] > 0 for r in steps)
    assert summary["mean_mfu"] is None and summary["mean_tokens_per_s"] > 0
    printed = [line for line in capsys.readouterr().out.splitlines() if line.startswith(("iter ", "  mean"))]
    assert len(printed) == 3 and not any("mfu" in line for line in printed)


def test_resume_after_a_killed_run(char_data_dir, tmp_path, capfd):
    from gptcraft.train import loop

    out_dir = tmp_path / "run"
    loop.main(tiny_train_args(char_data_dir, out_dir, max_iters=20))
    # The run went on past its checkpoint at iter 20 and was killed while writing a row.
    with open(out_dir / "log.jsonl", "a") as f:
        f.write('{"time_s": 99.0, "iter": 30, "loss": 9.9}\n{"time_s": 99.5, "it')
    capfd.readouterr()
    loop.main(tiny_train_args(char_data_dir, out_dir, max_iters=40, init_from="resume", plot_loss=True))
    assert capfd.readouterr().err.count("is incomplete, corrupt") == 1  # reported once, at the start
    rows = read_log(out_dir)
    assert [r["iter"] for r in rows if "loss" in r] == [10, 20, 30, 40]
    assert all(r["loss"] < 9 for r in rows if "loss" in r)  # the killed run's row at 30 is gone
    assert [r["iter"] for r in rows if "val_loss" in r] == [0, 20, 40]
    assert [r["time_s"] for r in rows] == sorted(r["time_s"] for r in rows) and rows[-1]["time_s"] > 99.0
    summary = read_rows(str(out_dir / "log.jsonl"), quiet=True)[-1]
    assert summary["event"] == "summary" and summary["iters"] == 40 and summary["tokens_seen"] == 40 * TOKENS_PER_ITER
    assert (out_dir / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_an_evaluation_only_run_hides_no_rows(tmp_path):
    rows = [{"time_s": 0.0, "event": "start", "iter": 0}, {"time_s": 1.0, "iter": 10, "loss": 3.0},
            {"time_s": 2.0, "iter": 20, "loss": 2.5}]  # fmt: skip
    (tmp_path / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    log = RunLog(str(tmp_path), True, start_iter=10, max_iters=20, resumed=True, config={"eval_only": True})
    log.record({"iter": 10, "train_loss": 2.9, "val_loss": 3.1})
    assert log.summary([], 0, 0) is None
    log.close()
    assert [r["iter"] for r in read_log(str(tmp_path))] == [10, 20, 10]


class StopAfter(GracefulStop):
    """A GracefulStop whose signal arrives while the trainer asks for the n-th time (twice a
    step, once before each evaluation batch)."""

    def __init__(self, n):  # no handlers: the loop only reads `requested`
        self.asked, self.n = 0, n

    @property
    def requested(self):
        self.asked += 1
        return "SIGTERM" if self.asked >= self.n else None


def test_summary_of_a_stopped_run_counts_every_step_done(char_data_dir, tmp_path):
    from gptcraft.config import parse_config
    from gptcraft.system.distributed import Dist
    from gptcraft.train import loop
    from gptcraft.train.config import TrainConfig

    cfg = parse_config(TrainConfig, tiny_train_args(char_data_dir, tmp_path, max_iters=100, eval_interval=1000))
    loop.train(cfg, Dist(), "cpu", StopAfter(37))  # after the first evaluation's 10 batches, about 13 steps
    rows = read_rows(str(tmp_path / "log.jsonl"))
    stopped_at = torch.load(tmp_path / "ckpt.pt", weights_only=True)["iter_num"]
    assert stopped_at % 10 and [r["iter"] for r in rows if "loss" in r][-1] == stopped_at // 10 * 10
    assert rows[-1]["event"] == "summary" and rows[-1]["iters"] == stopped_at
    assert rows[-1]["tokens_seen"] == stopped_at * TOKENS_PER_ITER


def test_a_resumed_run_reads_past_rows_of_the_wrong_types(tmp_path, capsys):
    from test_plot import BAD_ROWS

    good = b'{"time_s": 3.0, "event": "start", "iter": 0}\n'
    (tmp_path / "log.jsonl").write_bytes(good + b"\n".join(BAD_ROWS) + b"\n")
    log = RunLog(str(tmp_path), enabled=True, start_iter=4, max_iters=8, resumed=True, config={"wandb_log": False})
    log.close()
    assert time.time() - log.t0 >= 3.0  # the clock carries on from the last good row
    assert capsys.readouterr().err.count("of the wrong types") == len(BAD_ROWS)
