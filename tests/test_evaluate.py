"""evaluate.py: loss and perplexity of a checkpoint on a text file or a prepared dataset split."""

import json
import math

import numpy as np
import pytest
import torch
from conftest import ROOT

from gptcraft.errors import GptcraftError
from gptcraft.evaluate import run
from gptcraft.init_from import load_model


def test_text_file_loss_is_the_mean_over_every_token(tiny_run_dir, tmp_path, capsys):
    text = "First Citizen:\nBefore we proceed any further, hear me speak.\n" * 3  # 165 characters: 6 windows
    (tmp_path / "t.txt").write_text(text)
    loss = run.main([f"--out_dir={tiny_run_dir}", f"--text={tmp_path / 't.txt'}", "--device=cpu",
                          "--batch_size=4"])  # fmt: skip
    model, tok = load_model("resume", tiny_run_dir, "cpu")
    ids = torch.tensor(tok.encode(text))
    total = 0.0
    for s in range(0, len(ids) - 1, 32):  # block_size 32, windows scored one by one
        x, y = ids[s : s + 32], ids[s + 1 : s + 33]
        _, window_loss = model(x[: len(y)][None], y[None])
        total += window_loss.item() * len(y)
    assert loss == pytest.approx(total / (len(ids) - 1), rel=1e-5)
    line = capsys.readouterr().out
    assert f"loss {loss:.4f}, perplexity {math.exp(loss):.3f} over {len(ids) - 1:,} tokens" in line


def test_dataset_split_and_max_tokens(tiny_run_dir, char_data_dir, capsys):
    common = [f"--out_dir={tiny_run_dir}", f"--data_dir={char_data_dir}", "--dataset=shakespeare_char",
              "--device=cpu", "--max_tokens=2000"]  # fmt: skip
    val = run.main(common)
    train = run.main([*common, "--split=train"])
    assert "shakespeare_char val: loss" in capsys.readouterr().out
    assert val != train and math.log(65) - 1 < val < math.log(65) + 1  # a random model: about uniform


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
