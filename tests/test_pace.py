"""On a CPU, a config sized for GPUs says so before its first evaluation; the CPU recipe does not."""

import pytest
import torch
from conftest import ROOT

from gptcraft.config import parse_config
from gptcraft.model import GPT, GPTConfig
from gptcraft.train import pace
from gptcraft.train.config import TrainConfig

PEAK = 175e9  # fp32 matmul FLOP/s of the 2-core test VMs


def run_forecast(config, world_size=1):
    cfg = parse_config(TrainConfig, [str(ROOT / "configs" / config)])
    with torch.device("meta"):  # the parameter count without the weights
        model = GPT(GPTConfig(**cfg.model_args(), vocab_size=65))
    return cfg, pace.for_run(cfg, model, cfg.gradient_accumulation_steps, world_size, 0, PEAK)


def test_the_baby_gpt_on_a_cpu_says_how_long_and_what_to_run_instead():
    cfg, f = run_forecast("train_shakespeare_char.py")
    tokens = cfg.batch_size * cfg.block_size  # 64 x 256 per step, 200 such batches per split per evaluation
    per_token = 6 * 10_646_784 + 12 * 6 * 384 * 256  # 6N plus attention, N without the position table
    assert f.step_s == pytest.approx(per_token * tokens / PEAK)
    assert f.eval_s == pytest.approx(per_token / 3 * 2 * 200 * tokens / PEAK)
    assert f.total_s == pytest.approx(5000 * f.step_s + 21 * f.eval_s)
    note = pace.start_note(f, cfg.max_iters)
    assert note.startswith("note: this run is sized for a GPU") and "configs/train_shakespeare_char_cpu.py" in note
    assert pace.eval_note(f, cfg.eval_iters).startswith("evaluating 200 batches per split (eval_iters): ")


@pytest.mark.parametrize("config", ["train_shakespeare_char_cpu.py", "speedrun_shakespeare_char_cpu.py"])
def test_the_cpu_configs_start_without_a_note(config):
    cfg, f = run_forecast(config)
    assert pace.start_note(f, cfg.max_iters) is None and pace.eval_note(f, cfg.eval_iters) is None


def test_torchrun_processes_share_the_evaluation():
    _, one = run_forecast("train_shakespeare_char.py")
    _, two = run_forecast("train_shakespeare_char.py", world_size=2)
    assert two.eval_s == pytest.approx(one.eval_s / 2)
