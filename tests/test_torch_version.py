"""pyproject's torch pin covers every torch API the code uses that older releases lack."""

import re

import tomllib
from conftest import ROOT

# API name as it appears in the source -> the first torch release that has it.
INTRODUCED = {
    "fully_shard": (2, 6),
    "MixedPrecisionPolicy": (2, 6),
    "torch.optim.Muon": (2, 9),
    "get_total_norm": (2, 6),
    "clip_grads_with_norm_": (2, 6),
    "including_emulation": (2, 4),
}


def torch_pin():
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    spec = next(d for d in deps if re.match(r"torch\b", d))
    major, minor = re.fullmatch(r"torch>=(\d+)\.(\d+)", spec).groups()
    return int(major), int(minor)


def test_torch_pin_covers_the_apis_the_code_uses():
    source = "\n".join(p.read_text() for p in [ROOT / "model.py", *(ROOT / "gptcraft").rglob("*.py")])
    used = {name: version for name, version in INTRODUCED.items() if name in source}
    assert "fully_shard" in used and "torch.optim.Muon" in used  # the table names what the code uses
    too_new = {name: v for name, v in used.items() if v > torch_pin()}
    assert not too_new, f"pyproject pins torch>={torch_pin()} but the code uses {too_new}"


def test_installed_torch_meets_the_pin():
    import torch

    installed = tuple(int(x) for x in re.match(r"(\d+)\.(\d+)", torch.__version__).groups())
    assert installed >= torch_pin()
