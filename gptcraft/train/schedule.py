"""What the training loop does when: which iterations evaluate, which save, and the step's flags
that the host reads one step late."""

import time

import torch


class Schedule:
    """What is due at an iteration. Evaluations come every eval_interval iterations, at max_iters
    and for eval_only; resume checkpoints also every checkpoint_interval iterations, or once
    checkpoint_minutes have passed since the last save (on any rank: see StepFlags).

    At the run's first iteration a new run evaluates without saving, and so does an evaluation only.
    A resumed run skips the evaluation its checkpoint was saved right after, but a stop signal saves
    between evaluations: then the one due at that iteration is done now, and saved (redo_eval)."""

    def __init__(self, cfg, start_iter, eval_at_start, redo_eval):
        self.cfg, self.start_iter = cfg, start_iter
        self.eval_at_start, self.redo_eval = eval_at_start, redo_eval
        self.t_saved = time.time()  # when the resume checkpoint was last saved (or the run started)
        self.minutes_up = False  # checkpoint_minutes have passed on some rank

    def at_end(self, it):
        return self.cfg.eval_only or it >= self.cfg.max_iters

    def eval_due(self, it):
        return it % self.cfg.eval_interval == 0 or it == self.cfg.max_iters or self.cfg.eval_only

    def evaluates(self, it):
        return self.eval_due(it) and (it > self.start_iter or self.eval_at_start)

    def saves_evaluation(self, it):
        """Whether an evaluation at `it` may save: only once the run has moved, or to redo one."""
        return it > self.start_iter or self.redo_eval

    def checkpoint_due(self, it):
        if it == self.start_iter:
            return False
        interval = self.cfg.checkpoint_interval
        return bool(interval and it % interval == 0) or self.minutes_up

    def minutes_passed(self):
        minutes = self.cfg.checkpoint_minutes
        return bool(minutes) and time.time() - self.t_saved >= 60 * minutes

    def saved(self):
        self.t_saved, self.minutes_up = time.time(), False


class StepFlags:
    """What the host learns of an optimizer step one step late: its flags (in the order of NAMES)
    and its loss and gradient norm, summed over ranks on the device into one float32 tensor.

    On a GPU the sums are copied non_blocking into pinned host memory and an event is recorded
    behind the copy. `read` waits on that event only: the step queued after this one keeps the
    GPU busy meanwhile, and the host never waits for the work it has just launched. On a CPU the
    sums are already on the host; the same one-step-late order holds."""

    NAMES = ("skip", "bad", "stop", "log_failed", "minutes_up")

    def __init__(self):
        self.pending = None  # (host copy, its event or None, world size, the step's own figures)

    def defer(self, sums, world_size, step):
        """sums: NAMES then loss and grad norm, summed over ranks; step: {"iter", "lr"}."""
        if sums.is_cuda:
            host = torch.empty(sums.shape, dtype=sums.dtype, pin_memory=True)
            host.copy_(sums, non_blocking=True)
            done = torch.cuda.Event()
            done.record()
        else:
            host, done = sums, None
            step = {**step, "done_at": time.time()}  # computed already
        self.pending = (host, done, world_size, step)

    def read(self):
        """({name: bool}, the step's {"iter", "lr", "loss", "grad_norm", "done_at"}) of the step not
        read yet, or None; waits for that step (and nothing queued after it). done_at: when the step
        ended (on a GPU: when the wait for it ended, which in a queue that runs ahead is its end)."""
        if self.pending is None:
            return None
        host, done, world_size, step = self.pending
        self.pending = None
        if done is not None:
            done.synchronize()
            step = {**step, "done_at": time.time()}
        *flags, loss, grad_norm = host.tolist()
        # The gradient norm is the same on every rank (reduced gradients): its sum over ranks / world_size.
        figures = {**step, "loss": loss / world_size, "grad_norm": grad_norm / world_size}
        return dict(zip(self.NAMES, (f > 0 for f in flags), strict=True)), figures
