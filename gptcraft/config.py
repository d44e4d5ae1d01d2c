"""Typed configuration from Python config files and --key=value overrides.

A config is a dataclass whose fields carry a default and a one-line help text.
`python train.py configs/x.py --batch_size=32` runs x.py (Python, as in nanoGPT: it
can do anything Python can, so run only config files you wrote or read), then applies the
overrides, checking every key and every type.
"""

import difflib
import math
import os
import sys
import traceback
import types
import typing
from dataclasses import MISSING, field, fields

from gptcraft.errors import GptcraftError


class ConfigError(GptcraftError, ValueError):
    """A bad key or value; the message says what is wrong and how to fix it."""


def option(default, help, choices=None):
    """A config field with its default, one line of help and, optionally, the allowed values."""
    return field(default=default, metadata={"help": help, "choices": choices})


def options_of(cls, names, **defaults):
    """(name, type, option) triples of dataclass `cls`'s fields `names`, for dataclasses.make_dataclass:
    each keeps its help text and choices from the field's metadata, and its default unless `defaults`
    gives another. A settings class defined once (GPTConfig) becomes command-line keys this way."""
    types_, by_name = _field_types(cls), {f.name: f for f in fields(cls)}
    return [(name, types_[name], option(defaults.get(name, by_name[name].default), by_name[name].metadata["help"],
                                        by_name[name].metadata.get("choices")))
            for name in names]  # fmt: skip


def _type_name(tp):
    return getattr(tp, "__name__", str(tp))


def _auto_type(tp):
    """X for a field typed `X | None`, whose None means "auto" (worked out at run time); else None."""
    args = typing.get_args(tp)
    if len(args) == 2 and type(None) in args:
        return next(a for a in args if a is not type(None))
    return None


def _convert(key, raw, tp, choices, from_text):
    """Turn a command-line string (from_text) or a config-file value into the field's type."""
    if _auto_type(tp) is not None:
        if raw is None or raw == "auto" or (from_text and raw.strip().lower() in ("auto", "none")):
            return None
        tp = _auto_type(tp)
    if from_text and tp is not str:
        text = raw.strip()
        if tp is bool:
            lowered = text.lower()
            if lowered in ("true", "1", "yes"):
                value = True
            elif lowered in ("false", "0", "no"):
                value = False
            else:
                raise ConfigError(f"{key} expects a bool (True or False), got {raw!r}")
        else:
            try:
                value = tp(text)
            except ValueError:
                raise ConfigError(f"{key} expects {_type_name(tp)}, got {raw!r}") from None
    else:
        value = raw
        ok = isinstance(value, tp) and not (tp is not bool and isinstance(value, bool))
        if tp is float and isinstance(value, int) and not isinstance(value, bool):
            value, ok = float(value), True
        if not ok:
            raise ConfigError(f"{key} expects {_type_name(tp)}, got {type(value).__name__} {value!r}")
    if tp is float and not math.isfinite(value):  # nan passes every comparison, inf trains NaN
        raise ConfigError(f"{key} must be a finite number, got {value}")
    if choices is not None and value not in choices:
        raise ConfigError(f"{key} must be one of {', '.join(map(str, choices))}; got {value!r}")
    return value


def _field_types(cls):
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in fields(cls)}


def _unknown_key_error(key, known):
    close = difflib.get_close_matches(key, known, n=1)
    hint = f"; did you mean {close[0]}?" if close else "; run with --help to list the keys"
    return ConfigError(f"unknown config key {key!r}{hint}")


def _read_config_file(path):
    """Run a config file and return the names it assigns (modules and _private names left out)."""
    try:
        with open(path, encoding="utf-8") as f:
            source = f.read()
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file {path} is not UTF-8 text (byte {e.start})") from None
    namespace = {}
    try:
        exec(compile(source, path, "exec"), namespace)  # config files are Python, as in nanoGPT
    except SyntaxError as e:
        raise ConfigError(f"config file {path}, line {e.lineno}: {e.msg}") from None
    except Exception as e:  # the file's own code failed, e.g. a NameError
        line = next((f.lineno for f in reversed(traceback.extract_tb(e.__traceback__)) if f.filename == path), "?")
        raise ConfigError(f"config file {path}, line {line}: {type(e).__name__}: {e}") from None
    return {k: v for k, v in namespace.items() if not k.startswith("_") and not isinstance(v, types.ModuleType)}


def command_name(script):
    """What the user typed to start this command, for its usage line: `gptcraft NAME` when the
    gptcraft command ran it (it sets sys.argv[0] so), else `python SCRIPT`."""
    return sys.argv[0] if sys.argv[0].startswith("gptcraft ") else f"python {script}"


def help_text(cls, prog):
    """prog: the root script (train.py), or the gptcraft subcommand for tools that have none."""
    command = command_name(prog) if prog.endswith(".py") else prog
    lines = [f"usage: {command} [CONFIG.py ...] [--key=value ...]", "",
             "CONFIG.py files are Python and run as code: load only your own, or ones you have read", "",
             "keys, each --key=DEFAULT  what it sets:"]  # fmt: skip
    for f in fields(cls):
        choices = f.metadata.get("choices")
        extra = f" [{'|'.join(map(str, choices))}]" if choices else ""
        default = "auto" if f.default is None else repr(f.default)
        lines.append(f"  --{f.name}={default}{extra}  {f.metadata.get('help', '')}")
    return "\n".join(lines)


def parse_config(cls, argv, prog="train.py"):
    """Build a `cls` from config files and --key=value overrides, in the order given."""
    types_ = _field_types(cls)
    meta = {f.name: f.metadata for f in fields(cls)}
    values, problems = {}, []

    def set_value(key, raw, from_text):  # every mistake is reported, one line each
        try:
            if key not in types_:
                raise _unknown_key_error(key, list(types_))
            values[key] = _convert(key, raw, types_[key], meta[key].get("choices"), from_text)
        except ConfigError as e:
            problems.append(str(e))

    for arg in argv:
        if arg in ("-h", "--help"):
            print(help_text(cls, prog))
            sys.exit(0)
        if arg.startswith("--"):
            key, sep, raw = arg[2:].partition("=")
            if not sep:
                raise ConfigError(f"override {arg!r} needs a value: write --{key}=VALUE")
            set_value(key, raw, from_text=True)
        elif arg.endswith(".py"):
            for key, raw in _read_config_file(arg).items():
                set_value(key, raw, from_text=False)
        else:
            raise ConfigError(f"cannot read argument {arg!r}: give config files (*.py) or --key=value")
    problems += [f"{f.name} is required: pass --{f.name}=VALUE" for f in fields(cls)
                 if f.name not in values and f.default is MISSING]  # fmt: skip
    refuse(problems)
    return cls(**values)


def refuse(problems):
    """Raise one ConfigError naming every problem in the list, one line each; nothing if it is empty."""
    if problems:
        raise ConfigError("\n".join(problems))


def check_ranges(cfg, positive=(), nonnegative=(), fraction=()):
    """The problems (one line each) of `cfg`'s numeric fields: each named in `positive` must be > 0,
    in `nonnegative` >= 0, in `fraction` in [0, 1)."""
    values = {key: getattr(cfg, key) for key in (*positive, *nonnegative, *fraction)}
    return ([f"{k} must be positive, got {values[k]}" for k in positive if not values[k] > 0]
            + [f"{k} must not be negative, got {values[k]}" for k in nonnegative if not values[k] >= 0]
            + [f"{k} must be in [0, 1), got {values[k]}" for k in fraction if not 0 <= values[k] < 1])  # fmt: skip


SEEDS = range(2**32)  # numpy's generators take seeds in [0, 2**32)


def check_seed(seed):
    return [] if seed in SEEDS else [f"seed must be in [0, 2**32), got {seed}"]


def run_cli(main):
    """Call main(), turning any GptcraftError into a one-line message (one per mistake) and exit
    status 2, and Ctrl-C (the second, in train.py) into one line and status 130. Under torchrun
    every rank meets the same error: only rank 0 prints it."""
    try:
        return main()
    except GptcraftError as e:
        if os.environ.get("RANK", "0") == "0":
            for line in str(e).splitlines() or [""]:  # a config with several mistakes: one line each
                print(f"error: {line}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        if os.environ.get("RANK", "0") == "0":
            print("\ninterrupted by Ctrl-C: stopped at once", file=sys.stderr)
        sys.exit(130)
