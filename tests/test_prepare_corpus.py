"""prepare/corpus.py and prepare/shakespeare.py: exact tokens, determinism, resume, bad input, memory."""

import json
import random
import sys

import numpy as np
import pytest
from conftest import GPT2_TIKTOKEN, ROOT, run_script

from gptcraft import files
from gptcraft.data.shards import open_dataset, open_shard
from gptcraft.data.tokenizer import GPT2Tokenizer
from gptcraft.prepare import corpus, fineweb
from tools import bench_prepare

EOT = 50256


def documents(shakespeare_path, n):
    """n documents of 5 to 60 tiny-Shakespeare paragraphs, the kind tools/bench_prepare.py measures on."""
    return bench_prepare.documents(shakespeare_path, n, random.Random(0))


def write_jsonl(path, texts, key="text"):
    with open(path, "w") as f:
        for i, text in enumerate(texts):
            f.write(json.dumps({key: text, "id": i}) + "\n")
    return path


def run(input_path, out_dir, *extra):
    args = corpus.parser().parse_args(
        ["--input", str(input_path), "--out_dir", str(out_dir), "--tokenizer_file", str(GPT2_TIKTOKEN), *extra]
    )
    return corpus.prepare(args)


def split_tokens(out_dir, split):
    meta = json.loads((out_dir / "meta.json").read_text())
    return np.concatenate([open_shard(out_dir / s["file"]).memmap() for s in meta["splits"][split]["shards"]])


def test_tokens_are_tiktokens_encoding_of_each_document_plus_end_of_text(tmp_path, shakespeare_path):
    texts = documents(shakespeare_path, 60)
    texts[3] = "text that spells <|endoftext|> is plain text, and ünïcödé 🙂"
    texts[7] = ""  # empty documents are skipped
    meta = run(write_jsonl(tmp_path / "c.jsonl", texts), tmp_path / "out", "--val_fraction", "0.1", "--num_proc", "1")
    kept = [t for t in texts if t]
    is_val = np.random.default_rng(2357).random(len(kept)) < 0.1  # the documented draw: one per document
    enc = GPT2Tokenizer(GPT2_TIKTOKEN).enc
    for split, mask in (("train", ~is_val), ("val", is_val)):
        expected = [i for t, m in zip(kept, mask, strict=True) if m for i in enc.encode_ordinary(t) + [EOT]]
        assert split_tokens(tmp_path / "out", split).tolist() == expected
        assert meta["splits"][split]["documents"] == mask.sum()
        assert meta["splits"][split]["max_token"] == max(expected)
    assert meta["tokenizer"] == "gpt2" and meta["vocab_size"] == 50257
    assert open_dataset(tmp_path / "out").max_token() == EOT  # what train.py checks against vocab_size


def test_shards_are_byte_identical_for_one_two_and_three_workers(tmp_path, shakespeare_path, monkeypatch):
    monkeypatch.setattr(corpus, "CHUNK_CHARS", 100_000)  # several chunks in flight
    source = write_jsonl(tmp_path / "c.jsonl", documents(shakespeare_path, 300))
    for n in (1, 2, 3):
        run(source, tmp_path / f"out{n}", "--num_proc", str(n), "--shard_tokens", "100000", "--val_fraction", "0.02")
    names = sorted(p.name for p in (tmp_path / "out1").iterdir())
    assert len([n for n in names if n.startswith("train_")]) >= 4 and "val_000000.bin" in names
    for n in (2, 3):
        assert names == sorted(p.name for p in (tmp_path / f"out{n}").iterdir())
        for name in names:
            assert (tmp_path / "out1" / name).read_bytes() == (tmp_path / f"out{n}" / name).read_bytes(), (n, name)


def test_rerun_is_a_no_op_and_other_settings_are_refused_unless_forced(tmp_path, shakespeare_path, capsys):
    source = write_jsonl(tmp_path / "c.jsonl", documents(shakespeare_path, 20))
    out = tmp_path / "out"
    run(source, out, "--num_proc", "1")
    stamp = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    run(source, out, "--num_proc", "2")  # workers do not change the output: same dataset
    assert "nothing to do" in capsys.readouterr().out
    assert stamp == {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    with pytest.raises(corpus.CorpusError, match="holds a different dataset; .*--force"):
        run(source, out, "--num_proc", "1", "--seed", "1")
    assert stamp == {p.name: p.stat().st_mtime_ns for p in out.iterdir()}  # nothing lost
    meta = run(source, out, "--num_proc", "1", "--seed", "1", "--force")
    assert meta["source"]["seed"] == 1


def test_fineweb_recipe_on_a_local_parquet_folder(tmp_path, shakespeare_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = tmp_path / "sample-10BT"
    folder.mkdir()
    texts = documents(shakespeare_path, 40)
    for i in (0, 1):  # FineWeb's columns, in two files as the sample comes
        part = texts[i * 20 : (i + 1) * 20]
        table = pa.table({"text": part, "id": [f"<urn:{j}>" for j in range(20)], "token_count": [0] * 20})
        pq.write_table(table, folder / f"00{i}_00000.parquet")
    args = fineweb.parse(["--input", str(folder), "--out_dir", str(tmp_path / "out"), "--num_proc", "1",
                          "--val_fraction", "0.1", "--tokenizer_file", str(GPT2_TIKTOKEN)])  # fmt: skip
    meta = corpus.prepare(args)
    assert meta["splits"]["train"]["documents"] + meta["splits"]["val"]["documents"] == 40
    enc = GPT2Tokenizer(GPT2_TIKTOKEN).enc
    assert meta["splits"]["train"]["tokens"] + meta["splits"]["val"]["tokens"] == sum(
        len(enc.encode_ordinary(t)) + 1 for t in texts
    )
    for argv, dataset, out_dir in (([], "HuggingFaceFW/fineweb-edu", "data/fineweb_edu10B"),
                                   (["--source", "fineweb"], "HuggingFaceFW/fineweb", "data/fineweb10B")):  # fmt: skip
        args = fineweb.parse(argv)
        assert (args.dataset, args.name, args.streaming, args.out_dir) == (dataset, "sample-10BT", True, out_dir)


def test_force_deletes_nothing_when_the_new_source_does_not_read(tmp_path, shakespeare_path):
    out = tmp_path / "out"
    run(write_jsonl(tmp_path / "c.jsonl", documents(shakespeare_path, 20)), out, "--num_proc", "1")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a document"}\n{"text": unquoted words\n')
    with pytest.raises(corpus.CorpusError, match="cannot read .*bad.jsonl"):
        run(bad, out, "--num_proc", "1", "--force")
    assert before == {p.name: p.read_bytes() for p in out.iterdir()}  # the old dataset is intact


@pytest.mark.parametrize(
    "val_fraction, stop_at, left_there",
    [("0.05", ("train", 3), ["train_000000.bin", "train_000001.bin", "train_000002.bin"]),
     # val goes on past what its finished shards hold
     ("0.5", ("val", 2), ["train_000000.bin", "val_000000.bin", "val_000001.bin"])],
)  # fmt: skip
def test_interrupted_run_resumes_to_the_same_bytes(tmp_path, shakespeare_path, monkeypatch, val_fraction, stop_at,
                                                   left_there):  # fmt: skip
    monkeypatch.setattr(corpus, "CHUNK_CHARS", 50_000)
    source = write_jsonl(tmp_path / "c.jsonl", documents(shakespeare_path, 200))
    settings = ("--num_proc", "1", "--shard_tokens", "60000", "--val_fraction", val_fraction)
    run(source, tmp_path / "whole", *settings)

    on_shard = corpus.Pipeline.on_shard
    finished = []

    def interrupt(self, writer):
        on_shard(self, writer)
        finished.append(writer.split)
        if finished.count(stop_at[0]) == stop_at[1]:
            raise KeyboardInterrupt

    monkeypatch.setattr(corpus.Pipeline, "on_shard", interrupt)
    with pytest.raises(KeyboardInterrupt):
        run(source, tmp_path / "cut", *settings)
    left = sorted(p.name for p in (tmp_path / "cut.tmp").iterdir())  # built beside --out_dir
    assert left == [".gptcraft-folder", "progress.json", *left_there]
    assert not (tmp_path / "cut").exists()
    monkeypatch.setattr(corpus.Pipeline, "on_shard", on_shard)
    run(source, tmp_path / "cut", *settings)
    assert not (tmp_path / "cut.tmp").exists()
    whole = sorted(p.name for p in (tmp_path / "whole").iterdir())
    assert whole == sorted(p.name for p in (tmp_path / "cut").iterdir())
    for name in whole:
        assert (tmp_path / "whole" / name).read_bytes() == (tmp_path / "cut" / name).read_bytes(), name


GOOD_PROGRESS = {"source": {}, "shards": {"train": [{"file": "train_000000.bin", "tokens": 5}]}, "resume": [0, 0],
                 "max_token": {"train": 0, "val": 0}}  # fmt: skip


DAMAGED_PROGRESS = [{**GOOD_PROGRESS, "shards": []}, {**GOOD_PROGRESS, "resume": ["0", 0]},
                    {**GOOD_PROGRESS, "max_token": {"train": 0}},
                    {**GOOD_PROGRESS, "shards": {"val": [{"file": "../x", "tokens": 1}]}}]  # fmt: skip


@pytest.mark.parametrize("damage", [b"{", b"\xff", b"[]", *(json.dumps(p).encode() for p in DAMAGED_PROGRESS)])
def test_a_damaged_progress_json_is_one_line_and_nothing_is_touched(tmp_path, shakespeare_path, damage):
    source = write_jsonl(tmp_path / "c.jsonl", documents(shakespeare_path, 5))
    staging = tmp_path / "out.tmp"
    files.make_dir(str(staging))  # an interrupted preparation's folder, with gptcraft's marker
    (staging / "progress.json").write_bytes(damage)
    with pytest.raises(corpus.CorpusError, match=r"out.tmp/progress.json is damaged; pass --force to prepare afresh"):
        run(source, tmp_path / "out")
    assert sorted(p.name for p in staging.iterdir()) == [files.MARKER, "progress.json"]
    assert not (tmp_path / "out").exists()


def test_bad_input_gives_one_line_errors_and_writes_nothing(tmp_path, shakespeare_path):
    out = tmp_path / "out"
    cases = {
        "holds no documents with text": write_jsonl(tmp_path / "empty.jsonl", ["", ""]),
        "has no column 'text' \\(it has body, id\\); pass --text_column": write_jsonl(
            tmp_path / "other.jsonl", ["a", "b"], key="body"
        ),
        "cannot read --input file .*missing.jsonl": tmp_path / "missing.jsonl",
        "cannot read .*broken.jsonl": tmp_path / "broken.jsonl",
        "holds a single document": write_jsonl(tmp_path / "one.jsonl", ["only one"]),
        "column 'text' holds list values, not text": write_jsonl(tmp_path / "lists.jsonl", [["a"], ["b"]]),
    }
    (tmp_path / "broken.jsonl").write_text('{"text": "fine"}\n{"text": "cut off\n')
    for message, path in cases.items():
        with pytest.raises(corpus.CorpusError, match=message) as e:
            run(path, out, "--num_proc", "1")
        assert "\n" not in str(e.value)
        assert not (out / "meta.json").exists()
    assert not out.exists()  # a run writes beside it, in out.tmp, until the dataset is complete
    out.mkdir()
    (out / "train_000000.bin").write_bytes(b"someone else's")
    with pytest.raises(files.FolderError, match=r"holds files gptcraft did not write \(train_000000.bin\)"):
        run(write_jsonl(tmp_path / "ok.jsonl", ["a", "b"]), out, "--num_proc", "1")


def test_text_files_and_the_command_line(tmp_path, shakespeare_path):
    folder = tmp_path / "books"
    folder.mkdir()
    texts = documents(shakespeare_path, 4)
    for i, text in enumerate(texts):
        (folder / f"{i}.txt").write_text(text)
    result = run_script(ROOT / "prepare" / "corpus.py", "--input", folder, "--out_dir", tmp_path / "out",
                        "--tokenizer_file", GPT2_TIKTOKEN, "--val_fraction", "0.3", "--num_proc", "1")  # fmt: skip
    assert "train" in result.stdout
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert meta["splits"]["train"]["documents"] + meta["splits"]["val"]["documents"] == 4
    with pytest.raises(SystemExit, match="^error: cannot read --input file .*nope.txt"):
        corpus.main(["--input", str(folder / "nope.txt"), "--out_dir", str(tmp_path / "o2")])


@pytest.mark.parametrize("sample_by, documents", [("document", 2), ("paragraph", 6), ("line", 10)])
def test_txt_sample_by_makes_a_document_of_a_file_a_paragraph_or_a_line(tmp_path, sample_by, documents):
    folder = tmp_path / "books"
    folder.mkdir()
    for name in ("a.txt", "b.txt"):  # each: 3 paragraphs, 5 lines with text
        (folder / name).write_text("To be,\nor not.\n\nThat is\nthe question.\n\nWhether 'tis nobler\n")
    meta = run(folder, tmp_path / "out", "--txt_sample_by", sample_by, "--num_proc", "1")
    splits = meta["splits"]
    assert splits["train"]["documents"] + splits["val"]["documents"] == documents
    # Each document ends with end-of-text: one per document among the tokens.
    tokens = np.concatenate([split_tokens(tmp_path / "out", split) for split in ("train", "val")])
    assert (tokens == EOT).sum() == documents


def test_shakespeare_in_gpt2_tokens(tmp_path, shakespeare_path):
    from gptcraft.prepare import shakespeare

    shakespeare.prepare(tmp_path, shakespeare_path, GPT2_TIKTOKEN)
    text = shakespeare_path.read_text()
    n = int(0.9 * len(text))
    enc = GPT2Tokenizer(GPT2_TIKTOKEN).enc
    ds = open_dataset(tmp_path)
    assert ds.splits["val"][0].memmap().tolist() == enc.encode_ordinary(text[n:])
    assert ds.splits["train"][0].count == len(enc.encode_ordinary(text[:n]))


def peak_rss_mb(source, out_dir):
    # VmHWM, the peak resident memory of this process image (ru_maxrss would carry over the
    # parent's peak through fork and exec).
    code = ("import sys; from gptcraft.prepare.corpus import main; main(sys.argv[1:]); "
            "print(open('/proc/self/status').read().split('VmHWM:')[1].split()[0])")  # fmt: skip
    result = run_script("-c", code, "--input", source, "--out_dir", out_dir, "--tokenizer_file", GPT2_TIKTOKEN,
                        "--num_proc", "1", "--shard_tokens", "1000000")  # fmt: skip
    return int(result.stdout.split()[-1]) / 1024  # kB


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc/self/status")
def test_memory_stays_flat_as_the_corpus_grows(tmp_path, shakespeare_path):
    texts = documents(shakespeare_path, 125)  # about 0.6 MB
    small = write_jsonl(tmp_path / "small.jsonl", texts * 20)  # 12 MB
    large = write_jsonl(tmp_path / "large.jsonl", texts * 60)  # 38 MB, 11M tokens
    small_mb, large_mb = peak_rss_mb(small, tmp_path / "small"), peak_rss_mb(large, tmp_path / "large")
    # Holding the extra 7M tokens, even as uint16, would add 14 MB.
    assert large_mb - small_mb < 12, f"peak RSS grew from {small_mb:.0f} MB to {large_mb:.0f} MB"


def test_parquet_as_local_file_and_as_a_dataset_folder_give_the_same_tokens(tmp_path, shakespeare_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = tmp_path / "hub"
    folder.mkdir()
    texts = documents(shakespeare_path, 30)
    pq.write_table(pa.table({"content": texts, "n": list(range(30))}), folder / "train.parquet")
    common = ["--text_column", "content", "--num_proc", "1", "--val_fraction", "0.1"]
    run(folder / "train.parquet", tmp_path / "local", *common)
    args = corpus.parser().parse_args(["--dataset", str(folder), "--streaming", "--out_dir", str(tmp_path / "hub_out"),
                                       "--tokenizer_file", str(GPT2_TIKTOKEN), *common])  # fmt: skip
    meta = corpus.prepare(args)
    assert meta["source"]["dataset"] == str(folder)
    for split in ("train", "val"):
        assert split_tokens(tmp_path / "local", split).tolist() == split_tokens(tmp_path / "hub_out", split).tolist()
