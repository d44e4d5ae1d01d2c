"""What a run does with its out_dir: init_from=auto continues the same run and refuses another,
a new run never overwrites one, one run at a time (the lock), only gptcraft's own temporaries are
cleared, and nothing is written through a symbolic link."""

import json
import os
import shutil
import socket
import subprocess
import sys
import time

import pytest
from conftest import ROOT as ROOT_DIR
from conftest import tiny_train_args
from test_resume import ENV, start, wait_for_line

from gptcraft import files
from gptcraft.files import LinkError
from gptcraft.runs import checkpoint, lock
from gptcraft.runs.lock import OutDirError, RunLock
from gptcraft.runs.start import decide_start
from gptcraft.track import plot
from gptcraft.track.runlog import RunLog
from gptcraft.train import loop
from gptcraft.train.config import TrainConfig

SHORT = {"max_iters": 4, "eval_interval": 2, "eval_iters": 1, "log_interval": 1}


def config(out, **overrides):
    """A TrainConfig as a dict, as decide_start reads it."""
    from dataclasses import asdict

    return asdict(TrainConfig(out_dir=str(out), device="cpu", compile=False, **overrides))


def snapshot(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_auto_starts_new_in_an_empty_out_dir_and_continues_only_the_same_run(tmp_path):
    assert decide_start(config(tmp_path)) == "new"
    checkpoint.save_checkpoint(tmp_path / "ckpt.pt", {"config": config(tmp_path)})
    # Keys that may change on resume may differ; model, data and seed may not.
    assert decide_start(config(tmp_path, max_iters=9, eval_interval=7, dropout=0.1)) == "resume"
    with pytest.raises(
        OutDirError,
        match=r"holds another run \(ckpt.pt\): seed=1337 \(this run: 5\), n_layer=12 "
        r"\(this run: 3\); continue it with --init_from=resume, .*--overwrite=True",
    ):
        decide_start(config(tmp_path, n_layer=3, seed=5))
    assert decide_start(config(tmp_path, seed=5, overwrite=True)) == "new"
    with pytest.raises(OutDirError, match="holds ckpt.pt of an earlier run and init_from=scratch starts a new one"):
        decide_start(config(tmp_path, init_from="scratch"))
    with pytest.raises(OutDirError, match="cannot go with init_from=resume"):
        decide_start(config(tmp_path, init_from="resume", overwrite=True))


def test_auto_starts_new_beside_a_best_pt_of_this_run_without_a_resume_checkpoint(tmp_path):
    """best.pt alone (the resume checkpoint deleted) holds no optimizer or loader state to resume
    from: the same run starts afresh rather than resume, another run is still refused."""
    checkpoint.save_checkpoint(tmp_path / "best.pt", {"config": config(tmp_path)})
    assert decide_start(config(tmp_path)) == "new"
    with pytest.raises(OutDirError, match=r"holds another run \(best.pt\): seed=1337 \(this run: 5\)"):
        decide_start(config(tmp_path, seed=5))


def test_a_new_run_into_a_used_out_dir_leaves_it_byte_identical(char_data_dir, tmp_path):
    out = tmp_path / "out"
    loop.main(tiny_train_args(char_data_dir, out, **SHORT))
    before = snapshot(out)
    assert sorted(before) == ["best.pt", "ckpt.pt", "log.jsonl", "meta.json"]  # the lock is gone too
    for other in ({"init_from": "scratch"}, {"seed": 7}):
        with pytest.raises(OutDirError, match="--overwrite=True"):
            loop.main(tiny_train_args(char_data_dir, out, **{**SHORT, **other}))
        assert snapshot(out) == before
    # The same command again: the run is finished, nothing to do, nothing touched.
    assert loop.main(tiny_train_args(char_data_dir, out, **SHORT)) is None
    assert snapshot(out) == before
    # overwrite=True: a new run, and nothing of the old one left (best.pt of the old run would mislead sample.py).
    loop.main(tiny_train_args(char_data_dir, out, seed=7, overwrite=True, **{**SHORT, "max_iters": 1}))
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in rows if r.get("event") == "start"] == [0]
    assert checkpoint.load_checkpoint(out / "ckpt.pt")["config"]["seed"] == 7
    assert not (out / "best.pt").exists() or checkpoint.load_checkpoint(out / "best.pt")["config"]["seed"] == 7


def dead_pid():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def write_lock(out, pid, host, job=None):
    (out / lock.LOCK).write_text(json.dumps({"pid": pid, "host": host, "job": job, "since": 0}))


def test_the_lock_refuses_a_live_owner_and_takes_over_a_dead_one(tmp_path, monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    here = socket.gethostname()
    with RunLock(tmp_path):
        with pytest.raises(OutDirError, match=rf"is in use by another run \(pid {os.getpid()} on {here}, since"):
            RunLock(tmp_path).__enter__()
    assert not (tmp_path / lock.LOCK).exists()  # released on exit
    write_lock(tmp_path, dead_pid(), here)
    with RunLock(tmp_path):
        assert json.loads((tmp_path / lock.LOCK).read_text())["pid"] == os.getpid()
    # On another host a pid says nothing: refused, unless the lock is this very job's, before a requeue.
    write_lock(tmp_path, 1, "elsewhere", job="41")
    with pytest.raises(OutDirError, match=r"on elsewhere, .*; if that run is dead, delete .*\.gptcraft-lock"):
        RunLock(tmp_path).__enter__()
    monkeypatch.setenv("SLURM_JOB_ID", "41")
    with RunLock(tmp_path):
        pass


@pytest.mark.parametrize("theirs, ours", [(None, None), (None, "41"), ("41", "42")])
def test_a_lock_from_another_host_is_refused_unless_it_is_this_very_job(tmp_path, monkeypatch, theirs, ours):
    """docs/cluster.md: only the same scheduler job (before a requeue or a torchrun restart on
    another host) takes over a lock from another host; two runs without a job id are not one job."""
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    if ours is not None:
        monkeypatch.setenv("TORCHELASTIC_RUN_ID", ours)
    write_lock(tmp_path, 1, "elsewhere", job=theirs)
    with pytest.raises(OutDirError, match="is in use by another run"):
        RunLock(tmp_path).__enter__()
    write_lock(tmp_path, 1, "elsewhere", job="42")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "42")  # torchrun's id of this job, the same after a restart
    with RunLock(tmp_path):
        assert json.loads((tmp_path / lock.LOCK).read_text())["host"] == socket.gethostname()


HOLD = """
import sys, time
from gptcraft.runs.lock import RunLock
with RunLock(sys.argv[1]):
    print("held", flush=True)
    time.sleep(float(sys.argv[2]))
"""


def hold_lock(out, seconds=600.0, at=None):
    """A child process holding out's lock for `seconds` (from wall time `at`, when given)."""
    code = HOLD if at is None else f"import time; time.sleep(max(0, {at} - time.time()))\n{HOLD}"
    return subprocess.Popen([sys.executable, "-c", code, str(out), str(seconds)], cwd=ROOT_DIR, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip


def test_the_lock_tells_a_live_owner_from_a_dead_one_by_its_flock_not_its_pid(tmp_path):
    """A container's entrypoint is pid 1 and its host name the container's: what its lock records
    says nothing about it in the next container. The flock does: refused while the owner lives,
    taken over once it was killed with SIGKILL."""
    owner = hold_lock(tmp_path)
    assert owner.stdout.readline() == "held\n"
    record = json.loads((tmp_path / lock.LOCK).read_text())
    (tmp_path / lock.LOCK).write_text(json.dumps({**record, "pid": 1, "host": "container-a"}))
    with pytest.raises(OutDirError, match=r"in use by another run \(pid 1 on container-a, .*delete .*gptcraft-lock"):
        RunLock(tmp_path).__enter__()
    owner.kill()
    owner.wait()
    with RunLock(tmp_path):
        assert json.loads((tmp_path / lock.LOCK).read_text())["pid"] == os.getpid()


def test_runs_that_find_one_stale_lock_at_once_never_both_take_it(tmp_path):
    write_lock(tmp_path, dead_pid(), socket.gethostname())
    at = time.time() + 3  # the children start together, after their imports
    children = [hold_lock(tmp_path, seconds=2, at=at) for _ in range(4)]
    outputs = [child.communicate(timeout=60)[0] for child in children]
    assert sum(out == "held\n" for out in outputs) == 1, outputs
    assert sum("is in use by another run" in out for out in outputs) == 3, outputs


@pytest.mark.parametrize("record", ['{"pid": 1e400, "host": "h"}', '{"pid": 99999999999999999999999, "host": "h"}',
                                    '{"pid": "1", "host": "h"}', "[]", "\x00\xff"])  # fmt: skip
def test_a_damaged_lock_is_one_line_that_says_how_to_clear_it(tmp_path, record):
    (tmp_path / lock.LOCK).write_text(record, errors="surrogateescape")
    with pytest.raises(OutDirError, match=rf"the lock {tmp_path}/.gptcraft-lock is damaged; if no run uses out_dir "
                                          rf"{tmp_path}, delete {tmp_path}/.gptcraft-lock"):  # fmt: skip
        RunLock(tmp_path).__enter__()


def in_container(name, *command):
    """`command` as pid 1 of a fresh pid namespace with host name `name`, as a container entrypoint
    runs; killing the returned process kills it with SIGKILL."""
    return ["unshare", "--pid", "--fork", "--mount-proc", "--uts", "--kill-child", "sh", "-c",
            'hostname "$0" && exec "$@"', name, *command]  # fmt: skip


@pytest.mark.skipif(subprocess.run(["unshare", "--pid", "--fork", "--uts", "true"], capture_output=True).returncode != 0
                    if shutil.which("unshare") else True, reason="needs unshare (root or user namespaces)")  # fmt: skip
def test_a_run_that_was_pid_1_resumes_after_kill_9_in_the_next_container(char_data_dir, tmp_path):
    out = tmp_path / "run"
    args = tiny_train_args(char_data_dir, out, max_iters=100000, eval_interval=2, eval_iters=1, log_interval=1)
    first = subprocess.Popen(in_container("container-a", sys.executable, "train.py", *args), cwd=ROOT_DIR, env=ENV,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    wait_for_line(first, "eval 2")
    wait_for_line(first, "iter 3")  # ckpt.pt of iteration 2 is written
    first.kill()
    first.wait()
    assert json.loads((out / lock.LOCK).read_text())["pid"] == 1  # the lock a kill -9 leaves behind
    resume = tiny_train_args(char_data_dir, out, max_iters=4, eval_interval=2, eval_iters=1, init_from="resume")
    second = subprocess.run(in_container("container-b", sys.executable, "train.py", *resume), cwd=ROOT_DIR, env=ENV,
                            capture_output=True, text=True, timeout=300)  # fmt: skip
    assert second.returncode == 0, second.stdout + second.stderr
    assert checkpoint.load_checkpoint(out / "ckpt.pt")["iter_num"] == 4
    assert not (out / lock.LOCK).exists()


def test_a_second_run_into_a_busy_out_dir_is_refused_and_the_first_finishes(char_data_dir, tmp_path):
    out = tmp_path / "busy"
    args = tiny_train_args(char_data_dir, out, **{**SHORT, "max_iters": 100000, "eval_interval": 100000})
    first = start(args)
    wait_for_line(first, "iter ")
    with pytest.raises(OutDirError, match=rf"out_dir {out} is in use by another run \(pid {first.pid} on"):
        loop.main(args)
    first.terminate()  # SIGTERM: the first run saves and exits 0
    rest, _ = first.communicate(timeout=120)
    assert first.returncode == 0, rest
    assert checkpoint.load_checkpoint(out / "ckpt.pt")["iter_num"] >= 1
    assert not (out / lock.LOCK).exists()


def test_only_gptcraft_temporaries_are_cleared(tmp_path):
    mine = files.temp_path(str(tmp_path / "ckpt.pt"))
    assert os.path.basename(mine).startswith(".gptcraft-tmp-ckpt.pt-")
    open(mine, "w").close()
    for name in ("notes.tmp.txt", "results.tmp.csv", "ckpt.pt.tmp.123"):
        (tmp_path / name).write_text("the user's")
    checkpoint.clear_killed_saves(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["ckpt.pt.tmp.123", "notes.tmp.txt", "results.tmp.csv"]


def test_nothing_is_written_through_a_link(tmp_path):
    target = tmp_path / "precious.txt"
    target.write_text("precious")
    out = tmp_path / "out"
    out.mkdir()
    # Whole files are written fresh and renamed over the link: the link goes, its target stays.
    for name in ("ckpt.pt", "loss.png", "log.jsonl"):
        (out / name).symlink_to(target)
    checkpoint.save_checkpoint(out / "ckpt.pt", {"iter_num": 1})
    (out / "log.jsonl").unlink()
    (out / "log.jsonl").write_text(json.dumps({"iter": 0, "val_loss": 1.0, "train_loss": 1.0}) + "\n")
    plot.draw([str(out)], str(out / "loss.png"), quiet=True)
    assert not (out / "ckpt.pt").is_symlink() and not (out / "loss.png").is_symlink()
    # log.jsonl: a new run replaces a link there; a resumed run, which appends, refuses it.
    (out / "log.jsonl").unlink()
    (out / "log.jsonl").symlink_to(target)
    with pytest.raises(LinkError, match=r"log.jsonl is a symbolic link; gptcraft does not write through links"):
        RunLog(str(out), True, 5, 10, resumed=True)
    RunLog(str(out), True, 0, 10).close()
    assert not (out / "log.jsonl").is_symlink()
    assert target.read_text() == "precious"


def test_checkpoint_interval_saves_without_evaluating(char_data_dir, tmp_path, capsys):
    out = tmp_path / "interval"
    loop.main(tiny_train_args(char_data_dir, out, checkpoint_interval=2,
                              **{**SHORT, "max_iters": 5, "eval_interval": 1000}))  # fmt: skip
    printed = capsys.readouterr().out
    assert "saved ckpt.pt in" in printed and f"{out} at iter 2\n" in printed and f"{out} at iter 4\n" in printed
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in rows if "val_loss" in r] == [0, 5]  # no evaluation at the saves
    loop.main(tiny_train_args(char_data_dir, tmp_path / "minutes", checkpoint_minutes=1e-9,
                              **{**SHORT, "max_iters": 3, "eval_interval": 1000}))  # fmt: skip
    printed = capsys.readouterr().out
    # A step's flags are read one step later (no host sync per step): the deadline passed at
    # step 1 is seen, and saved, at step 2; the last step saves after its evaluation.
    assert all(f"at iter {i}\n" in printed for i in (2, 3))
