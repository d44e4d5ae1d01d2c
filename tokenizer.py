"""Tokenizers: text to token ids and back, described by a dataset's meta.json."""


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


def load_tokenizer(meta):
    """Build the tokenizer a meta.json describes."""
    kind = meta.get("tokenizer")
    if kind == "char":
        return CharTokenizer(meta["chars"])
    raise ValueError(f"unknown tokenizer {kind!r} in meta.json")
