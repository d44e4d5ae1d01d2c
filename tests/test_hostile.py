"""Hostile and unlucky inputs (issue 16): no code runs from a run folder, write failures give one
line and keep the old files, preparation swaps a whole dataset in, folder contents are checked
cheaply, and limits are refused with one line."""

import errno
import json
import os
import pickle
import re

import numpy as np
import pytest
import torch
from conftest import GPT2_TIKTOKEN, ROOT, run_here, run_script, tiny_train_args
from safetensors.torch import save_file

from gptcraft import generate, hf, sample
from gptcraft.config import ConfigError
from gptcraft.data.shards import TokenFileError, open_dataset, shard_meta, write_meta, write_shard, write_tokens
from gptcraft.data.tokenizer import TokenizerError
from gptcraft.hf import HFFormatError
from gptcraft.load import check_init_from
from gptcraft.prepare import corpus, shakespeare_char
from gptcraft.runs import checkpoint
from gptcraft.runs.checkpoint import CheckpointError
from gptcraft.track import runlog
from gptcraft.track.runlog import TrackingError
from gptcraft.train import loop


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


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_a_temperature_that_is_not_finite_is_refused(tiny_run_dir, value):
    with pytest.raises(ConfigError, match="temperature must be a finite number"):
        sample.main([f"--out_dir={tiny_run_dir}", "--device=cpu", f"--temperature={value}"])


@pytest.mark.parametrize("temperature", [1e-45, 1e-300])
def test_a_tiny_temperature_decodes_greedily(temperature):
    logits = torch.randn(4, 50) * 30
    logits[0, :2] = logits[0].max() + 1  # a tie: either of the two
    tokens = generate.sample(logits, temperature, top_k=10, generator=torch.Generator().manual_seed(0))
    assert torch.equal(tokens[1:], logits[1:].argmax(-1, keepdim=True))
    assert tokens[0, 0] in (0, 1)


def test_num_samples_beyond_memory_is_refused_before_generating(tiny_run_dir):
    with pytest.raises(ConfigError, match=r"num_samples=1000000000000 needs about .* GiB .* or fewer"):
        sample.main([f"--out_dir={tiny_run_dir}", "--device=cpu", "--num_samples=1000000000000"])


def test_more_distinct_characters_than_uint16_ids_are_refused(tmp_path):
    text = tmp_path / "many.txt"
    text.write_text("".join(chr(c) for c in range(0x10000, 0x10000 + 70_000)))
    with pytest.raises(TokenizerError, match="70,000 distinct characters, more than the 65,536 ids"):
        shakespeare_char.prepare(tmp_path / "data", text)
    assert not (tmp_path / "data").exists()


RUN = {"max_iters": 30, "eval_interval": 10, "log_interval": 5}


def test_torch_save_failing_on_a_full_disk_gives_the_documented_line(char_data_dir, tmp_path, monkeypatch):
    out, real_save, saves = tmp_path / "run", torch.save, []

    def save_until_full(obj, f, *args, **kwargs):
        saves.append(1)
        if len(saves) > 2:  # best.pt and ckpt.pt at iter 10 fit; nothing after
            f.write(b"partial")
            raise RuntimeError("[enforce fail at inline_container.cc:626] . unexpected pos 4416 vs 4310")
        real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save_until_full)
    with pytest.raises(CheckpointError, match=r"could not write .*best.pt \(\[enforce fail.*unexpected pos.*intact"):
        loop.main(tiny_train_args(char_data_dir, out, **RUN))
    monkeypatch.undo()
    assert checkpoint.load_checkpoint(out / "ckpt.pt")["iter_num"] == 10


class FullDisk:
    """A text file that takes `rows` writes, then fails as a full disk does."""

    def __init__(self, f, rows):
        self.f, self.rows = f, rows

    def write(self, text):
        self.rows -= 1
        if self.rows < 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return self.f.write(text)

    def __getattr__(self, name):
        return getattr(self.f, name)


def test_a_full_disk_while_writing_log_jsonl_gives_the_documented_line(char_data_dir, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    new_file = runlog.open_new  # a new run's log.jsonl is opened with gptcraft.files.open_new
    monkeypatch.setattr(runlog, "open_new", lambda *a, **k: FullDisk(new_file(*a, **k), rows=5))
    with pytest.raises(TrackingError, match=r"could not write .*log.jsonl \(No space left on device\); the previous"):
        loop.main(tiny_train_args(char_data_dir, out, **RUN))
    monkeypatch.undo()
    # Rows: start, eval 0, iters 5 and 10, eval 10; the row of iter 15 fails and the run stops there.
    assert "iter 15" in capsys.readouterr().out
    assert len((out / "log.jsonl").read_text().splitlines()) == 5
    assert checkpoint.load_checkpoint(out / "ckpt.pt")["iter_num"] == 10


def sharded_dataset(path, ids, **meta_fields):
    """A two-split sharded dataset in path whose train and val shards both hold `ids`."""
    splits = {}
    for split in ("train", "val"):
        write_shard(path / f"{split}_000000.bin", ids, 2)
        splits[split] = {"shards": [{"file": f"{split}_000000.bin", "tokens": len(ids)}], "max_token": 299}
    write_meta(path, shard_meta({"tokenizer": "gpt2", "vocab_size": 50257, **meta_fields}, splits))


def edit_meta(path, change):
    meta = json.loads((path / "meta.json").read_text())
    change(meta)
    (path / "meta.json").write_text(json.dumps(meta))


@pytest.mark.parametrize("name", ["../outside.bin", "/etc/passwd", "sub/train.bin", ".."])
def test_shard_names_outside_the_dataset_directory_are_refused(tmp_path, name):
    sharded_dataset(tmp_path, np.arange(300))
    edit_meta(tmp_path, lambda m: m["splits"]["train"]["shards"][0].update(file=name))
    with pytest.raises(TokenFileError, match=r"meta.json is malformed: shard file .* not a file name inside"):
        open_dataset(tmp_path)


@pytest.mark.parametrize("change, message", [
    (lambda m: m.update(vocab_size="50257"), "vocab_size is '50257', not a positive integer"),
    (lambda m: m.pop("vocab_size"), "vocab_size is None"),
    (lambda m: m["splits"]["val"]["shards"][0].pop("tokens"), "splits.val.shards holds"),
    (lambda m: m["splits"]["val"].update(max_token=-1), "splits.val.max_token is -1"),
    (lambda m: m.update(splits=[]), "splits is not an object of objects"),
])  # fmt: skip
def test_a_malformed_meta_json_is_named_in_one_line(tmp_path, change, message):
    sharded_dataset(tmp_path, np.arange(300))
    edit_meta(tmp_path, change)
    with pytest.raises(TokenFileError, match=re.escape(message)) as e:
        open_dataset(tmp_path)
    assert str(tmp_path / "meta.json") in str(e.value) and "\n" not in str(e.value)


def test_token_ids_beyond_what_meta_json_records_are_found_by_the_sampled_check(tmp_path):
    ids = np.arange(300)
    ids[7] = 1000  # meta.json records 299 as the largest id
    sharded_dataset(tmp_path, ids)
    with pytest.raises(TokenFileError, match="train_000000.bin holds token id 1000, above the largest id 299"):
        open_dataset(tmp_path).check_vocab(50257)


def test_a_char_vocabulary_smaller_than_its_data_is_refused_before_training(tmp_path):
    # meta.json claims 40 characters; the data uses 65 (ids up to 64): an IndexError, or a device assert on CUDA.
    data = tmp_path / "data" / "chars"
    data.mkdir(parents=True)
    for split in ("train", "val"):
        write_tokens(data / f"{split}.bin", np.arange(2000) % 65)
    write_meta(data, {"tokenizer": "char", "vocab_size": 40, "chars": [chr(65 + i) for i in range(40)]})
    args = tiny_train_args(tmp_path / "data", tmp_path / "run", dataset="chars", max_iters=1)
    with pytest.raises(TokenFileError, match="train.bin holds token id 64, above the largest id 39"):
        loop.main(args)


def test_a_bad_config_json_or_truncated_safetensors_is_named_in_one_line(tmp_path):
    folder = tmp_path / "hf"
    folder.mkdir()
    save_file({"wte.weight": torch.zeros(10, 4)}, folder / "model.safetensors")
    (folder / "config.json").write_text('{"n_layer": 2,')
    with pytest.raises(HFFormatError, match=r"config.json cannot be read as JSON") as e:
        hf.from_pretrained(str(folder))
    assert str(folder / "config.json") in str(e.value)
    (folder / "config.json").write_text(json.dumps({"n_layer": 2, "n_head": 2, "n_embd": "32"}))
    with pytest.raises(HFFormatError, match=r"n_embd='32', n_positions=None, vocab_size=None must be positive"):
        hf.from_pretrained(str(folder))
    config = {"n_layer": 1, "n_head": 1, "n_embd": 4, "n_positions": 8, "vocab_size": 10}
    (folder / "config.json").write_text(json.dumps(config))
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-20])
    with pytest.raises(HFFormatError, match=r"model.safetensors is truncated, corrupt or not plain tensors") as e:
        hf.from_pretrained(str(folder))
    assert "\n" not in str(e.value)
    (folder / "config.json").write_text(json.dumps({**config, "n_layer": 10**9}))
    with pytest.raises(
        HFFormatError, match=r"config.json: its sizes make a model of about 2.44e\+11 parameters, 909 GiB"
    ):
        hf.from_pretrained(str(folder))  # refused before building, at once


def test_a_checkpoint_with_absurd_sizes_or_wrong_shaped_weights_is_one_line(tiny_run_dir):
    ckpt = torch.load(tiny_run_dir / "ckpt.pt", weights_only=True)
    args = [f"--out_dir={tiny_run_dir}", "--device=cpu", "--max_new_tokens=2"]
    checkpoint.save_checkpoint(
        tiny_run_dir / "ckpt.pt", {**ckpt, "model_args": {**ckpt["model_args"], "n_layer": 10**9}}
    )
    result = run_here("sample.py", *args)
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert "ckpt.pt: its sizes make a model of about 1.27e+13 parameters, 47,326 GiB" in result.stderr
    wte = ckpt["model"]["transformer.wte.weight"]
    checkpoint.save_checkpoint(
        tiny_run_dir / "ckpt.pt", {**ckpt, "model": {**ckpt["model"], "transformer.wte.weight": wte.t()}}
    )
    result = run_here("sample.py", *args)
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert "ckpt.pt: the weights do not fit its model_args (size mismatch for transformer.wte.weight" in result.stderr


def test_a_local_folder_named_like_a_hub_model_must_be_said_which(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert hf.hub_name("gpt2") == "gpt2" and hf.hub_name("hub:gpt2-xl") == "gpt2-xl"
    (tmp_path / "gpt2").mkdir()
    with pytest.raises(HFFormatError, match="gpt2 names both OpenAI's model .* write hub:gpt2 or ./gpt2"):
        check_init_from("gpt2")
    assert hf.hub_name("./gpt2") is None and hf.hub_name("hub:gpt2") == "gpt2"
    with pytest.raises(HFFormatError, match="'hub:gpt3' is not a hub model; use one of hub:gpt2"):
        check_init_from("hub:gpt3")


def test_hub_models_and_datasets_are_fetched_at_a_pinned_revision_the_user_can_override(tmp_path, monkeypatch):
    """docs/gpt2.md, docs/data.md: what a name means cannot change upstream; @REVISION and
    --revision ask for another."""
    import datasets
    import huggingface_hub

    asked = []

    def offline(*args, **kwargs):
        asked.append(kwargs["revision"])
        raise OSError("offline")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    monkeypatch.setattr(datasets, "load_dataset", offline)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(HFFormatError, match=r"at revision 607a30d7\w+ .*another revision: --init_from=hub:gpt2@"):
        hf.fetch("gpt2")
    for name in ("hub:gpt2-xl", "hub:gpt2@main", "hub:gpt2@"):
        with pytest.raises(HFFormatError):
            hf.fetch(name)
    assert asked == [hf.HUB_REVISIONS["gpt2"], hf.HUB_REVISIONS["gpt2-xl"], "main", hf.HUB_REVISIONS["gpt2"]]
    asked.clear()
    for extra in ([], ["--revision=v1"], ["--dataset=someone/corpus"]):
        args = corpus.parser(dataset="openwebtext", out_dir=str(tmp_path / "owt")).parse_args(extra)
        with pytest.raises(corpus.CorpusError, match="cannot open dataset .* at revision"):
            corpus.open_corpus(args, [], None)
    assert asked == [corpus.DATASET_REVISIONS["openwebtext"], "v1", "main"]


def snapshot(folder):
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def test_a_failed_re_preparation_leaves_the_old_dataset_complete(tmp_path, shakespeare_path, monkeypatch):
    out = tmp_path / "shakespeare_char"
    shakespeare_char.prepare(out, shakespeare_path)
    (out / "notes.txt").write_text("the user's own")
    before = snapshot(out)
    small = tmp_path / "small.txt"
    small.write_text("to be or not to be\n" * 100)

    def disk_full(*args):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(shakespeare_char, "write_meta", disk_full)  # train.bin and val.bin are written by then
    with pytest.raises(OSError):
        shakespeare_char.prepare(out, small)
    monkeypatch.undo()
    assert snapshot(out) == before and sorted(p.name for p in tmp_path.iterdir()) == ["shakespeare_char", "small.txt"]
    open_dataset(out).check_vocab(65)
    shakespeare_char.prepare(out, small)
    assert json.loads((out / "meta.json").read_text())["vocab_size"] == 8  # "to be or n" and newline
    assert (out / "notes.txt").read_text() == "the user's own"


def test_a_failed_forced_corpus_preparation_leaves_the_old_dataset_complete(tmp_path, monkeypatch):
    source = tmp_path / "c.jsonl"
    source.write_text("".join(json.dumps({"text": f"document {i} " * 20}) + "\n" for i in range(40)))
    out = tmp_path / "out"

    def run(*extra):
        args = ["--input", str(source), "--out_dir", str(out), "--num_proc", "1", "--shard_tokens", "500"]
        return corpus.prepare(corpus.parser().parse_args([*args, "--tokenizer_file", str(GPT2_TIKTOKEN), *extra]))

    run()
    before = snapshot(out)
    route, routed = corpus.Pipeline.route, []

    def fail_on_the_second_chunk(self, result):
        routed.append(1)
        if len(routed) == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        route(self, result)

    monkeypatch.setattr(corpus, "CHUNK_CHARS", 2000)
    monkeypatch.setattr(corpus.Pipeline, "route", fail_on_the_second_chunk)
    with pytest.raises(OSError):
        run("--seed", "1", "--force")
    assert snapshot(out) == before
    assert len(open_dataset(out).splits["train"]) > 1


def test_help_and_docs_say_that_config_files_run_as_code(capsys):
    with pytest.raises(SystemExit):
        loop.main(["--help"])
    assert "CONFIG.py files are Python and run as code: load only your own" in capsys.readouterr().out
    assert "Config files are Python and run as code" in (ROOT / "docs" / "untrusted-files.md").read_text()


FULL_DISK_ON_RANK_0 = """
import os, sys
if os.environ.get("RANK") == "0":
    sys.path.insert(0, {tests!r})
    from test_hostile import FullDisk
    from gptcraft.track import runlog

    new_file = runlog.open_new
    runlog.open_new = lambda *a, **k: FullDisk(new_file(*a, **k), rows=5)
"""


def test_a_full_disk_on_rank_0_stops_every_rank_together(char_data_dir, tmp_path):
    hook = tmp_path / "hook"
    hook.mkdir()
    # sitecustomize runs first in every process.
    (hook / "sitecustomize.py").write_text(FULL_DISK_ON_RANK_0.format(tests=str(ROOT / "tests")))
    out = tmp_path / "run"
    args = tiny_train_args(char_data_dir, out, backend="gloo", gradient_accumulation_steps=2, **RUN)
    env = {"OMP_NUM_THREADS": "1", "PYTHONPATH": f"{hook}:{ROOT}"}
    result = run_script("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py", *args,
                        check=False, timeout=300, env=env)  # fmt: skip
    assert result.returncode != 0
    assert result.stderr.count("error: could not write") == 1, result.stderr[-3000:]
    assert "log.jsonl (No space left on device); the previous checkpoint is intact" in result.stderr
    assert checkpoint.load_checkpoint(out / "ckpt.pt")["iter_num"] == 10


def test_re_preparing_through_a_linked_data_folder_replaces_the_folder_it_points_to(tmp_path):
    small, real, link = tmp_path / "small.txt", tmp_path / "big_disk" / "chars", tmp_path / "chars"
    small.write_text("to be or not to be\n" * 100)
    real.parent.mkdir()
    shakespeare_char.prepare(real, small)
    link.symlink_to(real)
    small.write_text("that is the question\n" * 100)
    shakespeare_char.prepare(link, small)
    assert link.is_symlink() and json.loads((real / "meta.json").read_text())["vocab_size"] == 12
    assert sorted(p.name for p in real.parent.iterdir()) == ["chars"]
