"""The shard format: round trips, llm.c's header layout, and the errors for damaged files."""

import json

import numpy as np
import pytest
from conftest import run_here

from gptcraft.data.shards import (
    HEADER_BYTES,
    MAGIC,
    ShardWriter,
    TokenFileError,
    open_dataset,
    open_shard,
    shard_meta,
    write_meta,
    write_shard,
    write_tokens,
)


@pytest.mark.parametrize("version, top", [(1, 65535), (2, 100_000)])
def test_round_trip_and_header_layout(tmp_path, version, top):
    ids = np.array([0, 1, 50256, top], dtype=np.int64)
    path = tmp_path / "s.bin"
    write_shard(path, ids, version)
    raw = path.read_bytes()
    header = np.frombuffer(raw[:HEADER_BYTES], dtype="<i4")
    assert header[:3].tolist() == [MAGIC, version, 4] and not header[3:].any()
    assert len(raw) == HEADER_BYTES + 4 * (2 if version == 1 else 4)
    np.testing.assert_array_equal(open_shard(path).memmap(), ids)


def write_llmc_shard(path, ids, version):
    """A shard as llm.c's writers lay it out, written here without our write_shard: 256 int32
    (magic 20240520, version, count, zeros), then uint16 (version 1) or uint32 (version 2) tokens."""
    header = [20240520, version, len(ids)] + [0] * 253
    with open(path, "wb") as f:
        f.write(b"".join(n.to_bytes(4, "little", signed=True) for n in header))
        f.write(b"".join(t.to_bytes(2 if version == 1 else 4, "little") for t in ids))


@pytest.mark.parametrize("version, top", [(1, 65535), (2, 4_000_000_000)])
def test_shards_written_the_llmc_way_read_back_exactly(tmp_path, version, top):
    ids = [0, 1, 50256, 65535, 12345, top]
    write_llmc_shard(tmp_path / "fineweb_train_000001.bin", ids, version)
    shard = open_shard(tmp_path / "fineweb_train_000001.bin")
    assert shard.memmap().tolist() == ids and shard.count == len(ids)


def test_version_1_refuses_ids_above_16_bits(tmp_path):
    with pytest.raises(ValueError, match="does not fit"):
        write_shard(tmp_path / "s.bin", [70_000], 1)


def test_wrong_magic_truncated_and_overlong_shards_are_named(tmp_path):
    path = tmp_path / "s.bin"
    write_shard(path, np.arange(100), 1)
    good = path.read_bytes()
    cases = {
        "not a token shard": good[:4][::-1] + good[4:],
        "truncated": good[:-2],
        "longer than its header": good + b"\0\0",
        "shorter than its 1024-byte header": good[:100],
        "truncated: 101 bytes": good[:101],  # not even whole int32s
        "format version 7": good[:4] + np.int32(7).tobytes() + good[8:],
    }
    for expected, data in cases.items():
        path.write_bytes(data)
        with pytest.raises(TokenFileError, match=expected) as e:
            open_shard(path)
        assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_writer_splits_into_fixed_size_shards_and_records_them(tmp_path):
    writer = ShardWriter(tmp_path, "train", 1000, 1)
    for _ in range(5):
        writer.write(np.arange(450) % 50257)
    shards = writer.close()
    assert [s["tokens"] for s in shards] == [1000, 1000, 250]
    assert [s["file"] for s in shards] == ["train_000000.bin", "train_000001.bin", "train_000002.bin"]
    joined = np.concatenate([open_shard(tmp_path / s["file"]).memmap() for s in shards])
    np.testing.assert_array_equal(joined, np.tile(np.arange(450), 5))
    # Version 2 (uint32) ids, and a stream that ends exactly on a shard boundary: no empty shard after it.
    exact = ShardWriter(tmp_path, "val", 100, 2)
    exact.write(np.arange(60))
    exact.write(np.arange(40) + 70_000)
    assert [s["tokens"] for s in exact.close()] == [100]
    np.testing.assert_array_equal(open_shard(tmp_path / "val_000000.bin").memmap()[58:62], [58, 59, 70_000, 70_001])
    assert not list(tmp_path.glob("*.tmp"))


def test_dataset_checks_meta_against_shards_and_vocab(tmp_path):
    for split in ("train", "val"):
        write_shard(tmp_path / f"{split}_000000.bin", np.arange(300))
    entry = {"file": "train_000000.bin", "tokens": 300, "sha256": "x"}
    splits = {"train": {"shards": [entry], "max_token": 299},
              "val": {"shards": [dict(entry, file="val_000000.bin")], "max_token": 299}}  # fmt: skip
    write_meta(tmp_path, shard_meta({"tokenizer": "gpt2", "vocab_size": 50257}, splits))
    ds = open_dataset(tmp_path)
    assert [f.count for f in ds.splits["train"]] == [300]
    ds.check_vocab(300)
    with pytest.raises(TokenFileError, match="token ids up to 299, but the model's vocab_size is 299"):
        ds.check_vocab(299)
    meta = json.loads((tmp_path / "meta.json").read_text())
    meta["splits"]["val"]["shards"][0]["tokens"] = 301
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(TokenFileError, match="val_000000.bin holds 300 tokens but .*meta.json says 301"):
        open_dataset(tmp_path)
    (tmp_path / "meta.json").write_bytes(b"[1]")
    with pytest.raises(TokenFileError, match="meta.json holds a JSON list, not an object"):
        open_dataset(tmp_path)
    (tmp_path / "meta.json").write_bytes(b'{"chars": "\xff"}')
    with pytest.raises(TokenFileError, match="meta.json is not valid JSON .*utf-8"):
        open_dataset(tmp_path)


def test_legacy_train_and_val_bin_stay_readable(tmp_path):
    write_tokens(tmp_path / "train.bin", np.arange(50))
    write_tokens(tmp_path / "val.bin", np.arange(20))
    write_meta(tmp_path, {"tokenizer": "char", "vocab_size": 65, "chars": [chr(32 + i) for i in range(65)]})
    ds = open_dataset(tmp_path)
    np.testing.assert_array_equal(ds.splits["val"][0].memmap(), np.arange(20))
    (tmp_path / "val.bin").write_bytes(b"\0" * 41)
    with pytest.raises(TokenFileError, match="val.bin has an odd byte count"):
        open_dataset(tmp_path)


def test_an_empty_train_bin_is_one_line_before_anything_is_written(tmp_path):
    data = tmp_path / "data" / "x"
    data.mkdir(parents=True)
    write_tokens(data / "val.bin", np.arange(100) % 3)
    (data / "train.bin").write_bytes(b"")
    write_meta(data, {"tokenizer": "char", "vocab_size": 3, "chars": ["a", "b", "c"]})
    out = tmp_path / "out"
    result = run_here("train.py", "--dataset=x", f"--data_dir={data.parent}", f"--out_dir={out}", "--device=cpu",
                      "--n_layer=1", "--n_head=1", "--n_embd=8", "--block_size=8", "--compile=False")  # fmt: skip
    assert result.returncode == 2
    assert result.stderr == f"error: token file {data / 'train.bin'} is empty: prepare the dataset again\n"
    assert not out.exists() or not list(out.iterdir())


def test_foreign_llmc_shards_are_indexed_and_load(tmp_path):
    from gptcraft.prepare import index_shards

    for name, n in (("fineweb_val_000000.bin", 500), ("fineweb_train_000001.bin", 800),
                    ("fineweb_train_000002.bin", 700)):  # fmt: skip
        write_shard(tmp_path / name, np.append(np.arange(n - 1), 50256))
    index_shards.index(tmp_path)
    ds = open_dataset(tmp_path)
    assert [f.count for f in ds.splits["train"]] == [800, 700] and ds.max_token() == 50256
    assert ds.meta["tokenizer"] == "gpt2"
    with pytest.raises(SystemExit, match="exists already"):
        index_shards.index(tmp_path)
    (tmp_path / "fineweb_train_000002.bin").write_bytes((tmp_path / "fineweb_train_000002.bin").read_bytes()[:-4])
    with pytest.raises(TokenFileError, match="fineweb_train_000002.bin is truncated"):
        index_shards.index(tmp_path, force=True)
