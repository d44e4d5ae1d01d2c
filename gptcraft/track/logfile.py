"""log.jsonl, read back: the rows a run wrote, as the run stands now, and what it achieved.

The writer is runlog.RunLog; plot.py and the run summary read through this module.
"""

import json
import math
import os
import sys


def warn(message):
    print(f"warning: {message}", file=sys.stderr)


def read_rows(path, quiet=False):
    """Every row of a log.jsonl that parses; a line that does not (the last line of a killed run)
    is skipped, with a warning unless quiet."""
    rows = []
    with open(path) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                row = None
            if isinstance(row, dict):
                rows.append(row)
            elif not quiet:
                warn(f"{path}: line {number} is incomplete or corrupt (a run killed while writing?); skipped")
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
