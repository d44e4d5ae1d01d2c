"""What the training loop does when: which iterations evaluate, which save, and the step's flags
that the host reads one step late."""

import time


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
    """The flags of the last optimizer step, reduced over ranks on the device (a 0/1 tensor in the
    order of NAMES). The host reads them one step late, after the next step is queued behind them,
    or at once before that step's weights are evaluated or saved."""

    NAMES = ("skip", "bad", "stop", "log_failed", "minutes_up")

    def __init__(self):
        self.pending = None  # (flags, iter_num) of the last step, until read

    def defer(self, flags, iter_num):
        self.pending = (flags, iter_num)

    def read(self):
        """({name: bool}, iter_num) of the step not read yet, or None; waits for that step."""
        if self.pending is None:
            return None
        flags, iter_num = self.pending
        self.pending = None
        return dict(zip(self.NAMES, (bool(f) for f in flags.tolist()), strict=True)), iter_num
