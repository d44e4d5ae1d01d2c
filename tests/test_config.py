"""Typed configuration: files, overrides, and clear errors for bad keys and values."""

from dataclasses import dataclass

import pytest
from conftest import ROOT, run_here, run_script

from gptcraft.bench.speed import BenchConfig
from gptcraft.config import ConfigError, option, parse_config
from gptcraft.evaluate.cli import EvaluateConfig
from gptcraft.evaluate.hellaswag import HellaSwagConfig
from gptcraft.sample import SampleConfig
from gptcraft.system.hardware import resolve_compile
from gptcraft.train.loop import TrainConfig


@dataclass
class Toy:
    batch_size: int = option(12, "sequences per batch")
    learning_rate: float = option(1e-3, "peak learning rate")
    compile: bool = option(True, "compile the model")
    dtype: str = option("auto", "precision", ("auto", "float32"))


def test_overrides_are_typed():
    cfg = parse_config(Toy, ["--batch_size=32", "--learning_rate=3e-4", "--compile=False", "--dtype=float32"])
    assert cfg == Toy(batch_size=32, learning_rate=3e-4, compile=False, dtype="float32")
    assert parse_config(Toy, ["--learning_rate=1"]).learning_rate == 1.0


def test_config_file_then_overrides_in_order(tmp_path):
    path = tmp_path / "c.py"
    path.write_text("import math\nbatch_size = 64\nlearning_rate = 2 * 1e-3\n_private = 5\n")
    cfg = parse_config(Toy, [str(path), "--batch_size=8"])
    assert cfg.batch_size == 8 and cfg.learning_rate == pytest.approx(2e-3)


def test_unknown_key_names_the_closest():
    with pytest.raises(ConfigError, match="unknown config key 'batch_sise'; did you mean batch_size"):
        parse_config(Toy, ["--batch_sise=3"])


@pytest.mark.parametrize(
    "arg, message",
    [
        ("--batch_size=3.5", "batch_size expects int, got '3.5'"),
        ("--compile=maybe", "compile expects a bool"),
        ("--learning_rate=fast", "learning_rate expects float"),
        ("--dtype=float64", "dtype must be one of auto, float32"),
        ("--batch_size", "needs a value"),
    ],
)
def test_bad_values_name_the_expected_type(arg, message):
    with pytest.raises(ConfigError, match=message):
        parse_config(Toy, [arg])


def test_wrong_type_in_a_config_file(tmp_path):
    path = tmp_path / "c.py"
    path.write_text("batch_size = '64'\n")
    with pytest.raises(ConfigError, match="batch_size expects int, got str '64'"):
        parse_config(Toy, [str(path)])


@pytest.mark.parametrize(
    "source, message",
    [("batch_size = 64\nlearning_rate = 1e-3 +\n", "c.py, line 2: invalid syntax"),
     ("batch_size = 64\nlearning_rate = lr / 10\n", "c.py, line 2: NameError: name 'lr' is not defined")],
)  # fmt: skip
def test_a_config_file_that_fails_names_its_line(tmp_path, source, message):
    path = tmp_path / "c.py"
    path.write_text(source)
    with pytest.raises(ConfigError, match=message):
        parse_config(Toy, [str(path)])


def test_a_config_file_that_is_not_text_is_one_line(tmp_path):
    (tmp_path / "c.py").write_bytes(b"batch_size = 8\n\xff\xfe\n")
    result = run_here("train.py", str(tmp_path / "c.py"))
    assert result.returncode == 2
    assert result.stderr == f"error: config file {tmp_path / 'c.py'} is not UTF-8 text (byte 15)\n"


def test_train_config_checks_values():
    with pytest.raises(ConfigError, match="n_embd .* divisible by n_head"):
        parse_config(TrainConfig, ["--n_embd=100", "--n_head=3"])
    with pytest.raises(ConfigError, match="batch_size must be positive"):
        parse_config(TrainConfig, ["--batch_size=0"])


def test_train_cli_errors_exit_nonzero_with_one_line():
    result = run_script("train.py", "--batch_sise=3", check=False)
    assert result.returncode == 2
    assert result.stderr.strip() == "error: unknown config key 'batch_sise'; did you mean batch_size?"
    result = run_here("train.py", "--max_iters=ten")
    assert result.returncode == 2
    assert "max_iters expects int, got 'ten'" in result.stderr
    result = run_here("sample.py", "--temprature=0.5")
    assert result.returncode == 2 and "did you mean temperature?" in result.stderr


def test_every_numeric_mistake_is_one_line_of_its_own():
    """nan passes every comparison and inf trains NaN: both are refused at parse time, and every
    mistake on the command line gets its line."""
    result = run_here("train.py", "--learning_rate=nan", "--grad_clip=nan", "--logit_softcap=nan",
                      "--checkpoint_minutes=nan", "--min_lr=inf", "--max_iters=ten")  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        *(f"error: {key} must be a finite number, got nan"
          for key in ("learning_rate", "grad_clip", "logit_softcap", "checkpoint_minutes")),
        "error: min_lr must be a finite number, got inf",
        "error: max_iters expects int, got 'ten'",
    ]  # fmt: skip
    result = run_here("train.py", "--beta1=5", "--beta2=1", "--muon_momentum=-0.1", "--seed=-1", "--batch_size=0")
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "error: batch_size must be positive, got 0",
        "error: beta1 must be in [0, 1), got 5.0",
        "error: beta2 must be in [0, 1), got 1.0",
        "error: muon_momentum must be in [0, 1), got -0.1",
        "error: seed must be in [0, 2**32), got -1",
    ]


@pytest.mark.parametrize(
    "cls, args, message",
    [(SampleConfig, ["--seed=-1"], r"seed must be in \[0, 2\*\*32\), got -1"),
     (SampleConfig, ["--top_p=nan"], "top_p must be a finite number, got nan"),
     (SampleConfig, ["--temperature=inf"], "temperature must be a finite number, got inf"),
     (BenchConfig, ["--learning_rate=inf"], "learning_rate must be a finite number, got inf"),
     (BenchConfig, ["--beta1=1.5", "--seed=4294967296"], r"beta1 must be in \[0, 1\), got 1.5\nseed must be in"),
     (EvaluateConfig, ["--text=x.txt", "--batch_size=0"], "batch_size positive"),
     (HellaSwagConfig, ["--max_examples=-1"], "max_examples must be >= 0")],
)  # fmt: skip
def test_every_command_checks_its_numbers(cls, args, message):
    with pytest.raises(ConfigError, match=message):
        parse_config(cls, args)


def test_a_config_file_cannot_slip_a_nan_past_the_checks(tmp_path):
    path = tmp_path / "c.py"
    path.write_text("learning_rate = float('inf')\ngrad_clip = float('nan')\n")
    with pytest.raises(ConfigError, match="learning_rate must be a finite number, got inf\ngrad_clip must be a finite"):
        parse_config(TrainConfig, [str(path)])


def test_help_lists_every_key_with_default():
    result = run_here("train.py", "--help")
    assert result.returncode == 0
    for key in ("out_dir", "eval_interval", "gradient_accumulation_steps", "pos_embedding", "compile", "seed"):
        assert f"--{key}=" in result.stdout
    assert "--batch_size=12" in result.stdout and "sequences per micro-batch" in result.stdout


def test_min_lr_follows_the_learning_rate_unless_set():
    # README's finetuning line lowers the learning rate of a config that leaves min_lr unset.
    finetune = [str(ROOT / "configs" / "train_shakespeare_char.py"), "--init_from=gpt2", "--learning_rate=3e-5"]
    assert parse_config(TrainConfig, finetune).min_lr == 3e-6
    assert parse_config(TrainConfig, [*finetune, "--min_lr=1e-6"]).min_lr == 1e-6
    assert parse_config(TrainConfig, ["--min_lr=auto"]).min_lr == 6e-5  # the value it had as a fixed default
    with pytest.raises(ConfigError, match="min_lr .* must not exceed"):
        parse_config(TrainConfig, ["--learning_rate=1e-4", "--min_lr=1e-3"])


def test_compile_is_auto_on_for_cuda_only():
    assert parse_config(TrainConfig, []).compile is None
    assert parse_config(TrainConfig, ["--compile=auto"]).compile is None
    assert parse_config(TrainConfig, ["--compile=True"]).compile is True
    assert [resolve_compile(None, d) for d in ("cpu", "cuda", "cuda:1", "mps")] == [False, True, True, False]
    assert resolve_compile(True, "cpu") and not resolve_compile(False, "cuda")
    assert "--compile=auto  torch.compile" in run_here("train.py", "--help").stdout
