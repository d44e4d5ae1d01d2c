"""Text for a terminal: control characters shown as escapes rather than obeyed.

A run's vocabulary (meta.json's `chars`) and a BPE model's byte tokens can hold ESC and the other
C0 and C1 control characters; printed raw, a sampled sequence could move the cursor, clear the
screen or set the window title. On a terminal they are shown as `\\x1b` and the like, except
newline and tab; into a pipe or a file the text goes unchanged.
"""

import sys

_CONTROLS = [*range(0x00, 0x20), 0x7F, *range(0x80, 0xA0)]  # C0, DEL, C1
ESCAPES = {c: f"\\x{c:02x}" for c in _CONTROLS if chr(c) not in "\n\t"}


def escape_controls(text):
    return text.translate(ESCAPES)


def for_stdout():
    """What sample output goes through before print: escape_controls on a terminal, else unchanged."""
    return escape_controls if sys.stdout.isatty() else str
