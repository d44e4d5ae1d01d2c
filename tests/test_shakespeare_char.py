"""The Shakespeare-char pipeline: prepared files, their vocabulary, and the offline message."""

import io
import json
import urllib.error
import urllib.request

import numpy as np
import pytest
from conftest import run_here

from gptcraft.data.sources import SourceError
from gptcraft.data.tokenizer import CharTokenizer
from gptcraft.prepare import shakespeare_char


def test_prepared_files_round_trip(char_data_dir, shakespeare_path):
    path = char_data_dir / "shakespeare_char"
    meta = json.loads((path / "meta.json").read_text())
    assert meta["tokenizer"] == "char" and meta["vocab_size"] == 65
    train = np.fromfile(path / "train.bin", dtype="<u2")
    val = np.fromfile(path / "val.bin", dtype="<u2")
    assert (len(train), len(val)) == (1_003_854, 111_540)  # the 90/10 split of 1,115,394 characters
    tok = CharTokenizer(meta["chars"])
    text = shakespeare_path.read_text()
    # nanoGPT's vocabulary: the sorted characters, so that ids mean the same in both and whatever the hash seed
    assert meta["chars"] == sorted(set(text))
    assert tok.decode(np.concatenate([train, val]).tolist()) == text


def test_gptcraft_prepare_name_runs_that_recipe(char_data_dir, shakespeare_path, tmp_path):
    """`gptcraft prepare shakespeare_char ARGS` is prepare/shakespeare_char.py ARGS: the same files."""
    out = tmp_path / "shakespeare_char"
    result = run_here("-m", "gptcraft", "prepare", "shakespeare_char", "--input", shakespeare_path, "--out_dir", out)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"{out}: vocab 65, train 1,003,854 tokens")
    for name in ("train.bin", "val.bin", "meta.json"):
        assert (out / name).read_bytes() == (char_data_dir / "shakespeare_char" / name).read_bytes(), name
    unknown = run_here("-m", "gptcraft", "prepare", "shakespeare_words")
    assert unknown.returncode == 1 and unknown.stderr.startswith(
        "error: gptcraft prepare takes one of shakespeare_char"
    )


def test_offline_download_names_the_input_flag(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(SourceError, match="--input"):
        shakespeare_char.prepare(str(tmp_path / "out"))
    assert not (tmp_path / "out" / "meta.json").exists()


def test_unknown_characters_are_listed():
    with pytest.raises(ValueError, match="'é'"):
        CharTokenizer.from_text("abc").encode("abé")


def test_a_corrupted_download_is_refused_and_nothing_is_written(tmp_path, monkeypatch, shakespeare_path):
    good = shakespeare_path.read_bytes()
    served = {"data": good}
    monkeypatch.setattr(urllib.request, "urlopen", lambda *args, **kwargs: io.BytesIO(served["data"]))
    served["data"] = good[:-1] + b"?"  # one byte changed on the way
    with pytest.raises(SourceError, match="has sha256 [0-9a-f]{64}, expected 86c4e6aa.*--input"):
        shakespeare_char.prepare(str(tmp_path / "bad"))
    assert not (tmp_path / "bad").exists()
    served["data"] = good  # the genuine file passes the same check
    shakespeare_char.prepare(str(tmp_path / "good"))
    assert json.loads((tmp_path / "good" / "meta.json").read_text())["vocab_size"] == 65
