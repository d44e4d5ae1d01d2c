"""The one base class of every error a user can fix.

Each module raises its own subclass (CheckpointError, TokenFileError, DeviceError, ...) with a
message that says what is wrong and how to fix it; the command-line layer (config.run_cli) prints
any of them as one line, `error: ...`, and exits with status 2. Anything else is a bug: a traceback.
"""


class GptcraftError(Exception):
    """A problem with the user's input, files or machine; str(error) is the one-line explanation."""
