"""sample.py: prompts, streaming, batches, and the bad inputs it refuses with a clear message."""

import io
import json
import os
import sys

import pytest
from conftest import GPT2_TIKTOKEN, run_here, run_script

from gptcraft import sample, terminal
from gptcraft.data.tokenizer import gpt2_encoding
from gptcraft.errors import GptcraftError


def run(capsys, run_dir, *args):
    sample.main([f"--out_dir={run_dir}", "--device=cpu", *args])
    return capsys.readouterr()


def samples(stdout):
    return stdout.split("---------------\n")[:-1]


def test_streamed_single_sample_equals_batch_output(capsys, tiny_run_dir):
    """The same seed gives the same text streamed token by token and printed whole, across block_size."""
    common = ["--start=ROMEO:", "--max_new_tokens=80", "--num_samples=1", "--seed=3"]
    streamed = run(capsys, tiny_run_dir, *common)
    whole = run(capsys, tiny_run_dir, *common, "--stream=False")
    uncached = run(capsys, tiny_run_dir, *common, "--use_cache=False")
    assert samples(streamed.out) == samples(whole.out) == samples(uncached.out)
    text = samples(streamed.out)[0]
    assert text.startswith("ROMEO:") and len(text) == len("ROMEO:") + 80 + 1  # + print's newline
    assert "tokens/s" in streamed.err and "KV cache" in streamed.err
    assert "full recomputation" in uncached.err


def test_num_samples_are_one_batch_of_different_samples(capsys, tiny_run_dir):
    out = run(capsys, tiny_run_dir, "--num_samples=3", "--max_new_tokens=20", "--top_p=0.9", "--top_k=0")
    texts = samples(out.out)
    assert len(texts) == 3 and len(set(texts)) == 3
    assert "20 tokens x 3 sample(s)" in out.err


def test_prompt_from_file_and_stdin(capsys, tiny_run_dir, tmp_path, monkeypatch):
    (tmp_path / "prompt.txt").write_text("JULIET:\n")
    common = ["--num_samples=1", "--max_new_tokens=5", "--temperature=0"]
    from_file = run(capsys, tiny_run_dir, f"--start=FILE:{tmp_path / 'prompt.txt'}", *common)
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(b"JULIET:\n")))
    from_stdin = run(capsys, tiny_run_dir, "--start=-", *common)
    assert from_file.out == from_stdin.out and from_file.out.startswith("JULIET:\n")


@pytest.mark.parametrize("command", ["sample.py", "-m gptcraft attention"])
def test_a_prompt_that_is_not_text_is_one_line(tiny_run_dir, tmp_path, command):
    (tmp_path / "prompt.bin").write_bytes(b"ROMEO\xff\xfe\x00")
    result = run_here(*command.split(), f"--out_dir={tiny_run_dir}", "--device=cpu",
                      f"--start=FILE:{tmp_path / 'prompt.bin'}")  # fmt: skip
    assert result.returncode == 2
    assert (
        result.stderr
        == f"error: prompt file {tmp_path / 'prompt.bin'} is not UTF-8 text (byte 5): give a text prompt\n"
    )
    assert sorted(os.listdir(tiny_run_dir)) == ["ckpt.pt", "meta.json"]


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_control_characters_of_the_vocabulary_reach_a_terminal_escaped_and_a_pipe_unchanged(tiny_run_dir, monkeypatch):
    """meta.json is the run folder's: its vocabulary may hold ESC and C1 controls (here in place of
    '$' and '&'), which printed raw would drive the terminal."""
    meta = json.loads((tiny_run_dir / "meta.json").read_text())
    meta["chars"] = [{"$": "\x1b", "&": "\x9b"}.get(c, c) for c in meta["chars"]]
    (tiny_run_dir / "meta.json").write_text(json.dumps(meta))
    args = [f"--out_dir={tiny_run_dir}", "--device=cpu", "--start=\x1bH\x9b3m A\n", "--max_new_tokens=3"]
    for stream in (True, False):
        monkeypatch.setattr("sys.stdout", Terminal())
        sample.main([*args, "--num_samples=1", f"--stream={stream}"])
        shown = sys.stdout.getvalue()
        assert shown.startswith("\\x1bH\\x9b3m A\n") and not set(shown) & {"\x1b", "\x9b"}, shown
    monkeypatch.setattr("sys.stdout", io.StringIO())  # a pipe gets the text as it is
    sample.main([*args, "--num_samples=1"])
    assert sys.stdout.getvalue().startswith("\x1bH\x9b3m A\n")
    assert terminal.escape_controls("".join(map(chr, range(0xA0)))) == "".join(
        "\n" if c == 10 else "\t" if c == 9 else chr(c) if 0x20 <= c < 0x7F else f"\\x{c:02x}" for c in range(0xA0)
    )


def test_empty_prompt_starts_from_a_newline(capsys, tiny_run_dir):
    empty = run(capsys, tiny_run_dir, "--start=", "--num_samples=1", "--max_new_tokens=5", "--temperature=0")
    newline = run(capsys, tiny_run_dir, "--start=\n", "--num_samples=1", "--max_new_tokens=5", "--temperature=0")
    assert samples(empty.out)[0] == samples(newline.out)[0][1:]  # same tokens, the newline is not echoed


@pytest.mark.parametrize(
    "args, message",
    [
        (["--start=ROMEO é ☃"], "characters not in the vocabulary: 'é', '☃'"),
        (["--top_p=0"], "top_p must be in (0, 1]"),
        (["--top_p=1.5"], "top_p must be in (0, 1]"),
        (["--temperature=-0.1"], "temperature must be >= 0"),
        (["--window_keep=33"], "window_keep (33) must not exceed the model's block_size (32)"),
        (["--start=FILE:/no/such/prompt.txt"], "cannot read prompt file /no/such/prompt.txt"),
        (["--compile=True", "--use_cache=False"], "compile=True compiles the KV-cache decoding step"),
    ],
)
def test_bad_input_is_refused(tiny_run_dir, args, message):
    with pytest.raises(GptcraftError) as e:
        sample.main([f"--out_dir={tiny_run_dir}", "--device=cpu", *args])
    assert message in str(e.value)


def test_checkpoint_without_meta_json(tiny_run_dir):
    os.remove(tiny_run_dir / "meta.json")
    result = run_here("sample.py", f"--out_dir={tiny_run_dir}", "--device=cpu")
    assert result.returncode == 2
    assert "meta.json not found" in result.stderr
    assert f"copy the dataset's meta.json into {tiny_run_dir}" in result.stderr


def test_missing_checkpoint(tmp_path):
    with pytest.raises(GptcraftError, match="no checkpoint at"):
        sample.main([f"--out_dir={tmp_path}", "--device=cpu"])


def test_bpe_stream_decodes_characters_split_across_tokens():
    enc = gpt2_encoding(GPT2_TIKTOKEN)  # the project's own tokenizer, as sample.py builds it
    text = "Ünïcödé — 日本語のテキスト 🎭🦜 naïve café"
    ids = enc.encode(text)
    assert any(not enc.decode_single_token_bytes(i).decode("utf-8", "ignore") for i in ids)  # split chars
    stream = sample.TextStream(enc)
    pieces = [stream.push([i]) for i in ids] + [stream.flush()]
    assert "\ufffd" not in "".join(pieces) and "".join(pieces) == text
    # Arbitrary ids (invalid UTF-8 included) still give exactly what decoding them at once gives.
    ids = list(range(150, 260)) + list(range(1000, 50000, 997)) + ids[:3]
    stream = sample.TextStream(enc)
    assert "".join([stream.push([i]) for i in ids] + [stream.flush()]) == enc.decode(ids)


def test_gpt2_bpe_run_streams_the_same_text(capsys, tmp_path):
    """A GPT-2 BPE model: the empty prompt starts from end-of-text, and the streamed text equals the
    batch-printed one although random tokens split multi-byte characters."""
    import torch

    from gptcraft.data.shards import write_meta
    from gptcraft.model import GPT, GPTConfig
    from gptcraft.runs.checkpoint import save_checkpoint

    args = dict(n_layer=1, n_head=2, n_embd=16, block_size=16, vocab_size=50257)
    torch.manual_seed(0)
    model = GPT(GPTConfig(**args))
    with torch.no_grad():  # favour the 256 single-byte tokens: many of them are halves of UTF-8 characters
        model.lm_head.weight[256:] = 0.0
        model.lm_head.weight[:256] *= 10.0
    save_checkpoint(tmp_path / "ckpt.pt", {"model": model.state_dict(), "model_args": args})
    write_meta(tmp_path, {"tokenizer": "gpt2", "vocab_size": 50257})
    common = ["--start=", "--num_samples=1", "--max_new_tokens=40", "--temperature=2.0", "--top_k=100",
              f"--tokenizer_file={GPT2_TIKTOKEN}"]  # fmt: skip
    streamed = run(capsys, tmp_path, *common)
    whole = run(capsys, tmp_path, *common, "--stream=False")
    assert samples(streamed.out) == samples(whole.out)
    assert "\ufffd" in streamed.out  # the case worth testing: bytes that do not form whole characters
    assert "prompt of 1 tokens" in streamed.err


def test_generation_stops_at_end_of_text(capsys, tmp_path):
    """A GPT-2 BPE model that ends each step's text with probability 1/4: every sample stops at its
    first end-of-text, and the batch once all have ended, long before max_new_tokens."""
    import math

    import torch

    from gptcraft.data.shards import write_meta
    from gptcraft.data.tokenizer import GPT2_EOT
    from gptcraft.model import GPT, GPTConfig
    from gptcraft.runs.checkpoint import save_checkpoint

    args = dict(n_layer=1, n_head=2, n_embd=16, block_size=16, vocab_size=50257, tie_embeddings=False)
    model = GPT(GPTConfig(**args))
    with torch.no_grad():  # ln_f outputs the constant one-hot e_0, so the logits are lm_head's column 0
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.zero_()
        model.transformer.ln_f.bias[0] = 1.0
        model.lm_head.weight.zero_()
        model.lm_head.weight[GPT2_EOT, 0] = math.log(50256 / 3)  # P(end-of-text) = 1/4 at every step
    save_checkpoint(tmp_path / "ckpt.pt", {"model": model.state_dict(), "model_args": args})
    write_meta(tmp_path, {"tokenizer": "gpt2", "vocab_size": 50257})
    common = ["--start=Once", "--max_new_tokens=200", "--temperature=1", "--top_k=0", "--seed=1",
              f"--tokenizer_file={GPT2_TIKTOKEN}"]  # fmt: skip
    batch = run(capsys, tmp_path, *common, "--num_samples=4")
    assert batch.err.startswith("inference in float32 (")  # the dtype and why, before the work
    steps = int(batch.err.splitlines()[-1].split(" tokens x 4 sample(s)")[0])
    assert 1 <= steps < 60  # all four have ended (P(a row lasts 60 steps) = 0.75^60, 3e-8)
    texts = samples(batch.out)
    assert len(texts) == 4 and all(t.startswith("Once") for t in texts) and "<|endoftext|>" not in batch.out
    assert len({len(t) for t in texts}) > 1  # each row cut at its own end
    single = run(capsys, tmp_path, *common, "--num_samples=1")
    assert int(single.err.splitlines()[-1].split(" tokens x 1 sample(s)")[0]) < 60 and "<|endoftext|>" not in single.out


@pytest.mark.slow
def test_compiled_decoding_gives_the_same_text_and_compiles_once(tiny_run_dir):
    """--compile=True with inductor on the CPU: the text of the eager path, across a window slide,
    and no recompilation (TORCH_LOGS=recompiles reports each one on stderr)."""
    common = [f"--out_dir={tiny_run_dir}", "--device=cpu", "--start=ROMEO:", "--max_new_tokens=40",
              "--num_samples=2", "--seed=5"]  # fmt: skip
    env = dict(os.environ, TORCH_LOGS="recompiles")
    compiled = run_script("sample.py", *common, "--compile=True", env=env)
    eager = run_here("sample.py", *common)
    assert samples(compiled.stdout) == samples(eager.stdout) and len(samples(eager.stdout)) == 2
    assert "Recompiling" not in compiled.stderr and "tokens/s" in compiled.stderr
