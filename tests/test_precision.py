"""Mixed precision on the CPU, as a GPU runs it: bf16 and fp16 autocast, the fp16 grad scaler
(CPU GradScaler) skipping overflowed steps on the device, and a dtype change on resume."""

import torch
from conftest import tiny_train_args

from gptcraft.model import GPT, GPTConfig
from gptcraft.train import loop

RUN = {"eval_interval": 5, "log_interval": 5, "eval_iters": 2}


def test_a_resume_may_change_the_dtype(char_data_dir, tmp_path, capsys):
    """fp32 -> fp16 (no scaler state saved: a fresh scaler), fp16 -> bf16, bf16 -> fp32."""
    out = tmp_path / "run"
    loop.main(tiny_train_args(char_data_dir, out, dtype="float32", max_iters=5, **RUN))
    for dtype, before, iters in (("float16", "float32", 10), ("bfloat16", "float16", 15), ("float32", "bfloat16", 20)):
        loop.main(tiny_train_args(char_data_dir, out, dtype=dtype, max_iters=iters, init_from="resume", **RUN))
        assert f"trained in {before}, this run is {dtype}" in capsys.readouterr().out
        saved = torch.load(out / "ckpt.pt", weights_only=True)
        assert saved["iter_num"] == iters and bool(saved["scaler"]) == (dtype == "float16")
        assert all(torch.isfinite(t).all() for t in saved["model"].values())


def test_float16_overflowed_steps_leave_weights_and_optimizer_untouched(char_data_dir, tmp_path, monkeypatch, capsys):
    """A scale of 2**40 overflows float16 gradients: the scaler halves it after each such step,
    and the device-side mask keeps the weights and AdamW's step count as they were."""
    real = torch.amp.GradScaler
    monkeypatch.setattr(loop.torch.amp, "GradScaler", lambda *a, **k: real(*a, **{**k, "init_scale": 2.0**40}))
    out = tmp_path / "run"
    loop.main(tiny_train_args(char_data_dir, out, dtype="float16", max_iters=3, **RUN))
    saved = torch.load(out / "ckpt.pt", weights_only=True)
    assert saved["scaler"]["scale"] == 2.0**37  # three overflows
    torch.manual_seed(1337)  # the run's seed: its initial weights
    initial = GPT(GPTConfig(**saved["model_args"])).state_dict()
    for name, tensor in saved["model"].items():
        assert torch.equal(tensor, initial[name]), name
    assert all(s["step"] == 0 for s in saved["optimizer"]["state"].values())
    assert "skipped step" not in capsys.readouterr().out  # overflow is the scaler's business, not divergence
