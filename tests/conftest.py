"""Shared fixtures: the two public data files the tests read, and small prepared datasets.

The files come from $GPTCRAFT_SHARED_DATA, else ../shared/data beside the repository (offline), else a
cache (~/.cache/gptcraft/test-data) that the first test session fills by download, hash-checked.
"""

import contextlib
import io
import os
import runpy
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from gptcraft.data.sources import TINY_SHAKESPEARE_SHA256, TINY_SHAKESPEARE_URL, SourceError, download
from gptcraft.data.tokenizer import GPT2_SHA256, GPT2_URL

ROOT = Path(__file__).resolve().parents[1]
# file name: (url, sha256)
DATA_FILES = {
    "tinyshakespeare.txt": (TINY_SHAKESPEARE_URL, TINY_SHAKESPEARE_SHA256),
    "gpt2.tiktoken": (GPT2_URL, GPT2_SHA256),
}
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "gptcraft" / "test-data"


def data_dir():
    """The folder the tests read their data files from (see the module docstring)."""
    if "GPTCRAFT_SHARED_DATA" in os.environ:
        return Path(os.environ["GPTCRAFT_SHARED_DATA"])
    beside = ROOT.parent / "shared" / "data"
    return beside if all((beside / name).exists() for name in DATA_FILES) else CACHE


SHARED_DATA = data_dir()
SHAKESPEARE = SHARED_DATA / "tinyshakespeare.txt"
GPT2_TIKTOKEN = SHARED_DATA / "gpt2.tiktoken"


def pytest_sessionstart(session):
    """Download the data files the cache lacks; without them (offline) stop at once with one line."""
    for name, (url, sha256) in DATA_FILES.items():
        path = SHARED_DATA / name
        if path.exists():
            continue
        if SHARED_DATA != CACHE:
            raise pytest.UsageError(f"{path} is missing: $GPTCRAFT_SHARED_DATA must name a folder holding "
                                    f"{' and '.join(DATA_FILES)}")  # fmt: skip
        try:
            data = download(url, sha256)
        except SourceError as e:
            raise pytest.UsageError(
                f"{path} is missing and {e.problem}; offline, set GPTCRAFT_SHARED_DATA to a folder holding "
                f"{' and '.join(DATA_FILES)}"
            ) from None
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{name}.tmp")  # renamed when whole: an interrupted download is not a file
        tmp.write_bytes(data)
        os.replace(tmp, path)


def run_script(*args, check=True, env=None, timeout=600, cwd=ROOT):
    """Run one of the project's scripts (`train.py`, `sample.py`, ...) in a fresh interpreter."""
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    result = subprocess.run(
        [sys.executable, *map(str, args)], cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout
    )
    if check and result.returncode != 0:
        raise AssertionError(f"{args} exited {result.returncode}:\n{result.stdout}\n{result.stderr}")
    return result


def run_here(*args, cwd=None):
    """`python script.py args` or `python -m module args` run inside this process, as run_script
    runs it in a fresh one (what it prints, its exit status), without the seconds of a fresh
    interpreter's imports: for commands that stop before any work. One test per command still
    runs it in a fresh process."""
    out, err, code = io.StringIO(), io.StringIO(), 0
    argv, here = sys.argv, os.getcwd()
    try:
        os.chdir(cwd or ROOT)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            if args[0] == "-m":
                sys.argv = [args[1], *map(str, args[2:])]
                with warnings.catch_warnings():  # that the module was imported before: it runs afresh all the same
                    warnings.simplefilter("ignore", RuntimeWarning)
                    runpy.run_module(args[1], run_name="__main__", alter_sys=True)
            else:
                sys.argv = [str(args[0]), *map(str, args[1:])]
                runpy.run_path(str(ROOT / args[0]), run_name="__main__")
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 0 if e.code is None else 1
        if not isinstance(e.code, int | None):
            print(e.code, file=err)  # as the interpreter prints sys.exit("message")
    finally:
        sys.argv = argv
        os.chdir(here)
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


@pytest.fixture(scope="session")
def shakespeare_path():
    return SHAKESPEARE


@pytest.fixture(scope="session")
def char_data_dir(tmp_path_factory, shakespeare_path):
    """A data_dir holding shakespeare_char, prepared once per test session from the local text."""
    data_dir = tmp_path_factory.mktemp("data")
    run_script(ROOT / "prepare" / "shakespeare_char.py", "--input", shakespeare_path,
               "--out_dir", data_dir / "shakespeare_char")  # fmt: skip
    return data_dir


def tiny_train_args(data_dir, out_dir, **overrides):
    """train.py arguments for a seconds-long CPU run on shakespeare_char."""
    args = {
        "dataset": "shakespeare_char", "data_dir": data_dir, "out_dir": out_dir, "device": "cpu",
        "dtype": "float32", "compile": False, "n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 32,
        "batch_size": 8, "gradient_accumulation_steps": 1, "max_iters": 40, "eval_interval": 20,
        "eval_iters": 5, "log_interval": 10, "learning_rate": 1e-2, "warmup_iters": 5, "lr_decay_iters": 40,
        "min_lr": 1e-3, "dropout": 0.0,
    }  # fmt: skip
    args.update(overrides)
    return [f"--{k}={v}" for k, v in args.items()]


def pytest_collection_modifyitems(config, items):
    """Tests marked `cuda` run wherever a GPU is present and are skipped elsewhere."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def tiny_run_dir(tmp_path, shakespeare_path):
    """A run directory as train.py leaves it (ckpt.pt and meta.json) with a random 2-layer char model."""
    import torch

    from gptcraft.data.shards import write_meta
    from gptcraft.data.tokenizer import CharTokenizer
    from gptcraft.model import GPT, GPTConfig
    from gptcraft.runs.checkpoint import save_checkpoint

    tok = CharTokenizer.from_text(shakespeare_path.read_text())
    model_args = dict(n_layer=2, n_head=2, n_embd=32, block_size=32, bias=True, dropout=0.0,
                      vocab_size=tok.vocab_size, pos_embedding="learned", attention="sdpa")  # fmt: skip
    torch.manual_seed(0)
    model = GPT(GPTConfig(**model_args))
    out_dir = tmp_path / "run"
    out_dir.mkdir()
    save_checkpoint(out_dir / "ckpt.pt", {"model": model.state_dict(), "model_args": model_args})
    write_meta(out_dir, tok.meta())
    return out_dir
