"""End to end on CPU: train, checkpoint, sample; accumulation over micro-batches; a missing dataset."""

import json
import os

import numpy as np
import pytest
import torch
from conftest import run_here, run_script, tiny_train_args

from gptcraft.data.batches import WindowSampler
from gptcraft.errors import GptcraftError
from gptcraft.system.distributed import Dist
from gptcraft.train import loop, setup


def read_log(out_dir):
    return [json.loads(line) for line in (out_dir / "log.jsonl").read_text().splitlines()]


def test_short_run_learns_checkpoints_and_samples(char_data_dir, tmp_path):
    out = tmp_path / "run"
    result = run_script("train.py", *tiny_train_args(char_data_dir, out, max_iters=60, eval_interval=30))
    assert "config: out_dir=" in result.stdout  # the resolved config is printed at start
    rows = read_log(out)
    evals = [r for r in rows if "val_loss" in r]
    assert [r["iter"] for r in evals] == [0, 30, 60]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 0.8  # from ~ln(65) = 4.17 to well below
    steps = [r for r in rows if "loss" in r]
    assert [r["iter"] for r in steps] == [10, 20, 30, 40, 50, 60]
    assert all(r["time_s"] >= 0 and r["tokens_per_s"] > 0 for r in steps)

    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert {"model", "model_args", "optimizer", "iter_num", "best_val_loss", "config"} <= ckpt.keys()
    assert ckpt["iter_num"] == 60 and ckpt["config"]["max_iters"] == 60
    assert ckpt["best_val_loss"] == min(r["val_loss"] for r in evals)

    meta = json.loads((out / "meta.json").read_text())
    sample = run_script("sample.py", f"--out_dir={out}", "--device=cpu", "--num_samples=2",
                        "--max_new_tokens=100", "--start=ROMEO:")  # fmt: skip
    texts = [t.strip("\n") for t in sample.stdout.split("---------------") if t.strip()]
    assert len(texts) == 2
    for text in texts:
        assert text.startswith("ROMEO:") and len(text) == len("ROMEO:") + 100
        assert set(text) <= set(meta["chars"])


def one_window_at_a_time(self, g):
    """WindowSampler.windows where window i of the stream depends on i alone: batch g of size B
    holds windows g*B .. g*B+B-1, so two batches of 8 are one batch of 16 cut in two."""
    tokens = self.files[0].memmap()
    first = g * self.batch_size
    starts = [np.random.default_rng([self.stream, i]).integers(len(tokens) - self.block_size)
              for i in range(first, first + self.batch_size)]  # fmt: skip
    return np.stack([tokens[s : s + self.block_size + 1] for s in starts]).astype(np.int64)


def test_accumulating_k_micro_batches_equals_one_batch_k_times_as_large(char_data_dir, tmp_path, monkeypatch):
    """One process: the gradient of a step is the mean over its micro-batches (loss / accum)."""
    monkeypatch.setattr(WindowSampler, "windows", one_window_at_a_time)
    runs = {}
    for batch_size, accum in ((16, 1), (4, 4)):
        out = tmp_path / f"{batch_size}x{accum}"
        loop.main(tiny_train_args(char_data_dir, out, batch_size=batch_size, gradient_accumulation_steps=accum,
                                  max_iters=3, eval_interval=3, eval_iters=1, log_interval=1))  # fmt: skip
        steps = [r for r in read_log(out) if "loss" in r]
        runs[accum] = ([(r["loss"], r["grad_norm"]) for r in steps], torch.load(out / "ckpt.pt")["model"])
    (one, one_weights), (four, four_weights) = runs[1], runs[4]
    assert len(one) == len(four) == 3
    for (loss, norm), (loss4, norm4) in zip(one, four, strict=True):
        assert loss4 == pytest.approx(loss, rel=1e-5) and norm4 == pytest.approx(norm, rel=1e-4)
    for name, tensor in one_weights.items():
        torch.testing.assert_close(four_weights[name], tensor, rtol=0, atol=1e-5)


def test_the_step_applies_gradients_clipped_to_grad_clip(char_data_dir, tmp_path, monkeypatch):
    """The optimizer steps with the gradient scaled down to norm grad_clip; the log keeps the norm before."""
    at_step, make_optimizer = [], setup.make_optimizer

    def recording(model, cfg, *where):
        optimizer = make_optimizer(model, cfg, *where)
        params = [p for group in optimizer.param_groups for p in group["params"]]

        def record_norm(*_):
            at_step.append(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params])).item())

        optimizer.register_step_pre_hook(record_norm)
        return optimizer

    monkeypatch.setattr(setup, "make_optimizer", recording)
    out = tmp_path / "run"
    loop.main(tiny_train_args(char_data_dir, out, max_iters=3, eval_interval=3, eval_iters=1, log_interval=1,
                              grad_clip=0.05))  # fmt: skip
    logged = [r["grad_norm"] for r in read_log(out) if "loss" in r]
    assert len(logged) == len(at_step) == 3 and min(logged) > 0.05  # every step is clipped
    assert at_step == pytest.approx([0.05] * 3, rel=1e-4)


def test_missing_dataset_offline_names_the_prepare_command(tmp_path, monkeypatch):
    import urllib.error
    import urllib.request

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    cfg = loop.TrainConfig(dataset="shakespeare_char", data_dir=str(tmp_path))
    try:
        setup.ensure_dataset(cfg, Dist())
    except GptcraftError as e:
        assert "--input" in str(e) and "prepare/shakespeare_char.py" in str(e)
    else:
        raise AssertionError("expected a GptcraftError")
    assert not os.path.exists(tmp_path / "shakespeare_char" / "meta.json")


def test_unprepared_dataset_is_a_clear_error(tmp_path):
    result = run_here("train.py", f"--data_dir={tmp_path}", "--dataset=nothing_here", "--device=cpu")
    assert result.returncode == 2
    assert "dataset 'nothing_here' not found" in result.stderr and "Traceback" not in result.stderr
