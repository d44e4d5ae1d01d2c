"""Raw text sources: a local file when given, else a download checked against its known hash."""

import hashlib
import urllib.request

from gptcraft.errors import GptcraftError

TINY_SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
TINY_SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"


class SourceError(GptcraftError, RuntimeError):
    """The raw text could not be had: `problem` says why, the message also how to supply it."""

    def __init__(self, problem, fix=None):
        super().__init__(f"{problem}; {fix}" if fix else problem)
        self.problem = problem


def download(url, sha256, timeout=30):
    """Fetch url and check its sha256; offline, fail at once with a message naming --input."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            data = response.read()
    except OSError as e:
        raise SourceError(f"cannot download {url} ({e})", "offline, pass --input=PATH to a local copy") from None
    digest = hashlib.sha256(data).hexdigest()
    if digest != sha256:
        raise SourceError(f"{url} has sha256 {digest}, expected {sha256}", "pass --input=PATH to a good copy")
    return data


def tiny_shakespeare(path=None):
    """The 1,115,394-character tiny Shakespeare text, from `path` or from char-rnn's repository."""
    if path is None:
        return download(TINY_SHAKESPEARE_URL, TINY_SHAKESPEARE_SHA256).decode("utf-8")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise SourceError(f"cannot read --input {path}: {getattr(e, 'strerror', None) or e}") from None
    if len(text) < 10:  # 90/10: each split needs a character at least
        raise SourceError(f"--input {path} holds {len(text)} characters, too few for a train and a val split",
                          "pass a file that holds the text")  # fmt: skip
    return text
