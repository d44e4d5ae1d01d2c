"""Two ways a run stops early without losing work.

Signals: SIGTERM (preemption, torchrun shutting down) or SIGINT (Ctrl-C) only record the request,
and say so at once; the trainer finishes the step, or drops the evaluation at its next batch,
saves and exits 0. A second signal of the same kind is handled the default way, so Ctrl-C twice
still stops at once (the command prints one line, see gptcraft.config.run_cli).
Divergence: a step whose loss or gradient norm is NaN or Inf is not applied, and too many such
steps in a row stop the run before it wastes more compute.
"""

import os
import signal

import torch

from gptcraft.errors import GptcraftError
from gptcraft.system.distributed import any_rank, is_dtensor

SIGNALS = (signal.SIGTERM, signal.SIGINT)
NOTICE = {"SIGINT": "Ctrl-C: stopping after this step or evaluation batch, then saving; Ctrl-C again to stop now",
          "SIGTERM": "SIGTERM: stopping after this step or evaluation batch, then saving"}  # fmt: skip


class StopRequested(Exception):
    """A stop signal reached some rank during an evaluation: its result is dropped."""


class GracefulStop:
    """Context manager installing the handlers; `requested` names the signal received, or is None."""

    def __init__(self):
        self.requested = None
        self.previous = {}

    def _handle(self, signum, frame):
        self.requested = signal.Signals(signum).name
        signal.signal(signum, self.previous[signum])
        if os.environ.get("RANK", "0") == "0":  # torchrun's workers all get the terminal's Ctrl-C
            # os.write, not print: the handler may run in the middle of a print to the same stream.
            os.write(2, f"\n{NOTICE[self.requested]}\n".encode())

    def check(self, d):
        """Collective under torchrun, called by every rank before each evaluation batch: raise
        StopRequested once a signal has reached any rank."""
        if any_rank(torch.tensor([self.requested is not None]), d)[0]:
            raise StopRequested

    def __enter__(self):
        for sig in SIGNALS:
            self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


class TrainingDiverged(GptcraftError, RuntimeError):
    """The loss or gradient norm stayed non-finite for max_nonfinite_steps steps in a row."""


def nonfinite(loss, grad_norm, scaled):
    """A device tensor, True when this step must be skipped. With fp16 loss scaling an infinite
    gradient norm is the scaler's business (it skips the step and lowers the scale); a
    non-finite loss is not."""
    bad = ~torch.isfinite(loss)
    if not scaled:
        bad |= ~torch.isfinite(grad_norm)
    return bad


def weights_finite(model):
    """Whether this rank's parameters (its shards, under FSDP) hold only finite numbers."""
    local = (p.to_local() if is_dtensor(p) else p for p in model.parameters())
    return bool(torch.stack([torch.isfinite(t).all() for t in local]).all())  # one host sync


class DivergenceGuard:
    def __init__(self, max_in_a_row, in_a_row=0):
        """in_a_row: skipped steps in a row already (a resumed run carries its checkpoint's count)."""
        self.max_in_a_row = max_in_a_row
        self.in_a_row = in_a_row

    def record(self, skipped, iter_num):
        """Count a skipped or applied step; raise TrainingDiverged when too many skipped in a row."""
        self.in_a_row = self.in_a_row + 1 if skipped else 0
        if self.in_a_row >= self.max_in_a_row:
            raise TrainingDiverged(
                f"loss or gradient norm was NaN/Inf for {self.in_a_row} steps in a row (up to iteration "
                f"{iter_num}); the run stopped and the last checkpoint was kept. Lower learning_rate, "
                "raise warmup_iters, use grad_clip or float32/bfloat16, or check the data"
            )
