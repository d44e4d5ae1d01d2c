"""What a run reports: a console line per logged step (with an ETA), a tqdm bar on terminals,
out_dir/log.jsonl, optionally Weights & Biases and out_dir/loss.png, and a summary at the end.

log.jsonl is the record every other view is drawn from. Its rows:
  train rows  {"time_s", "iter", "loss", "lr", "ms_per_iter", "tokens_per_s", "mfu", "grad_norm", "tokens_seen"}
  eval rows   {"time_s", "iter", "train_loss", "val_loss", "tokens_seen"}, and "full_val_loss" on the
              last one of a run with full_val=True
  {"time_s", "event": "start", "iter", "wandb_id", "resumed", "job", "restart"}  where a run starts at
              iter (resumed: from a checkpoint; job: SLURM_JOB_ID or TORCHELASTIC_RUN_ID; restart:
              torchrun's restart count)
  {"time_s", "event": "summary", ...}  at the end of training (see `summarize`)
time_s counts from the first start: a resumed run carries on from the time its log ends at.
"""

import json
import os
import sys
import time

from tqdm import tqdm

from gptcraft.errors import GptcraftError
from gptcraft.files import LinkError, open_append, open_new
from gptcraft.system import distributed
from gptcraft.system.hardware import cpu_peak_cache
from gptcraft.track.logfile import ends_a_line, read_log, read_rows, summarize


class TrackingError(GptcraftError):
    """Weights & Biases is asked for but cannot run, or out_dir could not be written."""


def write_failure(path, e):
    """The one line for a failed write to `path` (a full disk, a lost mount) in out_dir."""
    why = getattr(e, "strerror", None) or str(e).strip().splitlines()[0]
    return TrackingError(f"could not write {path} ({why}); the previous checkpoint is intact, free space and "
                         "resume with --init_from=resume")  # fmt: skip


WANDB_INSTALL = 'pip install -e ".[wandb]"'


def require_wandb():
    """The wandb module, or a TrackingError that says how to install it."""
    try:
        import wandb
    except ImportError:
        raise TrackingError(f"wandb_log=True needs the wandb package; install it with: {WANDB_INSTALL}") from None
    return wandb


def format_duration(seconds):
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


def train_line(row, eta_s):
    text = (f"iter {row['iter']}: loss {row['loss']:.4f}, lr {row['lr']:.2e}, {row['ms_per_iter']:.1f} ms/iter, "
            f"{row['tokens_per_s']:,.0f} tok/s")  # fmt: skip
    if row.get("mfu") is not None:
        text += f", mfu {100 * row['mfu']:.1f}%"
        if row["mfu"] > 1:
            text += (" (cannot be: the peak it is measured against is too low; on a CPU, delete "
                     f"{cpu_peak_cache()} to measure it again while the machine is idle)")  # fmt: skip
    if row.get("grad_norm") is not None:
        text += f", grad norm {row['grad_norm']:.3f}"
    if eta_s is not None:
        text += f", eta {format_duration(eta_s)}"
    return text


def summary_lines(summary):
    lines = [f"done: {summary['iters']} iters, {summary['tokens_seen']:,} tokens seen, "
             f"wall time {format_duration(summary['wall_time_s'])}"]  # fmt: skip
    if summary["best_val_loss"] is not None:
        lines.append(f"  best val loss {summary['best_val_loss']:.4f} at iter {summary['best_val_iter']}")
    if "full_val_loss" in summary:
        lines.append(f"  full val loss {summary['full_val_loss']:.4f} (the whole val split, last eval)")
    if summary["mean_tokens_per_s"] is not None:
        mfu = summary["mean_mfu"]
        mfu_text = f", mean mfu {100 * mfu:.1f}%" if mfu is not None else ""
        lines.append(f"  mean {summary['mean_tokens_per_s']:,.0f} tok/s{mfu_text}")
    lines += [f"  checkpoint {path}" for path in summary["checkpoints"]]
    return lines


class RunLog:
    """Rank 0 reports; other ranks hold a RunLog that does nothing.

    config: the resolved run config as a dict; its keys wandb_log, wandb_project, wandb_run_name
    and plot_loss switch on Weights & Biases and the loss plot, and wandb records it as the run config.

    A write into out_dir that fails does not raise where it happens, on rank 0 alone: it is kept in
    `failure`, nothing more is written, and the loop stops every rank together at its next sync.
    """

    def __init__(self, out_dir, enabled, start_iter, max_iters, resumed=False, config=None, start_row=None):
        config = config or {}
        self.enabled = enabled
        self.out_dir = out_dir
        self.start_iter, self.max_iters = start_iter, max_iters
        self.plot_loss = config.get("plot_loss", False)
        self.training = not config.get("eval_only", False)
        self.t0 = time.time()
        # (time, iter) of this session's first logged step: start-up, compiling and a resumed
        # run's first evaluation are not the pace.
        self.eta_anchor = None
        self.file = self.bar = self.wandb_run = self.failure = None
        if not enabled:
            return
        self.path = path = os.path.join(out_dir, "log.jsonl")
        previous = read_rows(path) if resumed and os.path.exists(path) else []
        # A resumed run appends to the log of the run it continues, and its clock carries on.
        self.t0 -= max((r.get("time_s", 0) for r in previous), default=0)
        if config.get("wandb_log"):  # first: a run wandb refuses leaves the old log as it was
            resume_id = next((r["wandb_id"] for r in reversed(previous) if r.get("wandb_id")), None)
            self.wandb_run = self._start_wandb(config, resume_id)
        self.guarded(path, lambda: self._open(path, resumed))
        if self.training:  # an evaluation of a checkpoint continues no run: readers keep every row
            self.write({"event": "start", "iter": start_iter,
                        "wandb_id": self.wandb_run.id if self.wandb_run else None, **(start_row or {})})  # fmt: skip
        if sys.stderr.isatty():
            self.bar = tqdm(total=max_iters, initial=start_iter, unit="it", dynamic_ncols=True, leave=False)

    def _open(self, path, resumed):
        if resumed:  # appended to, never through a link: a link there is refused
            self.file = open_append(path)
            if not ends_a_line(path):
                self.file.write("\n")  # ends the line a killed run left incomplete, so that the next row parses
        else:  # a new run's log is a new file, whatever stood there (a link: replaced, not followed)
            if os.path.lexists(path):
                os.remove(path)
            self.file = open_new(path, "w")

    def guarded(self, path, write):
        """Call write(), which writes `path`; a failure is kept in self.failure, and after one nothing
        more is written."""
        if self.failure is not None:
            return
        try:
            write()
        except LinkError:
            raise
        except (OSError, RuntimeError) as e:  # RuntimeError: matplotlib's savefig on a full disk
            self.failure = write_failure(path, e)

    def _start_wandb(self, config, resume_id):
        wandb = require_wandb()
        name = config.get("wandb_run_name") or os.path.basename(os.path.normpath(self.out_dir))
        try:
            run = wandb.init(project=config.get("wandb_project"), name=name, config=config, dir=self.out_dir,
                             id=resume_id, resume="allow" if resume_id else None)  # fmt: skip
        except wandb.errors.Error as e:  # no login, no network, a bad project name
            hint = "to log without a network: WANDB_MODE=offline"
            raise TrackingError(f"wandb could not start a run: {e} ({hint})") from None
        # Plot against the iteration: a resumed run logs iterations again from its checkpoint.
        run.define_metric("iter")
        run.define_metric("*", step_metric="iter")
        return run

    def elapsed(self):
        return time.time() - self.t0

    def write(self, row):
        """Append one JSON row to log.jsonl, stamped with seconds since the run started."""
        if not self.enabled:
            return
        row = {"time_s": round(self.elapsed(), 3), **row}
        line = json.dumps(row) + "\n"
        self.guarded(self.path, lambda: (self.file.write(line), self.file.flush()))
        return row

    def record(self, row):
        """Report a train row (it has "loss") or an eval row (it has "val_loss") everywhere."""
        if not self.enabled:
            return
        row = self.write(row)
        if "val_loss" in row:
            self.print(f"eval {row['iter']}: train loss {row['train_loss']:.4f}, val loss {row['val_loss']:.4f}")
        else:
            self.print(train_line(row, self.eta(row["iter"], row["ms_per_iter"])))
            if self.eta_anchor is None:
                self.eta_anchor = (time.time(), row["iter"])
            if self.bar is not None:
                self.bar.set_postfix(loss=f"{row['loss']:.4f}", refresh=False)
        if self.wandb_run is not None:
            self.wandb_run.log({k: v for k, v in row.items() if v is not None})
        if self.plot_loss and "val_loss" in row:
            from gptcraft.track import plot  # matplotlib loads only for runs that draw

            # quiet: a broken line a killed run left was reported once, when this run resumed.
            png = os.path.join(self.out_dir, "loss.png")
            self.guarded(png, lambda: plot.draw([self.out_dir], png, quiet=True))

    def eta(self, it, ms_per_iter):
        """Seconds left: at the first logged step of this session, at that step's own pace
        (ms_per_iter); later at the mean wall time per iteration since then, evaluations included."""
        if self.eta_anchor is None or it <= self.eta_anchor[1]:
            return ms_per_iter / 1000 * (self.max_iters - it)
        anchor_time, anchor_iter = self.eta_anchor
        return (time.time() - anchor_time) / (it - anchor_iter) * (self.max_iters - it)

    def summary(self, checkpoints, iters, tokens_seen):
        """Print and log what the run achieved, from log.jsonl; checkpoints: paths saved by the run;
        iters, tokens_seen: where it ended (a stop signal ends it between logged steps)."""
        if not (self.enabled and self.training) or self.failure is not None:
            return None
        summary = {**summarize(read_log(self.out_dir, quiet=True)), "iters": iters, "tokens_seen": tokens_seen}
        summary["wall_time_s"] = round(self.elapsed(), 3)
        summary["checkpoints"] = [p for p in checkpoints if os.path.exists(p)]
        for line in summary_lines(summary):
            self.print(line)
        self.write({"event": "summary", **summary})
        if self.wandb_run is not None:
            self.wandb_run.summary.update({k: v for k, v in summary.items() if v is not None})
        return summary

    def print(self, line):
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(line)
        else:
            print(line, flush=True)

    def stop_on_failure(self, d, failed=None):
        """Collective: stop every rank together, with rank 0's one line, once rank 0 could not write
        into out_dir (self.failure). failed: the flag, already reduced over the ranks."""
        if failed is None:
            failed = distributed.any_rank_says(self.failure is not None, d)
        if failed:
            self.close()
            raise self.failure or TrackingError("rank 0 could not write into out_dir")

    def step(self, n=1):
        if self.bar is not None:
            self.bar.update(n)

    def close(self):
        if self.bar is not None:
            self.bar.close()
        if self.file is not None:
            try:
                self.file.close()
            except OSError:  # its last rows could not be written: failure says so
                pass
        if self.wandb_run is not None:
            self.wandb_run.finish()
