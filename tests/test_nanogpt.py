"""nanoGPT's data folders and checkpoints, made here in nanoGPT's own formats, train, sample,
evaluate, export and resume as they are; a meta.pkl that would run code is refused."""

import hashlib
import os
import pickle

import numpy as np
import pytest
import torch
from conftest import run_script, tiny_train_args

from gptcraft import export, load, sample
from gptcraft.data.nanogpt import MetaPickleError, read_meta_pkl
from gptcraft.data.shards import open_dataset, read_meta
from gptcraft.errors import GptcraftError
from gptcraft.evaluate import cli as run
from gptcraft.model import GPT, GPTConfig
from gptcraft.prepare import index_shards
from gptcraft.runs.resume import nanogpt_optimizer_state
from gptcraft.track.logfile import read_log
from gptcraft.train import loop


def sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_nanogpt_char_folder(folder, text):
    """What nanoGPT's data/shakespeare_char/prepare.py writes: flat uint16 train.bin / val.bin and meta.pkl."""
    chars = sorted(set(text))
    stoi, itos = {ch: i for i, ch in enumerate(chars)}, dict(enumerate(chars))
    ids = np.array([stoi[c] for c in text], dtype=np.uint16)
    n = int(0.9 * len(ids))
    folder.mkdir(parents=True)
    ids[:n].tofile(folder / "train.bin")
    ids[n:].tofile(folder / "val.bin")
    with open(folder / "meta.pkl", "wb") as f:
        pickle.dump({"vocab_size": len(chars), "itos": itos, "stoi": stoi}, f)
    return folder


@pytest.fixture(scope="module")
def nanogpt_data(tmp_path_factory, shakespeare_path):
    """A data_dir holding nanoGPT's shakespeare_char."""
    data_dir = tmp_path_factory.mktemp("nanogpt") / "data"
    write_nanogpt_char_folder(data_dir / "shakespeare_char", shakespeare_path.read_text())
    return data_dir


class Payload:
    """Loading its pickle would create `marker`: what a malicious meta.pkl could do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.makedirs, (self.marker,)


def test_a_nanogpt_folder_trains_samples_and_evaluates_untouched(nanogpt_data, tmp_path, capsys):
    folder = nanogpt_data / "shakespeare_char"
    before = {p.name: sha(p) for p in folder.iterdir()}
    out = tmp_path / "out"
    loop.main(tiny_train_args(nanogpt_data, out, max_iters=10, eval_interval=10))
    assert read_meta(out)["tokenizer"] == "char" and read_meta(out)["vocab_size"] == 65
    sample.main([f"--out_dir={out}", "--device=cpu", "--num_samples=1", "--max_new_tokens=20", "--start=ROMEO"])
    assert "ROMEO" in capsys.readouterr().out
    loss = run.main([f"--out_dir={out}", f"--data_dir={nanogpt_data}", "--dataset=shakespeare_char",
                     "--device=cpu", "--max_tokens=2000"])  # fmt: skip
    assert 0 < loss < np.log(65) + 1
    assert {p.name: sha(p) for p in folder.iterdir()} == before  # nothing written, nothing changed


def test_a_gpt2_folder_without_meta_pkl_reads_as_gpt2_bpe(tmp_path):
    folder = tmp_path / "owt"
    folder.mkdir()
    for split in ("train", "val"):
        np.arange(1000, dtype=np.uint16).tofile(folder / f"{split}.bin")
    ds = open_dataset(folder)
    assert ds.meta["tokenizer"] == "gpt2" and ds.splits["train"][0].count == 1000
    assert ds.splits["val"][0].memmap()[999] == 999  # the tokens are read in place, as written


def test_index_shards_describes_a_nanogpt_folder(tmp_path, shakespeare_path, capsys):
    folder = write_nanogpt_char_folder(tmp_path / "sc", shakespeare_path.read_text()[:5000])
    bins = {p: sha(folder / p) for p in ("train.bin", "val.bin")}
    index_shards.main(["--dir", str(folder)])
    assert read_meta(folder)["chars"][:2] == ["\n", " "]
    assert {p: sha(folder / p) for p in bins} == bins
    assert "nanoGPT train.bin and val.bin, char vocabulary of" in capsys.readouterr().out


def test_a_meta_pkl_that_would_run_code_is_refused(tmp_path, shakespeare_path):
    folder = write_nanogpt_char_folder(tmp_path / "data" / "evil", shakespeare_path.read_text()[:5000])
    marker = tmp_path / "code_ran"
    with open(folder / "meta.pkl", "wb") as f:
        pickle.dump({"vocab_size": 3, "itos": Payload(str(marker))}, f)
    with pytest.raises(MetaPickleError, match="names os.makedirs, and only plain dicts"):
        open_dataset(folder)
    result = run_script("train.py", *tiny_train_args(tmp_path / "data", tmp_path / "out", dataset="evil"),
                        check=False)  # fmt: skip
    assert result.returncode == 2 and not marker.exists()
    assert result.stderr.count("\n") == 1 and "meta.pkl is refused" in result.stderr


def test_meta_pkl_ids_keep_their_characters_in_any_order(tmp_path):
    """Id i decodes to itos[i], whatever order the characters or the dict's keys are in."""
    with open(tmp_path / "meta.pkl", "wb") as f:
        pickle.dump({"vocab_size": 3, "itos": {2: "m", 0: "z", 1: "a"}, "stoi": {"z": 0, "a": 1, "m": 2}}, f)
    assert read_meta_pkl(tmp_path / "meta.pkl") == {"tokenizer": "char", "vocab_size": 3, "chars": ["z", "a", "m"]}


@pytest.mark.parametrize("itos", [{0: "a", "1": "b"}, {0: "a", 1.0: "b"}, {0: "a", 2: "b"}, {0: "a", 1: 5}])
def test_meta_pkl_ids_of_other_types_are_one_line(tmp_path, itos):
    with open(tmp_path / "meta.pkl", "wb") as f:
        pickle.dump({"vocab_size": 2, "itos": itos}, f)
    with pytest.raises(MetaPickleError, match=r"itos must map each id 0 .. 1 \(vocab_size - 1\) to a string"):
        read_meta_pkl(tmp_path / "meta.pkl")


def nanogpt_checkpoint(out_dir, vocab_size, iter_num=10):
    """What nanoGPT's train.py saves: a compiled model's weights, with the causal-mask buffers
    of its non-flash attention, its AdamW (two groups) after a step, model_args and config."""
    model_args = dict(n_layer=2, n_head=2, n_embd=32, block_size=32, bias=False, vocab_size=vocab_size, dropout=0.0)
    torch.manual_seed(1)
    model = GPT(GPTConfig(**model_args))
    params = dict(model.named_parameters())
    groups = [{"params": [p for p in params.values() if p.dim() >= 2], "weight_decay": 0.1},
              {"params": [p for p in params.values() if p.dim() < 2], "weight_decay": 0.0}]  # fmt: skip
    optimizer = torch.optim.AdamW(groups, lr=1e-3, betas=(0.9, 0.99))
    model(torch.zeros(1, 8, dtype=torch.long), torch.ones(1, 8, dtype=torch.long))[1].backward()
    optimizer.step()
    weights = {}
    for name, tensor in model.state_dict().items():
        weights[f"_orig_mod.{name}"] = tensor
        if name.endswith("ln_1.weight"):  # nanoGPT registers its mask as attn.bias
            weights[f"_orig_mod.{name[: -len('ln_1.weight')]}attn.bias"] = torch.ones(1, 1, 32, 32).tril()
    config = {"dataset": "shakespeare_char", "n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 32,
              "bias": False, "dropout": 0.0, "batch_size": 8, "learning_rate": 1e-3}  # fmt: skip
    out_dir.mkdir(parents=True)
    torch.save({"model": weights, "optimizer": optimizer.state_dict(), "model_args": model_args,
                "iter_num": iter_num, "best_val_loss": torch.tensor(4.0), "config": config},
               out_dir / "ckpt.pt")  # fmt: skip
    return model, optimizer


def test_a_nanogpt_checkpoint_samples_evaluates_and_exports(nanogpt_data, tmp_path, monkeypatch, capsys):
    out = nanogpt_data.parent / "out-nano"  # beside data/, where nanoGPT's sample.py is run
    model, _ = nanogpt_checkpoint(out, vocab_size=65)
    monkeypatch.chdir(nanogpt_data.parent)
    sample.main(["--out_dir=out-nano", "--device=cpu", "--num_samples=1", "--max_new_tokens=5", "--start=KING"])
    assert "KING" in capsys.readouterr().out  # decoded with data/shakespeare_char/meta.pkl
    text = tmp_path / "t.txt"
    text.write_text("First Citizen:\nBefore we proceed any further, hear me speak.\n")
    assert abs(run.main(["--out_dir=out-nano", f"--text={text}", "--device=cpu"]) - np.log(65)) < 1  # random weights
    hf = tmp_path / "hf"
    export.main(["--out_dir=out-nano", f"--hf_dir={hf}"])
    assert read_meta(hf)["tokenizer"] == "char"
    with pytest.raises(GptcraftError, match="already holds a model .* --overwrite=True"):
        export.main(["--out_dir=out-nano", f"--hf_dir={hf}"])
    export.main(["--out_dir=out-nano", f"--hf_dir={hf}", "--overwrite=True"])
    monkeypatch.chdir(tmp_path)  # data/shakespeare_char/meta.pkl is not found from here
    with pytest.raises(GptcraftError, match="not GPT-2's; .* holds data/shakespeare_char/meta.pkl"):
        sample.main([f"--out_dir={out}", "--device=cpu"])


def test_a_nanogpt_checkpoint_resumes_with_its_weights_and_adamw_state(nanogpt_data, tmp_path, capsys):
    out = tmp_path / "out"
    model, optimizer = nanogpt_checkpoint(out, vocab_size=65)
    saved = torch.load(out / "ckpt.pt", weights_only=True)
    weights = {k.replace("_orig_mod.", ""): v for k, v in saved["model"].items() if v.dim() != 4}
    moments = nanogpt_optimizer_state(saved["optimizer"], weights, saved["model_args"])
    for name, p in model.named_parameters():
        assert torch.equal(moments[name]["exp_avg"], optimizer.state[p]["exp_avg"]), name
    loop.main(tiny_train_args(nanogpt_data, out, init_from="resume", max_iters=12, eval_interval=12))
    printed = capsys.readouterr().out
    assert "at iteration 10" in printed and "is nanoGPT's" in printed and "optimizer starts afresh" not in printed
    ours = torch.load(out / "ckpt.pt", weights_only=True)
    assert ours["iter_num"] == 12 and [r["iter"] for r in read_log(out) if "val_loss" in r] == [12]


def test_a_gpt2_sized_nanogpt_run_without_meta_decodes_with_gpt2_bpe(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no data/openwebtext/ here, as on a machine that only has out/
    ckpt = {"config": {"dataset": "openwebtext"}}
    assert load.run_meta(str(tmp_path), ckpt, 50304)["tokenizer"] == "gpt2"
    with pytest.raises(load.InitFromError, match="65-token vocabulary is not GPT-2's"):
        load.run_meta(str(tmp_path), ckpt, 65)
