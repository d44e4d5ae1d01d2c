"""nanoGPT's prepared data folders, used as they are: headerless uint16 `train.bin` / `val.bin`,
with `meta.pkl` for a character vocabulary, or without it for GPT-2 BPE (nanoGPT's openwebtext
and shakespeare).

meta.pkl is a pickle, and loading a pickle can run any code it names. It is read by an
unpickler that resolves no global name at all: only the opcodes that build dicts, lists,
strings and numbers load, and anything else is refused before it can run.
"""

import os
import pickle

from gptcraft.data.tokenizer import GPT2_META
from gptcraft.errors import GptcraftError

META_PKL = "meta.pkl"
BIN_FILES = ("train.bin", "val.bin")


class MetaPickleError(GptcraftError, ValueError):
    """meta.pkl is not a plain nanoGPT vocabulary; the message names the file."""


class PlainUnpickler(pickle.Unpickler):
    """An unpickler for plain data: every class or function a pickle names is refused."""

    def find_class(self, module, name):
        raise pickle.UnpicklingError(f"it names {module}.{name}, and only plain dicts, lists, strings and ints load")


def is_nanogpt_folder(data_dir):
    """True for a folder holding nanoGPT's train.bin and val.bin."""
    return all(os.path.isfile(os.path.join(data_dir, name)) for name in BIN_FILES)


def read_meta_pkl(path):
    """meta.pkl's {vocab_size, itos, stoi} as a meta.json tokenizer description (character vocabulary)."""
    try:
        with open(path, "rb") as f:
            meta = PlainUnpickler(f).load()
    except pickle.UnpicklingError as e:
        raise MetaPickleError(f"{path} is refused: {e}; delete it if you did not make it") from None
    except (EOFError, ValueError, IndexError, KeyError, TypeError) as e:  # damaged pickles fail in many ways
        raise MetaPickleError(f"{path} is not a readable pickle ({type(e).__name__}: {e}); prepare it again") from None
    if (
        not isinstance(meta, dict)
        or not isinstance(meta.get("vocab_size"), int)
        or not isinstance(meta.get("itos"), dict)
    ):
        raise MetaPickleError(f"{path} holds no nanoGPT vocabulary (a dict with vocab_size and itos)")
    n, itos = meta["vocab_size"], meta["itos"]
    ids_ok = len(itos) == n and all(type(i) is int and 0 <= i < n for i in itos)  # keys of any type may come
    if not ids_ok or not all(isinstance(s, str) for s in itos.values()):
        raise MetaPickleError(f"{path}: itos must map each id 0 .. {n - 1} (vocab_size - 1) to a string")
    return {"tokenizer": "char", "vocab_size": n, "chars": [itos[i] for i in range(n)]}


def nanogpt_meta(data_dir):
    """The meta.json description of a nanoGPT folder: its meta.pkl's vocabulary, else GPT-2 BPE."""
    path = os.path.join(data_dir, META_PKL)
    return read_meta_pkl(path) if os.path.exists(path) else dict(GPT2_META)
