"""Whole-val evaluation: every token scored exactly once, and the train.py option that logs it."""

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_train_args

from gptcraft.evaluate.loss import split_loss
from gptcraft.model import GPT, GPTConfig
from gptcraft.system.distributed import Dist
from gptcraft.train import loop


def test_full_val_scores_every_token_once():
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=8, vocab_size=20, n_layer=1, n_head=2, n_embd=16))
    tokens = np.random.default_rng(0).integers(0, 20, size=43).astype(np.uint16)  # 42 targets: 5 full windows + 2
    # Reference: one window at a time, summing per-token losses by hand.
    total, scored = 0.0, 0
    with torch.no_grad():
        for s in range(0, 42, 8):
            chunk = torch.from_numpy(tokens[s : s + 9].astype(np.int64))[None]
            logits, _ = model(chunk[:, :-1], chunk[:, 1:])
            total += F.cross_entropy(logits[0], chunk[0, 1:], reduction="sum").item()
            scored += chunk.size(1) - 1
    assert scored == 42
    for batch_size in (1, 2, 4, 16):
        got = split_loss(model, [tokens], 8, batch_size, "cpu", "float32", Dist())
        assert abs(got - total / scored) < 1e-5, batch_size
    assert model.training  # the model is put back as it was


def test_full_val_batches_all_have_one_shape():
    """A compiled model would recompile for a shorter last batch or window: there is none."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=8, vocab_size=20, n_layer=1, n_head=2, n_embd=16))
    shapes = []
    model.register_forward_pre_hook(lambda module, args: shapes.append(tuple(args[0].shape)))
    tokens = np.random.default_rng(0).integers(0, 20, size=43).astype(np.uint16)  # 6 windows, the last short
    split_loss(model, [tokens], 8, 4, "cpu", "float32", Dist())
    assert shapes == [(4, 8), (4, 8)]


def test_train_logs_full_val_on_last_eval_row(char_data_dir, tmp_path, capsys):
    out = tmp_path / "run"
    switches = dict(optimizer="muon", pos_embedding="rope", qk_norm=True, activation="relu2",
                    tie_embeddings=False, zero_init_proj=True, logit_softcap=30.0, warmdown_iters=10)  # fmt: skip
    loop.main(tiny_train_args(char_data_dir, out, max_iters=20, eval_interval=10, full_val=True, **switches))
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "val_loss" in r]
    assert [r["iter"] for r in evals] == [0, 10, 20]
    assert [("full_val_loss" in r) for r in evals] == [False, False, True]
    assert "full val loss" in capsys.readouterr().out
    # The figure is the loss of the final weights over every val token, and they have learned.
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    model = GPT(GPTConfig(**ckpt["model_args"]))
    model.load_state_dict(ckpt["model"])
    val = np.fromfile(char_data_dir / "shakespeare_char" / "val.bin", dtype="<u2")
    expected = split_loss(model, [val], 32, 8, "cpu", "float32", Dist())
    assert evals[-1]["full_val_loss"] == pytest.approx(expected, rel=1e-5)
    assert expected < math.log(65) - 0.7


def test_full_val_off_by_default(char_data_dir, tmp_path):
    out = tmp_path / "run"
    loop.main(tiny_train_args(char_data_dir, out, max_iters=5, eval_interval=5))
    assert "full_val_loss" not in (out / "log.jsonl").read_text()


def test_split_in_several_files_is_scored_by_target_count():
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=8, vocab_size=20, n_layer=1, n_head=2, n_embd=16))
    rng = np.random.default_rng(1)
    a, b = rng.integers(0, 20, size=30).astype(np.uint16), rng.integers(0, 20, size=11).astype(np.uint16)
    la, lb = (split_loss(model, [p], 8, 4, "cpu", "float32", Dist()) for p in (a, b))
    got = split_loss(model, [a, b, a[:1]], 8, 4, "cpu", "float32", Dist())  # a 1-token file adds nothing
    assert abs(got - (29 * la + 10 * lb) / 39) < 1e-6
