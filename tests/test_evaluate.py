"""evaluate.py: loss and perplexity of a checkpoint on a text file or a prepared dataset split."""

import json
import math
import os

import numpy as np
import pytest
import torch
from conftest import ROOT

from gptcraft.errors import GptcraftError
from gptcraft.evaluate import cli as run
from gptcraft.load import load_model


def loss_window_by_window(model, ids, block_size=32):
    """The mean loss over every target of ids (T,), scoring non-overlapping windows one by one."""
    total = 0.0
    for s in range(0, len(ids) - 1, block_size):
        x, y = ids[s : s + block_size], ids[s + 1 : s + block_size + 1]
        _, window_loss = model(x[: len(y)][None], y[None])
        total += window_loss.item() * len(y)
    return total / (len(ids) - 1)


def test_text_file_loss_is_the_mean_over_every_token(tiny_run_dir, tmp_path, capsys):
    text = "First Citizen:\nBefore we proceed any further, hear me speak.\n" * 3  # 165 characters: 6 windows
    (tmp_path / "t.txt").write_text(text)
    loss = run.main([f"--out_dir={tiny_run_dir}", f"--text={tmp_path / 't.txt'}", "--device=cpu",
                          "--batch_size=4"])  # fmt: skip
    model, tok = load_model("resume", tiny_run_dir, "cpu")
    ids = torch.tensor(tok.encode(text))
    assert loss == pytest.approx(loss_window_by_window(model, ids), rel=1e-5)
    line = capsys.readouterr().out
    assert f"loss {loss:.4f}, perplexity {math.exp(loss):.3f} over {len(ids) - 1:,} tokens" in line


def test_dataset_split_and_max_tokens(tiny_run_dir, char_data_dir, capsys):
    common = [f"--out_dir={tiny_run_dir}", f"--data_dir={char_data_dir}", "--dataset=shakespeare_char",
              "--device=cpu", "--max_tokens=2000"]  # fmt: skip
    val = run.main(common)
    train = run.main([*common, "--split=train"])
    assert "shakespeare_char val: loss" in capsys.readouterr().out
    model, _ = load_model("resume", tiny_run_dir, "cpu")
    for split, loss in (("val", val), ("train", train)):  # the first 2000 tokens of each split, every one scored
        ids = torch.from_numpy(np.fromfile(char_data_dir / "shakespeare_char" / f"{split}.bin", dtype="<u2")[:2000])
        assert loss == pytest.approx(loss_window_by_window(model, ids.long()), rel=1e-5), split


def test_an_eval_config_scores_the_pretrained_weights_once(char_data_dir, tmp_path, capsys):
    """configs/eval_gpt2.py with a local GPT-2 folder in place of OpenAI's: one evaluation of those
    weights (zero token embeddings: every logit 0, so both losses are exactly ln 65), no training."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from gptcraft.train import loop

    hf = GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=16, n_positions=32, vocab_size=65))
    with torch.no_grad():
        hf.transformer.wte.weight.zero_()  # the head is tied to it
    hf.save_pretrained(tmp_path / "hf")
    out = tmp_path / "out"
    loop.main([str(ROOT / "configs" / "eval_gpt2.py"), f"--init_from={tmp_path / 'hf'}", f"--out_dir={out}",
               f"--data_dir={char_data_dir}", "--dataset=shakespeare_char", "--device=cpu", "--dtype=float32",
               "--block_size=32", "--eval_iters=2"])  # fmt: skip
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [(r["iter"], sorted(r)) for r in rows] == [(0, ["iter", "time_s", "tokens_seen", "train_loss", "val_loss"])]
    assert rows[0]["train_loss"] == pytest.approx(math.log(65), abs=1e-5)
    assert rows[0]["val_loss"] == pytest.approx(math.log(65), abs=1e-5)
    assert sorted(os.listdir(out)) == ["log.jsonl", "meta.json"]  # no checkpoint
    assert "eval 0: train loss 4.1744, val loss 4.1744" in capsys.readouterr().out


@pytest.mark.parametrize(
    "args, message",
    [
        ([], "give exactly one of --dataset=NAME"),
        (["--dataset=x", "--text=y"], "give exactly one of --dataset=NAME"),
        (["--text=/no/such.txt"], "cannot read text file /no/such.txt"),
        (["--dataset=nothing_here"], "meta.json not found"),
        (["--init_from=nowhere", "--text=x"], "init_from='nowhere' is none of resume, gpt2"),
    ],
)
def test_bad_input(tiny_run_dir, tmp_path, args, message):
    with pytest.raises(GptcraftError) as e:
        run.main([f"--out_dir={tiny_run_dir}", f"--data_dir={tmp_path}", "--device=cpu", *args])
    assert message in str(e.value)


def test_tokens_beyond_the_vocabulary_are_refused(tiny_run_dir, tmp_path):
    (tmp_path / "d").mkdir()
    meta = {"tokenizer": "char", "vocab_size": 301, "chars": [chr(256 + i) for i in range(301)]}
    (tmp_path / "d" / "meta.json").write_text(json.dumps(meta))
    for split in ("train", "val"):
        np.array([1, 2, 300], dtype="<u2").tofile(tmp_path / "d" / f"{split}.bin")
    with pytest.raises(GptcraftError, match="token id 300, beyond the model's vocabulary of 65"):
        run.main([f"--out_dir={tiny_run_dir}", f"--data_dir={tmp_path}", "--dataset=d", "--device=cpu"])


@pytest.mark.parametrize("name", ["gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl"])
def test_eval_gpt2_configs_evaluate_openai_weights_once(name):
    from gptcraft.config import parse_config
    from gptcraft.train.loop import TrainConfig

    cfg = parse_config(TrainConfig, [str(ROOT / "configs" / f"eval_{name.replace('-', '_')}.py")])
    assert (cfg.init_from, cfg.eval_only, cfg.dataset) == (name, True, "openwebtext")


def test_max_tokens_cuts_across_shards():
    pieces = [np.arange(5), np.arange(5, 9), np.arange(9, 20)]
    assert [p.tolist() for p in run.first_tokens(pieces, 7)] == [[0, 1, 2, 3, 4], [5, 6]]
    assert sum(len(p) for p in run.first_tokens(pieces, 100)) == 20
