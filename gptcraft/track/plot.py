"""Draw the train and val loss of one or several runs on one figure, from their log.jsonl files.

gptcraft plot out-shakespeare-char-cpu               # writes out-shakespeare-char-cpu/loss.png
gptcraft plot out-a out-b --x tokens -o compare.png  # several runs: loss.png in the current folder by default
"""

import argparse
import math
import os
import sys

import matplotlib

matplotlib.use("Agg")  # files only: no display needed
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import EngFormatter  # noqa: E402

from gptcraft.errors import GptcraftError
from gptcraft.files import write_atomic  # noqa: E402
from gptcraft.track.logfile import read_log, warn  # noqa: E402

X_AXES = {"iter": "iteration", "time": "wall time", "tokens": "tokens seen"}


class PlotError(GptcraftError):
    """Nothing can be drawn; the message says why."""


def run_names(out_dirs):
    """Legend names: each out_dir's last path part, or the whole path where two runs share one."""
    names = [os.path.basename(os.path.normpath(d)) for d in out_dirs]
    return [n if names.count(n) == 1 else os.path.normpath(d) for n, d in zip(names, out_dirs, strict=True)]


def run_rows(out_dir, quiet=False):
    """A run's train and eval rows; PlotError where out_dir has no log.jsonl."""
    if not os.path.isfile(os.path.join(out_dir, "log.jsonl")):
        what = "directory" if os.path.isdir(out_dir) else "path"
        hint = "" if os.path.isdir(out_dir) else " (no such directory)"
        raise PlotError(f"{out_dir}: no log.jsonl in this {what}{hint}; give the out_dir of a train.py run")
    try:
        return read_log(out_dir, quiet)
    except OSError as e:
        raise PlotError(f"{out_dir}: cannot read log.jsonl ({e.strerror})") from None


def series(rows, key, x):
    """(xs, ys) of the rows that hold `key`; non-finite values (a diverged run) become gaps."""
    field = {"iter": "iter", "time": "time_s", "tokens": "tokens_seen"}[x]
    points = [(r[field], r[key]) for r in rows if key in r and field in r]
    return [p[0] for p in points], [v if v is not None and math.isfinite(v) else math.nan for _, v in points]


def time_unit(rows):
    """Seconds, minutes or hours, whichever keeps the time axis' numbers readable."""
    longest = max((r.get("time_s", 0) for r in rows), default=0)
    return (3600, "h") if longest > 3 * 3600 else (60, "min") if longest > 180 else (1, "s")


def draw(out_dirs, path, x="iter", quiet=False):
    """Plot the runs in out_dirs against x (iter, time or tokens) into the PNG at path.
    Runs without rows are left out with a warning; PlotError if none has any.
    quiet: no warning for broken lines in a log."""
    runs = []
    for out_dir, name in zip(out_dirs, run_names(out_dirs), strict=True):
        rows = run_rows(out_dir, quiet)
        if not any("loss" in r or "val_loss" in r for r in rows):
            warn(f"{out_dir}: log.jsonl has no loss rows yet (the run logged no step); left out")
            continue
        if x == "tokens" and not any("tokens_seen" in r for r in rows):
            raise PlotError(f"{out_dir}: log.jsonl has no tokens_seen (written by an older train.py); use --x iter")
        runs.append((name, rows))
    if not runs:
        raise PlotError("no run has logged a loss yet: nothing to plot")

    scale, unit = time_unit([r for _, rows in runs for r in rows]) if x == "time" else (1, "")
    fig, ax = plt.subplots(figsize=(9, 5.5), dpi=120)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (name, rows) in enumerate(runs):
        color = colors[i % len(colors)]
        xs, ys = series(rows, "loss", x)
        if xs:
            ax.plot([v / scale for v in xs], ys, color=color, alpha=0.45, linewidth=1.2, label=f"{name} train")
        xs, ys = series(rows, "val_loss", x)
        if xs:
            ax.plot([v / scale for v in xs], ys, color=color, linewidth=2.2, marker="o", markersize=4,
                    label=f"{name} val")  # fmt: skip
    ax.set_xlabel(f"{X_AXES[x]} ({unit})" if unit else X_AXES[x])
    ax.set_ylabel("loss (cross-entropy, nats per token)")
    if x == "tokens":
        ax.xaxis.set_major_formatter(EngFormatter())
    ax.set_title("train and val loss" if len(runs) == 1 else f"train and val loss of {len(runs)} runs")
    ax.grid(True, alpha=0.3)
    ax.legend(frameon=False)
    fig.tight_layout()
    # Written beside the target, then renamed: a viewer never sees a half-written image.
    try:
        write_atomic(path, lambda f: fig.savefig(f, format="png"))
    finally:
        plt.close(fig)


def default_output(out_dirs):
    """One run's plot goes into its own folder, beside its log; a comparison of several belongs to none of them."""
    return os.path.join(out_dirs[0], "loss.png") if len(out_dirs) == 1 else "loss.png"


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="gptcraft plot", description="Plot train and val loss of train.py runs from their log.jsonl."
    )
    parser.add_argument("out_dirs", nargs="+", metavar="OUT_DIR", help="out_dir of a train.py run")
    parser.add_argument("--x", choices=sorted(X_AXES), default="iter", help="x axis (default: iter)")
    parser.add_argument("-o", "--output", help="PNG file to write (default: OUT_DIR/loss.png for one run, "
                        "loss.png in the current folder for several)")  # fmt: skip
    args = parser.parse_args(argv)
    if args.output is None:
        args.output = default_output(args.out_dirs)
    if not args.output.lower().endswith(".png"):
        sys.exit(f"error: the output is a PNG image: give -o a name ending in .png, not {args.output!r}")
    try:
        draw(args.out_dirs, args.output, args.x)
    except PlotError as e:
        sys.exit(f"error: {e}")
    except OSError as e:
        sys.exit(f"error: cannot write {args.output}: {e.strerror}")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
