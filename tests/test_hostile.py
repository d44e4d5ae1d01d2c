"""Hostile and unlucky inputs (issue 16): no code runs from a run folder, write failures give one
line and keep the old files, preparation swaps a whole dataset in, folder contents are checked
cheaply, and limits are refused with one line."""

import pickle
import re

import pytest
from conftest import ROOT, tiny_train_args

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
