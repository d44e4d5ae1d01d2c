"""The on-disk token format: flat little-endian uint16 token ids (`train.bin`, `val.bin`)
beside a `meta.json` that names the tokenizer. Files are read through numpy memmap,
so a corpus never has to fit in memory."""

import json
import os

import numpy as np

META = "meta.json"


def write_atomic(path, write):
    """Call write(file) on a temporary file beside `path`, fsync it, then rename it into place,
    so `path` is either its old content or the complete new one, never half written."""
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_tokens(path, ids):
    ids = np.asarray(ids)
    if ids.size and int(ids.max()) > np.iinfo(np.uint16).max:
        raise ValueError(f"token id {int(ids.max())} does not fit the uint16 format of {path}")
    write_atomic(path, lambda f: f.write(ids.astype("<u2").tobytes()))


def open_tokens(path):
    """Memory-map a token file read-only: shape (N,), dtype uint16."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"token file {path} not found; prepare the dataset first")
    if os.path.getsize(path) % 2:
        raise ValueError(f"token file {path} has an odd byte count: it is truncated or not a uint16 token file")
    return np.memmap(path, dtype="<u2", mode="r")


def write_meta(data_dir, meta):
    text = json.dumps(meta, indent=1, ensure_ascii=False).encode()
    write_atomic(os.path.join(data_dir, META), lambda f: f.write(text))


def read_meta(data_dir):
    path = os.path.join(data_dir, META)
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} not found: the dataset has no tokenizer description") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); prepare the dataset again") from None
