"""Nothing outside gptcraft's own files is ever written or deleted (issue 22): the audit's
reproductions, each in a tmp_path, with tiny data and in-process where the command allows."""

import errno
import json
import os
import signal

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
from conftest import GPT2_TIKTOKEN, run_here

from gptcraft import export, files
from gptcraft.data.shards import TokenFileError, open_dataset, shard_meta, write_meta, write_shard
from gptcraft.errors import GptcraftError
from gptcraft.prepare import corpus, shakespeare_char
from gptcraft.runs import checkpoint, start
from gptcraft.runs.checkpoint import CheckpointError
from gptcraft.runs.lock import OutDirError
from gptcraft.visualize import png

SMALL = "to be or not to be\n" * 100


@pytest.fixture
def small_text(tmp_path):
    path = tmp_path / "small.txt"
    path.write_text(SMALL)
    return path


def tree(folder):
    """Every path under folder (links not followed) with its bytes, link target or None for a folder."""
    found = {}
    for root, dirs, names in os.walk(folder):
        for name in dirs + names:
            path = os.path.join(root, name)
            rel = os.path.relpath(path, folder)
            if os.path.islink(path):
                found[rel] = "-> " + os.readlink(path)
            elif os.path.isdir(path):
                found[rel] = None
            else:
                with open(path, "rb") as f:
                    found[rel] = f.read()
    return found


def prepare_char(*args, cwd=None):
    return run_here("prepare/shakespeare_char.py", *args, cwd=cwd)


def one_line_error(result, *phrases):
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert all(p in lines[0] for p in phrases), lines[0]


def test_pictures_replace_a_link_never_write_through_it(tmp_path):
    precious = tmp_path / "precious.txt"
    precious.write_text("precious")
    (tmp_path / "attention.png").symlink_to(precious)
    (tmp_path / "positions.png").symlink_to(tmp_path / "nowhere.txt")  # dangling
    for name in ("attention.png", "positions.png"):
        png.save(plt.figure(figsize=(1, 1)), str(tmp_path / name))
        assert not (tmp_path / name).is_symlink() and (tmp_path / name).read_bytes().startswith(b"\x89PNG")
    assert precious.read_text() == "precious" and not (tmp_path / "nowhere.txt").exists()


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_a_sharded_save_never_follows_or_deletes_a_link(tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    (other / "keep.txt").write_text("the user's")
    run = tmp_path / "run"
    run.mkdir()
    tensors, state = {"w": torch.arange(4.0)}, {"iter_num": 1}
    checkpoint.save_sharded(run, tensors, state, master=True)  # one process, no process group
    assert (run / checkpoint.SHARDED / files.MARKER).exists()
    checkpoint.save_sharded(run, {"w": torch.ones(4)}, {"iter_num": 2}, master=True)  # replaces its own
    assert checkpoint.load_sharded_state(run / checkpoint.SHARDED)["iter_num"] == 2
    config = {"out_dir": str(run), "init_from": "auto", "fsdp": True, "overwrite": False}
    for name in (checkpoint.SHARDED, checkpoint.SHARDED + ".tmp"):
        files.remove_dir(run / checkpoint.SHARDED, checkpoint.is_sharded_file)
        (run / name).symlink_to(other)
        with pytest.raises(CheckpointError, match=rf"{name} is a symbolic link; gptcraft does not .*--out_dir"):
            checkpoint.save_sharded(run, tensors, state, master=True)
        # Every rank meets the link at start, before a collective save could.
        with pytest.raises(files.LinkError, match=rf"{name} is a symbolic link"):
            start.decide_start(config)
        assert (run / name).is_symlink() and tree(other) == {"keep.txt": b"the user's"}
        (run / name).unlink()


def test_a_folder_of_someone_elses_files_is_never_replaced_nor_its_old_sibling_deleted(tmp_path, small_text):
    u = tmp_path / "u"
    u.mkdir()
    (u / "train.bin").write_text("the user's own train.bin")
    (tmp_path / "u.old").mkdir()
    (tmp_path / "u.old" / "thesis.tex").write_text("the user's")
    before = tree(tmp_path)
    result = prepare_char("--input", small_text, "--out_dir", u)
    one_line_error(result, f"{u} holds files gptcraft did not write (train.bin)", "choose another --out_dir")
    (u / "train.bin").unlink()  # now u is empty: prepared into, but u.old is not gptcraft's to delete
    one_line_error(prepare_char("--input", small_text, "--out_dir", u), f"{u}.old holds files gptcraft did not")
    (u / "train.bin").write_text("the user's own train.bin")
    assert tree(tmp_path) == before
    # --out_dir naming a file: refused before it is touched (it was renamed to FILE.old).
    one_line_error(prepare_char("--input", small_text, "--out_dir", small_text), f"{small_text} is a file")
    assert small_text.read_text() == SMALL and tree(tmp_path) == before


def test_a_dataset_folder_keeps_its_permissions_and_the_current_folder_is_never_replaced(tmp_path, small_text):
    data = tmp_path / "chars"
    shakespeare_char.prepare(data, small_text)
    os.chmod(data, 0o700)
    shakespeare_char.prepare(data, small_text)
    assert os.stat(data).st_mode & 0o777 == 0o700
    (tmp_path / "chars.old").mkdir()
    (tmp_path / "chars.old" / "notes").write_text("the user's")
    before = tree(tmp_path)
    one_line_error(prepare_char("--input", small_text, "--out_dir", ".", cwd=data), "is the current folder")
    assert tree(tmp_path) == before and os.stat(data).st_mode & 0o777 == 0o700


def test_an_interrupted_swap_is_undone_and_the_users_files_kept(tmp_path, small_text):
    u = tmp_path / "u"
    shakespeare_char.prepare(u, small_text)
    (u / "notes.txt").write_text("the user's")
    # A crash between the two renames: u -> u.old done, u.tmp (complete) -> u not yet.
    os.rename(u, tmp_path / "u.old")
    files.make_dir(tmp_path / "u.tmp")
    (tmp_path / "that.txt").write_text("that is the question\n" * 100)
    shakespeare_char.prepare(u, tmp_path / "that.txt")
    assert (u / "notes.txt").read_text() == "the user's"
    assert json.loads((u / "meta.json").read_text())["vocab_size"] == 12
    assert sorted(p.name for p in tmp_path.iterdir()) == ["small.txt", "that.txt", "u"]


def corpus_args(source, out, *extra):
    args = ["--input", str(source), "--out_dir", str(out), "--num_proc", "1", "--tokenizer_file", str(GPT2_TIKTOKEN)]
    return corpus.parser().parse_args([*args, *extra])


def test_corpus_preparation_never_deletes_a_sibling_tmp_folder_it_did_not_make(tmp_path):
    source = tmp_path / "c.jsonl"
    source.write_text("".join(json.dumps({"text": f"document {i} " * 5}) + "\n" for i in range(20)))
    (tmp_path / "x.tmp").mkdir()
    (tmp_path / "x.tmp" / "results.csv").write_text("the user's")
    with pytest.raises(files.FolderError, match=r"x.tmp holds files gptcraft did not write \(results.csv\)"):
        corpus.prepare(corpus_args(source, tmp_path / "x"))
    assert (tmp_path / "x.tmp" / "results.csv").read_text() == "the user's" and not (tmp_path / "x").exists()


@pytest.mark.parametrize("script", ["prepare/shakespeare_char.py", "prepare/shakespeare.py"])
def test_an_empty_input_never_replaces_a_dataset(tmp_path, small_text, script):
    out = tmp_path / "d"
    extra = ["--tokenizer_file", GPT2_TIKTOKEN] if script.endswith("shakespeare.py") else []
    assert run_here(script, "--input", small_text, "--out_dir", out, *extra).returncode == 0
    before = tree(out)
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    one_line_error(run_here(script, "--input", empty, "--out_dir", out, *extra), f"--input {empty} holds 0 characters")
    assert tree(out) == before


def test_a_new_run_never_deletes_what_it_did_not_write(tmp_path):
    out = tmp_path / "run"
    (out / checkpoint.SHARDED).mkdir(parents=True)
    (out / checkpoint.SHARDED / "photo.jpg").write_text("the user's")
    (out / "log.jsonl").write_text("the user's log\n")
    before = tree(out)
    config = {"out_dir": str(out), "init_from": "auto", "fsdp": False, "overwrite": False}
    # A ckpt.dcp/ that gptcraft did not write is refused at start, overwrite or not: its first save deletes one.
    for overwrite in (False, True):
        with pytest.raises(files.FolderError, match=r"ckpt.dcp holds files gptcraft did not write \(photo.jpg\)"):
            start.decide_start({**config, "overwrite": overwrite})
    assert tree(out) == before
    (out / checkpoint.SHARDED / "photo.jpg").unlink()
    with pytest.raises(OutDirError, match=r"holds log.jsonl, ckpt.dcp but no checkpoint of a run; .*--overwrite=True"):
        start.decide_start(config)
    assert (out / "log.jsonl").read_text() == "the user's log\n"
    assert start.decide_start({**config, "overwrite": True}) == "new"
    start.clear_previous(out)
    assert os.listdir(out) == []


def test_a_fifo_in_place_of_a_token_file_is_refused_without_opening_it(tmp_path):
    data = tmp_path / "d"
    data.mkdir()
    ids = np.arange(100) % 7
    splits = {}
    for split in ("train", "val"):
        write_shard(data / f"{split}_000000.bin", ids)
        splits[split] = {"shards": [{"file": f"{split}_000000.bin", "tokens": 100}], "documents": 1}
    write_meta(data, shard_meta({"tokenizer": "char", "vocab_size": 7, "chars": list("abcdefg")}, splits))
    (data / "val_000000.bin").unlink()
    os.mkfifo(data / "val_000000.bin")
    # Opening a FIFO blocks until a writer comes: an alarm turns that bug into a failure.
    previous = signal.signal(signal.SIGALRM, lambda *a: pytest.fail("blocked opening a FIFO"))
    signal.alarm(20)
    try:
        with pytest.raises(TokenFileError, match=r"val_000000.bin is not a regular file \(a FIFO"):
            open_dataset(data)
        legacy = tmp_path / "legacy"
        legacy.mkdir()
        write_meta(legacy, {"tokenizer": "char", "vocab_size": 7, "chars": list("abcdefg")})
        os.mkfifo(legacy / "train.bin")
        with pytest.raises(TokenFileError, match=r"train.bin is not a regular file"):
            open_dataset(legacy)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def test_export_swaps_a_whole_folder_in_and_refuses_files_and_read_only_folders(tmp_path, tiny_run_dir, monkeypatch):
    hf_dir = tmp_path / "hf"
    args = [f"--out_dir={tiny_run_dir}", f"--hf_dir={hf_dir}"]
    export.main(args)
    (hf_dir / "README.md").write_text("the user's model card")
    before = tree(hf_dir)

    def full_disk(*a):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(export, "write_meta", full_disk)  # model.safetensors and config.json are written by then
    with pytest.raises(export.ExportError, match=rf"could not write {hf_dir} \(No space left on device\); it is left"):
        export.main([*args, "--overwrite=True"])
    monkeypatch.undo()
    assert tree(hf_dir) == before and sorted(os.listdir(tmp_path)) == ["hf", "run"]
    export.main([*args, "--overwrite=True"])
    assert (hf_dir / "README.md").read_text() == "the user's model card"
    os.chmod(hf_dir, 0o555)
    with pytest.raises(GptcraftError, match=rf"{hf_dir} is read-only; make it writable or choose another --hf_dir"):
        export.main([*args, "--overwrite=True"])
    os.chmod(hf_dir, 0o755)
    a_file = tmp_path / "model.bin"
    a_file.write_text("the user's")
    with pytest.raises(GptcraftError, match=rf"{a_file} is a file, not a folder gptcraft made"):
        export.main([f"--out_dir={tiny_run_dir}", f"--hf_dir={a_file}"])
    assert a_file.read_text() == "the user's"
