"""The `gptcraft` command: one subcommand per tool, each with its own --help.

gptcraft train configs/train_shakespeare_char_cpu.py      (the same as python train.py ...)
gptcraft prepare shakespeare_char --input tinyshakespeare.txt
gptcraft eval --out_dir=out-shakespeare-char-cpu
gptcraft hellaswag --init_from=gpt2
gptcraft plot out-shakespeare-char-cpu
gptcraft attention --out_dir=out-shakespeare-char-cpu --start="ROMEO:"
"""

import importlib
import sys

# name: (module with a main(argv), what it does). Modules are imported only when their command runs.
COMMANDS = {
    "train": ("gptcraft.train.loop", "train a model (python train.py)"),
    "sample": ("gptcraft.sample", "sample text from a run or GPT-2 (python sample.py)"),
    "eval": ("gptcraft.evaluate.cli", "score a run or GPT-2 on a dataset split or a text file"),
    "hellaswag": ("gptcraft.evaluate.hellaswag", "HellaSwag acc and acc_norm of a run or GPT-2"),
    "export": ("gptcraft.export", "write a run as a Hugging Face GPT-2 folder"),
    "plot": ("gptcraft.track.plot", "draw the loss curves of one or more runs"),
    "attention": ("gptcraft.visualize.attention", "draw a prompt's attention weights, every layer and head"),
    "positions": ("gptcraft.visualize.positions", "draw sinusoidal, learned and rotary position encodings"),
    "bench": ("gptcraft.bench.speed", "time training and sampling (python bench.py)"),
}
PREPARE = {
    "shakespeare_char": "tiny Shakespeare as characters",
    "shakespeare": "tiny Shakespeare in GPT-2 tokens",
    "openwebtext": "OpenWebText in GPT-2 tokens",
    "fineweb": "FineWeb-Edu (or FineWeb) sample-10BT in GPT-2 tokens",
    "corpus": "any text corpus in GPT-2 tokens",
    "index_shards": "write meta.json for token shards made elsewhere",
}


def usage():
    lines = ["usage: gptcraft COMMAND [ARGS ...]   (gptcraft COMMAND --help for its keys)", "", "commands:"]
    lines += [f"  {name:14s} {text}" for name, (_, text) in COMMANDS.items()]
    lines += [f"  {'prepare NAME':14s} prepare a dataset; NAME is one of:"]
    lines += [f"    {name:16s} {text}" for name, text in PREPARE.items()]
    return "\n".join(lines)


def main(argv=None):
    from gptcraft.config import run_cli

    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name == "prepare":
        if not rest or rest[0] not in PREPARE:
            given = repr(rest[0]) if rest else "nothing"
            sys.exit(f"error: gptcraft prepare takes one of {', '.join(PREPARE)}; got {given}")
        module, name, rest = f"gptcraft.prepare.{rest[0]}", f"prepare {rest[0]}", rest[1:]
    elif name in COMMANDS:
        module = COMMANDS[name][0]
    else:
        sys.exit(f"error: unknown command {name!r}; run gptcraft --help for the list")
    sys.argv[0] = f"gptcraft {name}"
    run_cli(lambda: importlib.import_module(module).main(rest))
    return 0  # the mains return results (a loss, scores) for callers in Python, not exit statuses


if __name__ == "__main__":
    sys.exit(main())
