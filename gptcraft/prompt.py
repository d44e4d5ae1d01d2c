"""The prompt a command starts from: given on the command line, in a file or on standard input."""

import sys

from gptcraft.config import ConfigError


def read_prompt(start):
    """The prompt text: --start itself, a file's content (FILE:path) or standard input (-)."""
    if start == "-":
        return _text(sys.stdin.buffer.read(), "standard input")
    if start.startswith("FILE:"):
        path = start[len("FILE:") :]
        try:
            with open(path, "rb") as f:
                return _text(f.read(), f"prompt file {path}")
        except OSError as e:
            raise ConfigError(f"cannot read prompt file {path}: {e.strerror}") from None
    return start


def _text(data, name):
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{name} is not UTF-8 text (byte {e.start}): give a text prompt") from None


def end_of_text(tok):
    """The tokenizer's end-of-text id (GPT-2 BPE: 50256), or None for a character vocabulary."""
    return getattr(tok, "eot_token", None)


def encode_prompt(tok, prompt):
    """Token ids of the prompt; an empty prompt starts from end-of-text, or from a newline."""
    eot = end_of_text(tok)
    if not prompt and eot is not None:
        return [eot]
    try:
        return tok.encode(prompt or "\n")
    except ValueError as e:
        raise ConfigError(f"prompt: {e}") from None
