"""GPT-2 tokenizer loading: the local file equals tiktoken's own r50k_base; errors name the flag."""

import hashlib
import shutil

import pytest
import tiktoken
from conftest import GPT2_TIKTOKEN

from gptcraft.data import tokenizer
from gptcraft.data.tokenizer import GPT2_URL, TIKTOKEN_FILE_ENV, GPT2Tokenizer, TokenizerError, load_tokenizer

SAMPLES = ["Hello world", " First Citizen:\nBefore we proceed any further, hear me speak.\n\n",
           "naïve café — 東京 🙂 it's they're 1234567 <|endoftext|> tabs\t\tand   spaces\n\n\n"]  # fmt: skip


def test_local_file_encodes_like_tiktokens_own_r50k_base(tmp_path, monkeypatch, shakespeare_path):
    # tiktoken finds its download in TIKTOKEN_CACHE_DIR under the sha1 of the URL: no network needed.
    shutil.copy(GPT2_TIKTOKEN, tmp_path / hashlib.sha1(GPT2_URL.encode()).hexdigest())
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    reference = tiktoken.get_encoding("r50k_base")
    ours = GPT2Tokenizer(GPT2_TIKTOKEN)
    texts = SAMPLES + [shakespeare_path.read_text()[:200_000]]
    for text in texts:
        ids = reference.encode_ordinary(text)
        assert ours.encode(text) == ids
        assert ours.encode_array(text).tolist() == ids
        assert ours.decode(ids) == text
    assert ours.encode("Hello world") == [15496, 995]
    assert ours.vocab_size == 50257 and ours.eot_token == 50256 == reference.eot_token


def test_environment_variable_and_meta(monkeypatch):
    monkeypatch.setenv(TIKTOKEN_FILE_ENV, str(GPT2_TIKTOKEN))
    tok = load_tokenizer({"tokenizer": "gpt2", "vocab_size": 50257})
    assert tok.decode(tok.encode(SAMPLES[2])) == SAMPLES[2]
    assert tok.meta() == {"tokenizer": "gpt2", "vocab_size": 50257, "eot_token": 50256}


def test_bad_or_missing_file_and_no_download_name_the_flag(tmp_path, monkeypatch):
    wrong = tmp_path / "wrong.tiktoken"
    wrong.write_bytes(GPT2_TIKTOKEN.read_bytes()[:-10])
    with pytest.raises(TokenizerError, match="--tokenizer_file .*wrong.tiktoken has sha256 .*, not GPT-2's"):
        GPT2Tokenizer(wrong)
    with pytest.raises(TokenizerError, match="cannot read --tokenizer_file .*nothing.tiktoken"):
        GPT2Tokenizer(tmp_path / "nothing.tiktoken")
    monkeypatch.setenv(TIKTOKEN_FILE_ENV, str(wrong))  # the message names where the path came from
    with pytest.raises(TokenizerError, match=r"^\$GPTCRAFT_TIKTOKEN_FILE .*wrong.tiktoken has sha256"):
        GPT2Tokenizer()

    def offline(name):
        raise ConnectionError("no route to host")

    monkeypatch.delenv(TIKTOKEN_FILE_ENV)
    monkeypatch.setattr(tokenizer.tiktoken, "get_encoding", offline)
    with pytest.raises(TokenizerError, match="offline, pass --tokenizer_file=.* or set GPTCRAFT_TIKTOKEN_FILE"):
        GPT2Tokenizer()
