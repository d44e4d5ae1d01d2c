"""End to end on CPU: train, checkpoint, sample, resume, and two processes under torchrun."""

import json
import os

import torch
from conftest import run_script, tiny_train_args

from gptcraft.errors import GptcraftError
from gptcraft.train import loop


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


def test_resume_continues_from_iter_num(char_data_dir, tmp_path):
    straight = tmp_path / "straight"
    run_script("train.py", *tiny_train_args(char_data_dir, straight, max_iters=40))
    resumed = tmp_path / "resumed"
    run_script("train.py", *tiny_train_args(char_data_dir, resumed, max_iters=20))
    run_script("train.py", *tiny_train_args(char_data_dir, resumed, max_iters=40, init_from="resume"))
    rows = read_log(resumed)
    assert [r["iter"] for r in rows if "loss" in r] == [10, 20, 30, 40]  # appended, no step repeated
    a = torch.load(straight / "ckpt.pt", weights_only=True)
    b = torch.load(resumed / "ckpt.pt", weights_only=True)
    assert b["iter_num"] == 40
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name


def test_two_processes_under_torchrun(char_data_dir, tmp_path):
    out = tmp_path / "ddp"
    args = tiny_train_args(char_data_dir, out, max_iters=20, gradient_accumulation_steps=2, backend="gloo")
    result = run_script("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py", *args,
                        env={"OMP_NUM_THREADS": "1"})  # fmt: skip
    assert "2 process(es)" in result.stdout
    evals = [r for r in read_log(out) if "val_loss" in r]
    assert evals[-1]["iter"] == 20 and evals[-1]["val_loss"] < evals[0]["val_loss"]
    assert torch.load(out / "ckpt.pt", weights_only=True)["iter_num"] == 20


def test_missing_dataset_offline_names_the_prepare_command(tmp_path, monkeypatch):
    import urllib.error
    import urllib.request

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    cfg = loop.TrainConfig(dataset="shakespeare_char", data_dir=str(tmp_path))
    try:
        loop.ensure_dataset(cfg, loop.distributed.Dist())
    except GptcraftError as e:
        assert "--input" in str(e) and "prepare/shakespeare_char.py" in str(e)
    else:
        raise AssertionError("expected a GptcraftError")
    assert not os.path.exists(tmp_path / "shakespeare_char" / "meta.json")


def test_unprepared_dataset_is_a_clear_error(tmp_path):
    result = run_script("train.py", f"--data_dir={tmp_path}", "--dataset=nothing_here", "--device=cpu", check=False)
    assert result.returncode == 2
    assert "dataset 'nothing_here' not found" in result.stderr and "Traceback" not in result.stderr
