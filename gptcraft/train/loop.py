"""The training loop: evaluate and save when due, take an optimizer step, log it, stop at max_iters.

python train.py configs/train_shakespeare_char_cpu.py --max_iters=500
torchrun --standalone --nproc_per_node=8 train.py configs/train_shakespeare_char.py

`train` is the loop itself; each of its steps is a function below it: `evaluate` (losses, and a
save when they improved), `save`, `train_step` (one optimizer step over the micro-batches),
`read_flags` and `log_step`. What the run is built from is set up in setup.py, what is due when
is decided in schedule.py, and the settings are in config.py beside this file.
"""

import os
import sys
import time
from dataclasses import asdict, dataclass, field

import torch

from gptcraft.config import parse_config, run_cli
from gptcraft.evaluate import hellaswag
from gptcraft.evaluate.loss import split_loss, sum_over_batches
from gptcraft.runs import checkpoint, resume
from gptcraft.runs.lock import locked
from gptcraft.system import distributed, hardware
from gptcraft.train import optimizer, pace
from gptcraft.train.config import TrainConfig
from gptcraft.train.optimizer import learning_rate, set_learning_rate
from gptcraft.train.parallelize import clip_grad_norm, grad_sync
from gptcraft.train.schedule import Schedule, StepFlags
from gptcraft.train.setup import setup
from gptcraft.train.stops import DivergenceGuard, GracefulStop, StopRequested, nonfinite, weights_finite


def main(argv=None):
    cfg = parse_config(TrainConfig, sys.argv[1:] if argv is None else argv, prog="train.py")
    device = hardware.resolve_device(cfg.device)
    d, device = distributed.init(device, cfg.backend, cfg.dist_timeout_s)
    try:
        with GracefulStop() as stop, locked(cfg.out_dir, d):
            best_val_loss = train(cfg, d, device, stop)
        # Tearing the process group down while another rank still uses it aborts the process.
        distributed.barrier(d)
        return best_val_loss
    finally:
        distributed.shutdown()


def train(cfg, d, device, stop):
    """Train until max_iters or a stop signal; returns the best val loss."""
    job = setup(cfg, d, device)
    if job is None:
        return None
    run = Run.starting(job)
    x, y = job.next_batch(run.iter_num, 0)
    while True:
        due = run.due
        at_end, evaluates = due.at_end(run.iter_num), due.evaluates(run.iter_num)
        # The last step's flags are read before its weights are evaluated or saved. One process
        # needs no agreement with others: a signal stops it before its next step.
        alone_stopped = stop.requested is not None and not d.enabled
        must_read = due.eval_due(run.iter_num) or at_end or due.checkpoint_due(run.iter_num) or alone_stopped
        stopping = (read_flags(job, run) or alone_stopped) if must_read else False
        if not stopping:
            try:
                saved = evaluate(job, run, lambda: stop.check(d)) if evaluates else False
            except StopRequested:  # the evaluation is dropped; the resumed run does it again
                stopping = True
        if not stopping:
            if at_end:
                break
            if not saved and due.checkpoint_due(run.iter_num):
                save(job, run, evaluated=evaluates)
            x, y, step = train_step(job, run, x, y, stop)
            stopping = read_flags(job, run)  # the previous step's: this one is already queued behind it
            run.flags.defer(step["sums"], d.world_size, {"iter": run.iter_num, "lr": step["lr"]})
        if stopping:
            read_flags(job, run)  # the step queued last: logged and counted before the save
            save(job, run, evaluated=False)
            job.log.print(f"stopped by {stop.requested or 'a signal on another rank'} at iteration {run.iter_num}; "
                          f"continue with --init_from=auto (the default) --out_dir={cfg.out_dir}")  # fmt: skip
            break
    saved = [os.path.join(cfg.out_dir, name) for name in (checkpoint.LATEST, checkpoint.SHARDED, checkpoint.BEST)]
    job.log.summary(saved, run.iter_num, job.tokens_seen(run.iter_num))
    job.log.stop_on_failure(d)
    job.log.close()
    return run.best_val_loss


@dataclass
class Run:
    """What changes as the run goes: where it is, its best val loss, its counts and clocks."""

    iter_num: int
    best_val_loss: float
    guard: DivergenceGuard  # skipped steps in a row
    due: Schedule  # and the clock of the last save
    flags: StepFlags = field(default_factory=StepFlags)
    t_last: float = field(default_factory=time.time)  # when the pace was last measured
    iters_since_log: int = 0  # steps ended since t_last

    @classmethod
    def starting(cls, job):
        s, cfg = job.start, job.cfg
        return cls(s.iter_num, s.best_val_loss, DivergenceGuard(cfg.max_nonfinite_steps, s.nonfinite_in_a_row),
                   Schedule(cfg, s.iter_num, s.eval_at_start, s.redo_eval))  # fmt: skip

    def restart_pace(self):
        self.t_last, self.iters_since_log = time.time(), 0


def evaluate(job, run, check=None):
    """Estimate train and val loss (and the whole val split at the end, with full_val; HellaSwag,
    with hellaswag_file), log them, and save when the run has moved since its start; returns
    whether it saved. check: called before each loss batch, raises StopRequested to drop the
    evaluation."""
    cfg = job.cfg
    if job.forecast is not None and (note := pace.eval_note(job.forecast, cfg.eval_iters)):
        job.log.print(note)
    eval_samplers = {"train": job.samplers["eval_train"], "val": job.samplers["val"]}
    losses = estimate_loss(job.model, eval_samplers, cfg, job.device, job.dtype, job.d, check)
    row = {"iter": run.iter_num, "train_loss": losses["train"], "val_loss": losses["val"],
           "tokens_seen": job.tokens_seen(run.iter_num)}  # fmt: skip
    if cfg.full_val and (run.iter_num == cfg.max_iters or cfg.eval_only):
        val_data = [f.memmap() for f in job.dataset.splits["val"]]
        row["full_val_loss"] = split_loss(job.model, val_data, job.model_args["block_size"], cfg.batch_size,
                                          job.device, job.dtype, job.d, check)  # fmt: skip
    if job.hellaswag is not None:
        scores = hellaswag.score(job.model, *job.hellaswag, job.model_args["block_size"], job.device, job.dtype,
                                 job.d, cfg.hellaswag_batch_size)  # fmt: skip
        row.update(hellaswag_acc=scores["acc"], hellaswag_acc_norm=scores["acc_norm"],
                   hellaswag_acc_norm_tokens=scores["acc_norm_tokens"])  # fmt: skip
    job.log.record(row)
    if "full_val_loss" in row:
        job.log.print(f"full val loss {row['full_val_loss']:.4f} (every val token)")
    if job.hellaswag is not None:
        job.log.print(f"hellaswag acc {row['hellaswag_acc']:.4f}, acc_norm {row['hellaswag_acc_norm']:.4f}, "
                      f"acc_norm_tokens {row['hellaswag_acc_norm_tokens']:.4f}")  # fmt: skip
    improved = losses["val"] < run.best_val_loss
    run.best_val_loss = min(run.best_val_loss, losses["val"])
    saving = run.due.saves_evaluation(run.iter_num) and (improved or cfg.always_save_checkpoint)
    if saving:
        save(job, run, new_best=improved)
    run.restart_pace()  # evaluation time is not training time
    return saving


def estimate_loss(model, samplers, cfg, device, dtype, d, check=None):
    """Mean loss over eval_iters fixed batches per split, shared out across ranks. check: called
    before each batch on every rank; it may raise to stop the evaluation."""
    out = {}
    for split, sampler in samplers.items():
        (total,) = sum_over_batches(model, cfg.eval_iters, lambda j, s=sampler: model(*s.batch(j))[1], device, dtype, d,
                                    check=check)  # fmt: skip
        out[split] = total / cfg.eval_iters
    return out


def save(job, run, new_best=False, evaluated=True):
    """Collective. Write the resume checkpoint, and best.pt when `new_best`; never weights that are
    no longer finite. evaluated: saved right after the evaluation at iter_num."""
    cfg, d = job.cfg, job.d
    if distributed.any_rank_says(not weights_finite(job.model), d):
        job.log.print(f"checkpoint not saved at iter {run.iter_num}: the weights are not finite")
        return
    drawn = job.batches_drawn(run.iter_num)
    progress = {"iter_num": run.iter_num, "best_val_loss": run.best_val_loss, "config": asdict(cfg),
                "loader": job.samplers["train"].state(drawn), "evaluated": evaluated,
                "nonfinite_in_a_row": run.guard.in_a_row}  # fmt: skip
    # best.pt first: a run killed between the two saves redoes these steps and writes it again.
    if new_best:
        resume.save_best(cfg.out_dir, job.model, job.model_args, progress, d)
    resume.save_latest(cfg.out_dir, job.model, job.optimizer, job.scaler, job.model_args, progress, d, job.device,
                       cfg.fsdp)  # fmt: skip
    run.due.saved()
    run.restart_pace()  # the save's time is not training time
    saved = checkpoint.SHARDED if cfg.fsdp else checkpoint.LATEST
    job.log.print(
        f"saved {saved}{' and ' + checkpoint.BEST if new_best else ''} in {cfg.out_dir} at iter {run.iter_num}"
    )


def train_step(job, run, x, y, stop):
    """One optimizer step over this rank's micro-batches, starting with (x, y); returns the first
    batch of the next step and the step's lr and "sums": its flags, loss and gradient norm summed
    over ranks, still on the device.

    No host sync in the step: the flags are reduced over ranks on the device, a NaN step's update
    is masked there (fused AdamW's found_inf, Muon's skip), and the host reads the sums one step
    later (`read_flags`). Every rank reads the same sums, so all stop at the same step."""
    lr = learning_rate(job.cfg, run.iter_num)
    set_learning_rate(job.optimizer, lr)
    step_loss = torch.zeros((), device=job.device)  # summed on the device: no host sync per micro-step
    for micro in range(job.accum):
        # Only the last micro-step reduces gradients across ranks.
        with grad_sync(job.model, micro == job.accum - 1):
            with hardware.autocast(job.device, job.dtype):
                _, loss = job.model(x, y)
                loss = loss / job.accum  # the step's gradient is the mean over its micro-batches
            step_loss += loss.detach()
            if micro == job.accum - 1:
                x, y = job.next_batch(run.iter_num + 1, 0)  # fetch while the device still works
            else:
                x, y = job.next_batch(run.iter_num, micro + 1)
            job.scaler.scale(loss).backward()
    job.scaler.unscale_(job.optimizer)  # true gradients, for the norm and clipping (no-op without fp16)
    grad_norm = clip_grad_norm(job.model, job.cfg.grad_clip)
    # The norm is global (DDP reduced the gradients, FSDP's norm spans the shards): any rank's
    # NaN shows in it. skip: leave the weights alone; bad: counts towards the divergence guard.
    skip = ~torch.isfinite(step_loss) | ~torch.isfinite(grad_norm)
    bad = nonfinite(step_loss, grad_norm, job.scaler.is_enabled())
    stop_here = torch.full_like(bad, stop.requested is not None)  # a fill: no copy that waits
    log_failed = torch.full_like(bad, job.log.failure is not None)
    minutes_up = torch.full_like(bad, run.due.minutes_passed())
    # One all-reduce (a sum) for the flags (any rank's 1 makes the sum > 0), the loss and the norm.
    sums = torch.stack([skip, bad, stop_here, log_failed, minutes_up, step_loss, grad_norm.to(step_loss.device)])
    sums = distributed.sum_on_device(sums, job.d)
    optimizer.step(job.optimizer, sums[0].to(grad_norm.device) > 0)  # skipped on the device when any rank's was NaN
    job.scaler.update()  # fp16: lowers the scale after an overflow, as scaler.step would have
    job.optimizer.zero_grad(set_to_none=True)
    run.iter_num += 1
    job.log.step()
    return x, y, {"lr": lr, "sums": sums}


def read_flags(job, run):
    """Read the sums of the last step not yet read (waiting for that step only): stop on a failed
    log write, report a skipped step and count it for the divergence guard, log the step at log
    steps; returns whether every rank is to stop."""
    read = run.flags.read()
    if read is None:
        return False
    flags, step = read
    job.log.stop_on_failure(job.d, flags["log_failed"])
    run.due.minutes_up = run.due.minutes_up or flags["minutes_up"]
    if flags["bad"]:
        job.log.print(f"skipped step {step['iter']}: loss or gradient norm is NaN/Inf")
    run.guard.record(flags["bad"], step["iter"])
    run.iters_since_log += 1
    if step["iter"] % job.cfg.log_interval == 0:
        log_step(job, run, step)
    return flags["stop"]


def log_step(job, run, step):
    """Log a step's loss (averaged over ranks), pace, MFU and gradient norm. The pace is measured
    between the ends of steps (see StepFlags.read), so it holds however far the host runs ahead."""
    dt = (step["done_at"] - run.t_last) / run.iters_since_log
    tokens_per_s = job.tokens_per_iter / dt
    mfu = job.raw_model.estimate_mfu(tokens_per_s / job.d.world_size, job.peak) if job.peak else None
    job.log.record({"iter": step["iter"], "loss": step["loss"], "lr": step["lr"], "ms_per_iter": 1000 * dt,
                    "tokens_per_s": tokens_per_s, "mfu": mfu, "grad_norm": step["grad_norm"],
                    "tokens_seen": job.tokens_seen(step["iter"])})  # fmt: skip
    run.t_last, run.iters_since_log = step["done_at"], 0


if __name__ == "__main__":
    run_cli(main)
