"""log.jsonl, read back: the rows a run wrote, as the run stands now, and what it achieved.

The writer is runlog.RunLog; plot.py and the run summary read through this module.
"""

import json
import math
import os
import sys


def warn(message):
    print(f"warning: {message}", file=sys.stderr)


# The fields readers compute with (runlog.py lists the rows), each a number or null where present.
NUMBERS = ("time_s", "loss", "lr", "ms_per_iter", "tokens_per_s", "mfu", "grad_norm", "tokens_seen", "train_loss",
           "val_loss", "full_val_loss", "hellaswag_acc", "hellaswag_acc_norm", "hellaswag_acc_norm_tokens")  # fmt: skip


def _is_number(value):
    return value is None or (isinstance(value, int | float) and not isinstance(value, bool))


def well_typed(row):
    """Whether a parsed row can be read: an object whose iter (where present, and in a start row) is
    an integer, whose event and wandb_id are text, and whose NUMBERS are numbers."""
    if not isinstance(row, dict) or not isinstance(row.get("event", ""), str):
        return False
    if ("iter" in row or row.get("event") == "start") and type(row.get("iter")) is not int:
        return False
    return isinstance(row.get("wandb_id"), str | None) and all(_is_number(row[k]) for k in NUMBERS if k in row)


def read_rows(path, quiet=False):
    """Every row of a log.jsonl that parses and is well typed; a line that is not (the last line of a
    killed run, a damaged file) is skipped, with a warning unless quiet."""
    rows = []
    with open(path, encoding="utf-8", errors="replace") as f:  # bytes that are not UTF-8 fail to parse
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                row = None
            if well_typed(row):
                rows.append(row)
            elif not quiet:
                warn(f"{path}: line {number} is incomplete, corrupt or of the wrong types (a run killed while "
                     f"writing?); skipped")  # fmt: skip
    return rows


def ends_a_line(path):
    """Whether a file is empty or ends with a newline."""
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        if f.tell() == 0:
            return True
        f.seek(-1, os.SEEK_END)
        return f.read(1) == b"\n"


def metric_rows(rows):
    """The train and eval rows of a log, as the run stands now: where a resumed run restarted
    from its checkpoint at iter k, the rows the first run logged after k are dropped."""
    kept = []
    for row in rows:
        if row.get("event") == "start":
            kept = [r for r in kept if r["iter"] <= row["iter"]]
        elif "event" not in row and "iter" in row:
            kept.append(row)
    return kept


def read_log(out_dir, quiet=False):
    """The train and eval rows of out_dir/log.jsonl (see `metric_rows`)."""
    return metric_rows(read_rows(os.path.join(out_dir, "log.jsonl"), quiet))


def summarize(rows):
    """What a finished run achieved, computed from its train and eval rows."""
    train = [r for r in rows if "loss" in r]
    evals = [r for r in rows if "val_loss" in r]
    finite = [r for r in evals if math.isfinite(r["val_loss"])]  # a diverged run logs NaN
    best = min(finite, key=lambda r: r["val_loss"]) if finite else None
    mfus = [r["mfu"] for r in train if r.get("mfu") is not None]
    full_val = [r["full_val_loss"] for r in evals if "full_val_loss" in r]
    summary = {
        "iters": rows[-1]["iter"] if rows else 0,
        "best_val_loss": best["val_loss"] if best else None,
        "best_val_iter": best["iter"] if best else None,
        "tokens_seen": max((r.get("tokens_seen", 0) for r in rows), default=0),
        "mean_tokens_per_s": sum(r["tokens_per_s"] for r in train) / len(train) if train else None,
        "mean_mfu": sum(mfus) / len(mfus) if mfus else None,
    }
    if full_val:  # only runs with --full_val=True score the whole val split
        summary["full_val_loss"] = full_val[-1]
    return summary
