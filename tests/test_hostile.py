"""Hostile and unlucky inputs (issue 16): no code runs from a run folder, write failures give one
line and keep the old files, preparation swaps a whole dataset in, folder contents are checked
cheaply, and limits are refused with one line."""

import pickle
import re

import pytest
import torch
from conftest import ROOT, tiny_train_args

from gptcraft import generate, sample
from gptcraft.config import ConfigError
from gptcraft.data.tokenizer import TokenizerError
from gptcraft.prepare import shakespeare_char
from gptcraft.train import checkpoint, loop
from gptcraft.train.checkpoint import CheckpointError


class WritesMarker:
    """Unpickled, it creates the file `path`: a stand-in for an attacker's code."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_a_plain_resume_never_reads_the_pickled_index_of_a_sharded_checkpoint(char_data_dir, tmp_path):
    out, marker = tmp_path / "run", tmp_path / "pwned"
    dcp_dir = out / checkpoint.SHARDED
    dcp_dir.mkdir(parents=True)
    (dcp_dir / ".metadata").write_bytes(pickle.dumps(WritesMarker(marker)))
    checkpoint.save_checkpoint(dcp_dir / checkpoint.SHARDED_STATE, {"iter_num": 10, "best_val_loss": 1.0,
                                                                     "model_args": {}, "config": {}})  # fmt: skip
    with pytest.raises(CheckpointError, match=r"only the FSDP checkpoint ckpt.dcp/.*pickle.*--fsdp=True"):
        loop.main(tiny_train_args(char_data_dir, out, init_from="resume"))
    assert not marker.exists()


def test_the_pins_exclude_versions_that_run_code_from_files():
    # torch below 2.10 has known ways around weights_only=True; datasets before 4.0 runs a hub
    # dataset's loading script.
    deps = re.search(r"^dependencies = \[(.*)\]$", (ROOT / "pyproject.toml").read_text(), re.M).group(1)
    assert '"torch>=2.10"' in deps and '"datasets>=4.0"' in deps


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_a_temperature_that_is_not_finite_is_refused(tiny_run_dir, value):
    with pytest.raises(ConfigError, match="temperature must be >= 0 and finite"):
        sample.main([f"--out_dir={tiny_run_dir}", "--device=cpu", f"--temperature={value}"])


@pytest.mark.parametrize("temperature", [1e-45, 1e-300])
def test_a_tiny_temperature_decodes_greedily(temperature):
    logits = torch.randn(4, 50) * 30
    logits[0, :2] = logits[0].max() + 1  # a tie: either of the two
    tokens = generate.sample(logits, temperature, top_k=10, generator=torch.Generator().manual_seed(0))
    assert torch.equal(tokens[1:], logits[1:].argmax(-1, keepdim=True))
    assert tokens[0, 0] in (0, 1)


def test_num_samples_beyond_memory_is_refused_before_generating(tiny_run_dir):
    with pytest.raises(ConfigError, match=r"num_samples=1000000000000 needs about .* GiB .* or fewer"):
        sample.main([f"--out_dir={tiny_run_dir}", "--device=cpu", "--num_samples=1000000000000"])


def test_more_distinct_characters_than_uint16_ids_are_refused(tmp_path):
    text = tmp_path / "many.txt"
    text.write_text("".join(chr(c) for c in range(0x10000, 0x10000 + 70_000)))
    with pytest.raises(TokenizerError, match="70,000 distinct characters, more than the 65,536 ids"):
        shakespeare_char.prepare(tmp_path / "data", text)
    assert not (tmp_path / "data").exists()
