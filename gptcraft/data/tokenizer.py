"""Tokenizers: text to token ids and back, described by a dataset's meta.json.

GPT-2's byte-pair encoding comes from tiktoken. tiktoken downloads its rank file on first
use; offline (CI, clusters), a local copy is named by --tokenizer_file or the environment
variable GPTCRAFT_TIKTOKEN_FILE and checked against the known sha256.
"""

import base64
import hashlib
import os

import tiktoken
from tiktoken_ext.openai_public import r50k_pat_str

from gptcraft.errors import GptcraftError

GPT2_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"  # r50k_base.tiktoken
GPT2_URL = "https://openaipublic.blob.core.windows.net/encodings/r50k_base.tiktoken"  # where tiktoken fetches it
GPT2_EOT = 50256  # <|endoftext|>, the last id of GPT-2's 50,257
TIKTOKEN_FILE_ENV = "GPTCRAFT_TIKTOKEN_FILE"
GPT2_META = {"tokenizer": "gpt2", "vocab_size": GPT2_EOT + 1, "eot_token": GPT2_EOT}  # meta.json fields


class TokenizerError(GptcraftError, RuntimeError):
    """The tokenizer could not be built; the message says how to supply it."""


class CharTokenizer:
    """One token per character; the vocabulary is the sorted set of characters seen."""

    def __init__(self, chars):
        self.itos = list(chars)
        self.stoi = {ch: i for i, ch in enumerate(self.itos)}
        self.vocab_size = len(self.itos)

    @classmethod
    def from_text(cls, text):
        return cls(sorted(set(text)))

    def encode(self, text):
        unknown = sorted(set(text) - self.stoi.keys())
        if unknown:
            shown = ", ".join(repr(c) for c in unknown[:10])
            raise ValueError(f"characters not in the vocabulary: {shown}; use only characters of the training text")
        return [self.stoi[c] for c in text]

    def decode(self, ids):
        return "".join(self.itos[i] for i in ids)

    def meta(self):
        return {"tokenizer": "char", "vocab_size": self.vocab_size, "chars": self.itos}


def gpt2_encoding(tokenizer_file=None):
    """GPT-2's tiktoken Encoding (r50k_base): from tokenizer_file, else $GPTCRAFT_TIKTOKEN_FILE,
    else tiktoken's own cache or download."""
    path = tokenizer_file or os.environ.get(TIKTOKEN_FILE_ENV)
    if not path:
        try:
            return tiktoken.get_encoding("r50k_base")
        except Exception as e:  # tiktoken surfaces network failures as many exception types
            raise TokenizerError(
                f"cannot load GPT-2's tokenizer through tiktoken ({type(e).__name__}: {e}); offline, pass "
                f"--tokenizer_file=PATH/TO/gpt2.tiktoken or set {TIKTOKEN_FILE_ENV}"
            ) from None
    named_by = "--tokenizer_file" if tokenizer_file else f"${TIKTOKEN_FILE_ENV}"  # for the messages
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise TokenizerError(f"cannot read {named_by} {path}: {e.strerror}") from None
    digest = hashlib.sha256(data).hexdigest()
    if digest != GPT2_SHA256:
        raise TokenizerError(
            f"{named_by} {path} has sha256 {digest}, not GPT-2's r50k_base.tiktoken ({GPT2_SHA256}); pass a good copy"
        )
    # The .tiktoken format: one "base64(token bytes) rank" line per token. (tiktoken's own
    # load_tiktoken_bpe would also copy a local file into its download cache.)
    ranks = {base64.b64decode(token): int(rank) for token, rank in (line.split() for line in data.splitlines() if line)}
    return tiktoken.Encoding(
        name="gpt2",
        pat_str=r50k_pat_str,
        mergeable_ranks=ranks,
        special_tokens={"<|endoftext|>": GPT2_EOT},
        explicit_n_vocab=GPT2_EOT + 1,
    )


class GPT2Tokenizer:
    """GPT-2's byte-pair encoding; special-token text such as <|endoftext|> is encoded as plain text."""

    def __init__(self, tokenizer_file=None):
        self.enc = gpt2_encoding(tokenizer_file)
        self.vocab_size = self.enc.n_vocab
        self.eot_token = GPT2_EOT

    def encode(self, text):
        return self.enc.encode_ordinary(text)

    def encode_array(self, text):
        """encode(text) as a numpy uint32 array, without building a Python list."""
        return self.enc.encode_to_numpy(text, disallowed_special=())

    def decode(self, ids):
        return self.enc.decode(list(ids))

    def decode_bytes(self, ids):
        """The bytes of ids: a token may end inside a multi-byte UTF-8 character."""
        return self.enc.decode_bytes(list(ids))

    def meta(self):
        return dict(GPT2_META)


def load_tokenizer(meta, tokenizer_file=None):
    """Build the tokenizer a meta.json describes."""
    kind = meta.get("tokenizer")
    if kind == "char":
        return CharTokenizer(meta["chars"])
    if kind == "gpt2":
        return GPT2Tokenizer(tokenizer_file)
    raise TokenizerError(f"unknown tokenizer {kind!r} in meta.json")
