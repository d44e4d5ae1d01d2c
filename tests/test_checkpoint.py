"""Checkpoint files: atomic writes that survive a full disk, a refused pickle payload, a torn
sharded save, and a divergence guard that never lets NaN weights over a good checkpoint."""

import errno
import os
import re

import pytest
import torch
from conftest import tiny_train_args

from gptcraft import model
from gptcraft.errors import GptcraftError
from gptcraft.runs import checkpoint
from gptcraft.runs.checkpoint import CheckpointError
from gptcraft.train import loop

RUN = {"max_iters": 30, "eval_interval": 10, "log_interval": 5}


class Payload:
    """Runs code when unpickled: what a malicious checkpoint carries."""

    def __reduce__(self):
        return (os.system, ("echo pwned",))


@pytest.mark.parametrize("always, saved", [(True, [5, 10, 15, 20]), (False, [5, 15])])
def test_always_save_checkpoint_false_saves_only_when_val_loss_improves(char_data_dir, tmp_path, monkeypatch,
                                                                         capsys, always, saved):  # fmt: skip
    val_losses = iter([4.0, 3.0, 3.5, 2.5, 2.8])  # at iters 0, 5, 10, 15, 20: better at 5 and 15 only
    monkeypatch.setattr(loop, "estimate_loss", lambda *args: {"train": 1.0, "val": next(val_losses)})
    out = tmp_path / "run"
    loop.main(tiny_train_args(char_data_dir, out, max_iters=20, eval_interval=5, always_save_checkpoint=always))
    saves = re.findall(r"saved ckpt.pt( and best.pt)? in .* at iter (\d+)", capsys.readouterr().out)
    assert [int(it) for _, it in saves] == saved
    assert [int(it) for best, it in saves if best] == [5, 15]  # best.pt whenever val loss improves
    assert checkpoint.load_checkpoint(out / "ckpt.pt")["iter_num"] == saved[-1]
    assert checkpoint.load_checkpoint(out / "best.pt")["best_val_loss"] == 2.5


def test_pickled_payload_is_refused(tmp_path):
    path = tmp_path / "ckpt.pt"
    torch.save({"model": {}, "payload": Payload()}, path)
    with pytest.raises(CheckpointError, match="not plain tensors or values, refused"):
        checkpoint.load_checkpoint(path)


def test_truncated_file_is_reported_as_corrupt(tmp_path):
    path = tmp_path / "ckpt.pt"
    checkpoint.save_checkpoint(path, {"w": torch.zeros(1000)})
    path.write_bytes(path.read_bytes()[:1500])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        checkpoint.load_checkpoint(path)


def test_disk_full_during_a_save_keeps_the_previous_checkpoint(char_data_dir, tmp_path, monkeypatch):
    out = tmp_path / "run"
    real_save = torch.save
    saves = []

    def save_until_full(obj, f, *args, **kwargs):
        saves.append(1)
        if len(saves) > 2:  # best.pt and ckpt.pt at iter 10 fit; nothing after
            f.write(b"partial")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save_until_full)
    with pytest.raises(GptcraftError, match="could not write .*No space left on device.*previous checkpoint is intact"):
        loop.main(tiny_train_args(char_data_dir, out, **RUN))
    monkeypatch.undo()
    assert checkpoint.load_checkpoint(out / "ckpt.pt")["iter_num"] == 10
    assert checkpoint.load_checkpoint(out / "best.pt")["iter_num"] == 10
    assert sorted(os.listdir(out)) == ["best.pt", "ckpt.pt", "log.jsonl", "meta.json"]  # no temporary left


def test_a_torn_sharded_save_falls_back_to_the_complete_one(tmp_path):
    # A crash between the two renames of a sharded save leaves only ckpt.dcp.old complete.
    old = tmp_path / "ckpt.dcp.old"
    old.mkdir()
    checkpoint.save_checkpoint(old / checkpoint.SHARDED_STATE, {"iter_num": 10})
    (tmp_path / "ckpt.dcp.tmp").mkdir()  # the new one, never finished
    assert checkpoint.latest_path(tmp_path, fsdp=True) == str(old)
    checkpoint.clear_killed_saves(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["ckpt.dcp.old"]


def test_a_sharded_checkpoint_with_a_damaged_index_is_reported(tmp_path):
    path = tmp_path / "ckpt.dcp"
    path.mkdir()
    (path / ".metadata").write_bytes(b"\x80\x04not a pickle")
    with pytest.raises(CheckpointError, match="ckpt.dcp is truncated or corrupt"):
        checkpoint.sharded_shapes(path)


def test_sampling_prefers_best_pt(tmp_path):
    checkpoint.save_checkpoint(tmp_path / "ckpt.pt", {})
    assert checkpoint.sampling_path(tmp_path) == str(tmp_path / "ckpt.pt")
    checkpoint.save_checkpoint(tmp_path / "best.pt", {})
    assert checkpoint.sampling_path(tmp_path) == str(tmp_path / "best.pt")


def poison_forward(monkeypatch, bad_steps=(), break_weights_at=None):
    """Make GPT's training forward return a NaN loss at the given step numbers (1-based, one
    micro-step per step), or write a NaN into the weights at step `break_weights_at`."""
    real_forward = model.GPT.forward
    calls = []

    def forward(self, idx, targets=None):
        if self.training:
            calls.append(1)
            if len(calls) == break_weights_at:
                with torch.no_grad():
                    self.lm_head.weight[0, 0] = float("nan")
        logits, loss = real_forward(self, idx, targets)
        if self.training and len(calls) in bad_steps:
            loss = loss * float("nan")
        return logits, loss

    monkeypatch.setattr(model.GPT, "forward", forward)


def test_float16_infinite_gradients_are_the_scalers_to_skip(char_data_dir, tmp_path, monkeypatch, capsys):
    """Step 5's gradients are infinite, its loss is not: the scaler skips the step and halves its
    scale; the divergence guard does not count it."""
    args = {**RUN, "dtype": "float16", "eval_interval": 100, "max_nonfinite_steps": 1}
    loop.main(tiny_train_args(char_data_dir, tmp_path / "four", **{**args, "max_iters": 4}))
    real_forward, calls = model.GPT.forward, []

    def forward(self, idx, targets=None):
        logits, loss = real_forward(self, idx, targets)
        if self.training:
            calls.append(1)
            if len(calls) == 5:
                logits.register_hook(lambda grad: torch.full_like(grad, float("inf")))
        return logits, loss

    monkeypatch.setattr(model.GPT, "forward", forward)
    loop.main(tiny_train_args(char_data_dir, tmp_path / "five", **{**args, "max_iters": 5}))
    assert "skipped step" not in capsys.readouterr().out
    four, five = (checkpoint.load_checkpoint(tmp_path / name / "ckpt.pt") for name in ("four", "five"))
    assert five["iter_num"] == 5 and five["scaler"]["scale"] == four["scaler"]["scale"] / 2
    for name, tensor in four["model"].items():  # step 5 changed nothing
        assert torch.equal(five["model"][name], tensor), name
    for key, state in four["optimizer"]["state"].items():
        for field, value in state.items():
            assert torch.equal(five["optimizer"]["state"][key][field], value), (key, field)


def test_a_few_nan_steps_are_skipped(char_data_dir, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    poison_forward(monkeypatch, bad_steps=(12, 13))
    loop.main(tiny_train_args(char_data_dir, out, max_nonfinite_steps=3, **RUN))
    printed = capsys.readouterr().out
    assert "skipped step 12: loss or gradient norm is NaN/Inf" in printed and "skipped step 13" in printed
    final = checkpoint.load_checkpoint(out / "ckpt.pt")
    assert final["iter_num"] == 30
    assert all(torch.isfinite(t).all() for t in final["model"].values())


def test_nan_in_a_row_stops_the_run_and_keeps_the_good_checkpoint(char_data_dir, tmp_path, monkeypatch):
    out = tmp_path / "run"
    poison_forward(monkeypatch, bad_steps=range(15, 100))
    with pytest.raises(GptcraftError, match=r"NaN/Inf for 3 steps in a row \(up to iteration 17\)"):
        loop.main(tiny_train_args(char_data_dir, out, max_nonfinite_steps=3, **RUN))
    assert checkpoint.load_checkpoint(out / "ckpt.pt")["iter_num"] == 10


def test_nan_weights_never_overwrite_a_checkpoint(char_data_dir, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    poison_forward(monkeypatch, break_weights_at=15)
    loop.main(tiny_train_args(char_data_dir, out, max_nonfinite_steps=100, **RUN))
    assert "checkpoint not saved at iter 20: the weights are not finite" in capsys.readouterr().out
    saved = checkpoint.load_checkpoint(out / "ckpt.pt")
    assert saved["iter_num"] == 10 and all(torch.isfinite(t).all() for t in saved["model"].values())


def test_resume_refuses_a_corrupt_checkpoint_and_leaves_it(char_data_dir, tmp_path):
    out = tmp_path / "run"
    loop.main(tiny_train_args(char_data_dir, out, **{**RUN, "max_iters": 10}))
    data = (out / "ckpt.pt").read_bytes()
    (out / "ckpt.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(GptcraftError, match="ckpt.pt is truncated or corrupt"):
        loop.main(tiny_train_args(char_data_dir, out, init_from="resume", **RUN))
    assert (out / "ckpt.pt").read_bytes() == data[: len(data) // 2]  # nothing touched


def test_the_count_of_nan_steps_in_a_row_survives_a_resume(char_data_dir, tmp_path, monkeypatch):
    out = tmp_path / "run"
    poison_forward(monkeypatch, bad_steps=(9, 10))
    loop.main(tiny_train_args(char_data_dir, out, max_nonfinite_steps=3, **{**RUN, "max_iters": 10}))
    assert checkpoint.load_checkpoint(out / "ckpt.pt")["nonfinite_in_a_row"] == 2
    poison_forward(monkeypatch, bad_steps=(1,))  # the resumed run's first step, iteration 11
    with pytest.raises(GptcraftError, match=r"NaN/Inf for 3 steps in a row \(up to iteration 11\)"):
        loop.main(tiny_train_args(char_data_dir, out, max_nonfinite_steps=3, init_from="resume", **RUN))
