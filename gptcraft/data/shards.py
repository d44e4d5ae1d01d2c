"""On-disk token files and the dataset directory that holds them.

A dataset directory holds `meta.json` (the tokenizer, and for sharded datasets the list of
shards) beside its token files. Two layouts are read:

- shards, the format of llm.c and the NanoGPT speedrun: a header of 256 little-endian int32
  (magic 20240520, version, token count, the rest zero), then the tokens, uint16 in version 1
  and uint32 in version 2 (vocabularies above 65,536 ids). meta.json lists them per split.
- legacy: one flat little-endian uint16 file per split, `train.bin` and `val.bin`. A folder
  that nanoGPT prepared has these without meta.json: its meta.pkl (or, without one, GPT-2
  BPE) describes it instead (nanogpt.py), and nothing is written into it.

Files are read through numpy memmap, so a corpus never has to fit in memory.
"""

import hashlib
import json
import os
import stat
from dataclasses import dataclass

import numpy as np

from gptcraft.data.nanogpt import is_nanogpt_folder, nanogpt_meta
from gptcraft.errors import GptcraftError
from gptcraft.files import file_sha256, open_new, write_atomic

META = "meta.json"
MAGIC = 20240520
HEADER_INTS = 256
HEADER_BYTES = 4 * HEADER_INTS
VERSION_DTYPES = {1: np.dtype("<u2"), 2: np.dtype("<u4")}
SPLITS = ("train", "val")


class TokenFileError(GptcraftError, ValueError):
    """A token file or dataset directory is damaged or of the wrong kind; the message names it."""


def is_dataset_file(name):
    """A name that a preparation writes into a dataset directory: token files, meta.json, progress.json."""
    return name in (META, "progress.json") or name.endswith((".bin", ".bin.tmp"))


# ----------------------------------------------------------------------------- token files


@dataclass(frozen=True)
class TokenFile:
    """Where the tokens of one file lie: `count` ids of `dtype` from byte `offset` on."""

    path: str
    offset: int
    count: int
    dtype: np.dtype

    def memmap(self):
        """A fresh read-only map, shape (count,). Drop it after use: pages touched through a
        long-lived map stay in the process's resident memory."""
        return np.memmap(self.path, dtype=self.dtype, mode="r", offset=self.offset, shape=(self.count,))


def shard_version(vocab_size):
    """Version 1 (uint16) when every id fits 16 bits, else version 2 (uint32)."""
    return 1 if vocab_size <= 1 << 16 else 2


def shard_header(count, version):
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[:3] = MAGIC, version, count
    return header.tobytes()


def write_shard(path, ids, version=1):
    """Write a whole shard at once (atomically)."""
    ids = np.asarray(ids)
    dtype = VERSION_DTYPES[version]
    if ids.size and int(ids.max()) > np.iinfo(dtype).max:
        raise ValueError(f"token id {int(ids.max())} does not fit version {version} shard {path}")
    write_atomic(path, lambda f: (f.write(shard_header(ids.size, version)), f.write(ids.astype(dtype).tobytes())))


def file_size(path):
    """The size of `path`, which must be a regular file: opening a FIFO someone left in its place
    would block forever, a device or a folder is no token file either."""
    st = os.stat(path)
    if not stat.S_ISREG(st.st_mode):
        raise TokenFileError(f"{path} is not a regular file (a FIFO, device or folder); prepare the dataset again")
    return st.st_size


def open_shard(path):
    """Check a shard's header and size against each other; return its TokenFile."""
    try:
        size = file_size(path)
        with open(path, "rb") as f:
            raw = f.read(HEADER_BYTES)
    except OSError as e:
        raise TokenFileError(f"cannot read shard {path}: {e.strerror}; prepare the dataset again") from None
    if len(raw) < HEADER_BYTES:
        raise TokenFileError(f"shard {path} is truncated: {size} bytes, shorter than its {HEADER_BYTES}-byte header")
    magic, version, count = (int(v) for v in np.frombuffer(raw, dtype="<i4")[:3])
    if magic != MAGIC:
        raise TokenFileError(f"shard {path} has magic number {magic}, not {MAGIC}: it is not a token shard")
    if version not in VERSION_DTYPES:
        raise TokenFileError(f"shard {path} has format version {version}; this code reads versions 1 and 2")
    dtype = VERSION_DTYPES[version]
    expected = HEADER_BYTES + count * dtype.itemsize
    if size != expected:
        problem = "truncated" if size < expected else "longer than its header says"
        raise TokenFileError(
            f"shard {path} is {problem}: {size} bytes, its header promises {count} tokens ({expected} bytes); "
            "prepare the dataset again"
        )
    return TokenFile(path, HEADER_BYTES, count, dtype)


def write_tokens(path, ids):
    """Write a legacy flat uint16 token file."""
    ids = np.asarray(ids)
    if ids.size and int(ids.max()) > np.iinfo(np.uint16).max:
        raise ValueError(f"token id {int(ids.max())} does not fit the uint16 format of {path}")
    write_atomic(path, lambda f: f.write(ids.astype("<u2").tobytes()))


def open_legacy(path):
    """A legacy flat uint16 token file as a TokenFile."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"token file {path} not found; prepare the dataset first")
    size = file_size(path)
    if size % 2:
        raise TokenFileError(f"token file {path} has an odd byte count: it is truncated or not a uint16 token file")
    if size == 0:  # nothing to map: numpy's memmap fails on an empty file
        raise TokenFileError(f"token file {path} is empty: prepare the dataset again")
    return TokenFile(path, 0, size // 2, np.dtype("<u2"))


class ShardWriter:
    """Appends tokens to numbered shards `{split}_{index:06d}.bin` of shard_tokens tokens each.

    A shard is written to a `.tmp` file and renamed when full (or at close()), so a file with
    the final name is always complete. The first `skip` tokens of the stream are dropped: they
    are already in the `done` shards of an earlier, interrupted run.
    """

    def __init__(self, out_dir, split, shard_tokens, version, done=(), skip=0, on_shard=None):
        self.out_dir, self.split, self.shard_tokens = out_dir, split, shard_tokens
        self.version, self.dtype = version, VERSION_DTYPES[version]
        self.shards = list(done)  # meta.json entries of the finished shards
        self.skip = skip
        self.position = self.finished - skip  # tokens of the stream passed to write(), in all runs
        self.on_shard = on_shard  # on_shard(writer) is called after each finished shard
        self.file, self.filled = None, 0

    @property
    def finished(self):
        """Tokens in finished shards."""
        return sum(s["tokens"] for s in self.shards)

    def write(self, ids):
        """Append a 1-D array of token ids."""
        self.position += len(ids)
        if self.skip:
            dropped = min(self.skip, len(ids))
            ids, self.skip = ids[dropped:], self.skip - dropped
        while len(ids):
            if self.file is None:
                tmp = self._tmp_path()
                if os.path.lexists(tmp):  # left by a killed run: replaced, never written through
                    os.remove(tmp)
                self.file = open_new(tmp)
                self.file.write(shard_header(0, self.version))
            take = min(len(ids), self.shard_tokens - self.filled)
            self.file.write(ids[:take].astype(self.dtype, copy=False).tobytes())
            self.filled += take
            ids = ids[take:]
            if self.filled == self.shard_tokens:
                self._finish()

    def close(self):
        """Finish the last, partly filled shard."""
        if self.file is not None:
            self._finish()
        return self.shards

    def discard(self):
        """Remove the unfinished shard (after an error)."""
        if self.file is not None:
            self.file.close()
            os.remove(self._tmp_path())
            self.file = None

    def _name(self):
        return f"{self.split}_{len(self.shards):06d}.bin"

    def _tmp_path(self):
        return os.path.join(self.out_dir, self._name() + ".tmp")

    def _finish(self):
        f, name = self.file, self._name()
        f.seek(0)
        f.write(shard_header(self.filled, self.version))
        f.flush()
        os.fsync(f.fileno())
        f.close()
        path = os.path.join(self.out_dir, name)
        os.replace(self._tmp_path(), path)
        self.shards.append({"file": name, "tokens": self.filled, "sha256": file_sha256(path)})
        self.file, self.filled = None, 0
        if self.on_shard:
            self.on_shard(self)


# ----------------------------------------------------------------------------- dataset directories


def write_meta(data_dir, meta):
    text = json.dumps(meta, indent=1, ensure_ascii=False).encode()
    write_atomic(os.path.join(data_dir, META), lambda f: f.write(text))


def read_meta(data_dir):
    path = os.path.join(data_dir, META)
    try:
        file_size(path)
        with open(path, encoding="utf-8") as f:  # as write_meta wrote it, whatever the locale
            meta = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} not found: the dataset has no tokenizer description") from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        raise TokenFileError(f"{path} is not valid JSON ({e}); prepare the dataset again") from None
    if not isinstance(meta, dict):
        raise TokenFileError(f"{path} holds a JSON {type(meta).__name__}, not an object; prepare the dataset again")
    problem = meta_problem(meta)
    if problem:
        raise TokenFileError(f"{path} is malformed: {problem}; prepare the dataset again")
    return meta


def is_count(v):
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def is_file_name(name):
    """A plain name of a file in the dataset directory itself: no folder, no '..', not absolute."""
    return isinstance(name, str) and name not in ("", ".", "..") and os.path.basename(name) == name and "\\" not in name


def meta_problem(meta):
    """What is wrong with the fields a meta.json is read for, or None."""
    vocab = meta.get("vocab_size")
    if not (is_count(vocab) and vocab > 0):
        return f"vocab_size is {vocab!r}, not a positive integer"
    if meta.get("tokenizer") == "char":
        chars = meta.get("chars")
        if not (isinstance(chars, list) and all(isinstance(c, str) and len(c) == 1 for c in chars)):
            return "chars is not a list of single characters"
        if len(chars) != vocab:
            return f"it lists {len(chars)} chars but vocab_size {vocab}"
    if "splits" not in meta:
        return None
    splits = meta["splits"]
    if not isinstance(splits, dict) or not all(isinstance(info, dict) for info in splits.values()):
        return "splits is not an object of objects"
    for split, info in splits.items():
        if "max_token" in info and not is_count(info["max_token"]):
            return f"splits.{split}.max_token is {info['max_token']!r}, not a token id"
        shards = info.get("shards", [])
        if not isinstance(shards, list):
            return f"splits.{split}.shards is not a list"
        for entry in shards:
            if not (isinstance(entry, dict) and is_count(entry.get("tokens"))):
                return f"splits.{split}.shards holds {entry!r}, not a {{file, tokens}} object"
            if not is_file_name(entry.get("file")):
                return f"shard file {entry.get('file')!r} is not a file name inside the dataset directory"
    return None


def is_dataset(data_dir):
    """True for a prepared dataset directory: meta.json, or the token files of a nanoGPT folder."""
    return os.path.exists(os.path.join(data_dir, META)) or is_nanogpt_folder(data_dir)


def dataset_meta(data_dir):
    """The dataset's description: its meta.json, or for a nanoGPT folder without one, its meta.pkl's."""
    if os.path.exists(os.path.join(data_dir, META)) or not is_nanogpt_folder(data_dir):
        return read_meta(data_dir)
    return nanogpt_meta(data_dir)


def shard_meta(tokenizer_meta, splits, **extra):
    """meta.json of a sharded dataset. splits: {split: {"shards": [{"file", "tokens", "sha256"}], ...}};
    extra: more top-level fields (how it was made)."""
    meta = dict(tokenizer_meta, format="shards", **extra)
    meta["splits"] = {
        split: {**info, "tokens": sum(s["tokens"] for s in info["shards"])} for split, info in splits.items()
    }
    return meta


@dataclass
class Dataset:
    """A prepared dataset: its meta.json and the TokenFiles of each split."""

    path: str
    meta: dict
    splits: dict

    @property
    def fingerprint(self):
        """Names what the token files hold: sha256 of their names, sizes and recorded hashes."""
        files = {
            split: [[os.path.basename(f.path), f.count, _recorded_sha(self.meta, split, i)] for i, f in enumerate(fs)]
            for split, fs in self.splits.items()
        }
        return hashlib.sha256(json.dumps([self.meta.get("tokenizer"), files]).encode()).hexdigest()

    def max_token(self):
        """The largest token id in the data, as recorded in meta.json (else vocab_size - 1)."""
        recorded = [info.get("max_token") for info in self.meta.get("splits", {}).values()]
        if recorded and None not in recorded:
            return max(recorded)
        return self.meta["vocab_size"] - 1

    def check_vocab(self, vocab_size):
        """The model's vocabulary must hold every token id of the data: the largest id meta.json
        records (verified on a sample of each file), else its vocab_size - 1."""
        top = self.max_token()
        for files in self.splits.values():
            for f in files:
                found = sampled_max(f)
                if found > top:
                    raise TokenFileError(
                        f"{f.path} holds token id {found}, above the largest id {top} that "
                        f"{os.path.join(self.path, META)} allows; prepare the dataset again"
                    )
        if top >= vocab_size:
            raise TokenFileError(
                f"{os.path.join(self.path, META)}: the data holds token ids up to {top}, but the model's "
                f"vocab_size is {vocab_size}; train a model with vocab_size >= {top + 1} on this dataset"
            )


SAMPLE_WINDOWS, SAMPLE_TOKENS = 8, 1 << 16  # a file of up to 8 x 64Ki tokens is read whole


def sampled_max(f):
    """The largest id in SAMPLE_WINDOWS evenly spaced windows of SAMPLE_TOKENS tokens of TokenFile
    `f` (all of it when it is that small): cheap, and it finds ids beyond the vocabulary in data of
    the wrong tokenizer or with a wrong vocab_size."""
    data = f.memmap()
    if f.count <= SAMPLE_WINDOWS * SAMPLE_TOKENS:
        return int(data.max(initial=0))
    starts = np.linspace(0, f.count - SAMPLE_TOKENS, SAMPLE_WINDOWS).astype(np.int64)
    return max(int(data[s : s + SAMPLE_TOKENS].max()) for s in starts)


def _recorded_sha(meta, split, i):
    shards = meta.get("splits", {}).get(split, {}).get("shards")
    return shards[i].get("sha256") if shards else None


def open_dataset(data_dir):
    """Open a prepared dataset directory, checking each shard's header against meta.json."""
    meta = dataset_meta(data_dir)
    meta_path = os.path.join(data_dir, META)
    if "splits" not in meta:  # legacy: train.bin / val.bin
        splits = {split: [open_legacy(os.path.join(data_dir, f"{split}.bin"))] for split in SPLITS}
        return Dataset(data_dir, meta, splits)
    splits = {}
    for split in SPLITS:
        entries = meta["splits"].get(split, {}).get("shards")
        if not entries:
            raise TokenFileError(f"{meta_path} lists no {split} shards; prepare the dataset again")
        files = []
        for entry in entries:
            f = open_shard(os.path.join(data_dir, entry["file"]))
            if f.count != entry["tokens"]:
                raise TokenFileError(
                    f"shard {f.path} holds {f.count} tokens but {meta_path} says {entry['tokens']}; "
                    "prepare the dataset again"
                )
            files.append(f)
        splits[split] = files
    return Dataset(data_dir, meta, splits)
