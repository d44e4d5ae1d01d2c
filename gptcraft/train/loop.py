"""The training loop: set up a run, then evaluate-and-save and optimizer steps until max_iters.

python train.py configs/train_shakespeare_char_cpu.py --max_iters=500
torchrun --standalone --nproc_per_node=8 train.py configs/train_shakespeare_char.py

`train` is the loop itself; each of its steps is a function below it: `setup` (data, model,
parallelism, optimizer, resume), `evaluate`, `save`, `train_step` (one optimizer step over the
micro-batches) and `log_step`. The settings are in config.py beside this file.
"""

import os
import sys
import time
from dataclasses import asdict, dataclass

import torch

from gptcraft.config import ConfigError, parse_config, run_cli
from gptcraft.data.batches import (
    TRAIN_EVAL_STREAM,
    TRAIN_STREAM,
    VAL_STREAM,
    LoaderStateError,
    WindowError,
    WindowSampler,
)
from gptcraft.data.shards import META, TokenFileError, is_dataset, open_dataset, write_meta
from gptcraft.data.tokenizer import load_tokenizer
from gptcraft.evaluate import hellaswag
from gptcraft.evaluate.loss import full_split_loss
from gptcraft.hf import from_pretrained, hub_name
from gptcraft.system import distributed, hardware
from gptcraft.track.runlog import RunLog, TrackingError
from gptcraft.train import checkpoint, outdir, state
from gptcraft.train.config import TrainConfig
from gptcraft.train.optimizer import learning_rate, make_optimizer, set_learning_rate
from gptcraft.train.parallelize import clip_grad_norm, grad_sync, parallelize
from gptcraft.train.state import Resume
from gptcraft.train.stops import DivergenceGuard, GracefulStop, nonfinite, weights_finite
from model import GPT, GPTConfig


def main(argv=None):
    cfg = parse_config(TrainConfig, sys.argv[1:] if argv is None else argv, prog="train.py")
    device = hardware.resolve_device(cfg.device)
    d, device = distributed.init(device, cfg.backend, cfg.dist_timeout_s)
    try:
        with GracefulStop() as stop, outdir.locked(cfg.out_dir, d):
            best_val_loss = train(cfg, d, device, stop)
        # Tearing the process group down while another rank still uses it aborts the process.
        distributed.barrier(d)
        return best_val_loss
    finally:
        distributed.shutdown()


def train(cfg, d, device, stop):
    """Train until max_iters or a stop signal; returns the best val loss."""
    run = setup(cfg, d, device)
    if run is None:
        return None
    x, y = run.next_batch(run.iter_num, 0)
    while True:
        due = run.iter_num % cfg.eval_interval == 0 or run.iter_num == cfg.max_iters or cfg.eval_only
        at_end = cfg.eval_only or run.iter_num >= cfg.max_iters
        # The last step's flags are read before its weights are evaluated or saved.
        stopping = settle(run) if due or at_end or checkpoint_due(run) else False
        if not stopping:
            evaluated = due and (run.iter_num > run.start_iter or run.eval_at_start)
            saved = evaluate_and_save(run) if evaluated else False
            if at_end:
                break
            if not saved and checkpoint_due(run):
                save(run, evaluated=evaluated)
            x, y, stopping = train_step(run, x, y, stop)
        if stopping:
            save(run, evaluated=False)
            run.log.print(f"stopped by {stop.requested or 'a signal on another rank'} at iteration {run.iter_num}; "
                          f"continue with --init_from=auto (the default) --out_dir={cfg.out_dir}")  # fmt: skip
            break
    saved = [os.path.join(cfg.out_dir, name) for name in (checkpoint.LATEST, checkpoint.SHARDED, checkpoint.BEST)]
    run.log.summary(saved, run.iter_num, run.iter_num * run.tokens_per_iter)
    check_writes(run.log, run.d)
    run.log.close()
    return run.best_val_loss


@dataclass
class Run:
    """What the loop works with: built by `setup`; iter_num and best_val_loss move as it runs."""

    cfg: TrainConfig
    d: distributed.Dist
    device: str
    dtype: str
    raw_model: GPT  # the model of model.py, for its settings and FLOP counts
    model: torch.nn.Module  # what the loop calls: compiled, DDP- or FSDP-wrapped
    model_args: dict
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    samplers: dict  # "train", "val", "eval_train" (the eval's train-split batches) -> WindowSampler
    dataset: object
    log: RunLog
    guard: DivergenceGuard
    accum: int  # micro-steps per optimizer step on this rank
    tokens_per_iter: int
    peak: float | None  # FLOP/s that MFU is measured against (rank 0)
    iter_num: int
    best_val_loss: float
    start_iter: int
    # At start_iter a new run evaluates without saving, and so does an evaluation only. A resumed
    # run skips the evaluation its checkpoint was saved right after, but a stop signal saves
    # between evaluations: then the one due at that iteration is done now, and saved (redo_eval).
    eval_at_start: bool
    redo_eval: bool
    hellaswag: tuple | None = None  # (tokenizer, examples) with hellaswag_file
    t_last: float = 0.0  # when the pace was last measured
    t_saved: float = 0.0  # when the resume checkpoint was last saved (or the run started)
    minutes_up: bool = False  # checkpoint_minutes have passed on some rank (set by train_step)
    iters_since_log: int = 0
    pending: tuple | None = None  # (flags, iter_num) of the last step, until `settle` reads them

    def next_batch(self, it, micro):
        # Global micro-batch number: ranks take consecutive slices of each step's batches.
        return self.samplers["train"].batch((it * self.d.world_size + self.d.rank) * self.accum + micro)


def setup(cfg, d, device):
    """Check everything that can be wrong before any compute, then build data, model, optimizer
    and log, and load the checkpoint of a resumed run."""
    dtype = hardware.resolve_dtype(cfg.dtype, device)
    accum = distributed.local_accumulation(cfg.gradient_accumulation_steps, d)
    global_accum = accum * d.world_size  # micro-batches per optimizer step over all ranks
    model_args = cfg.model_args()
    start = outdir.decide_start(asdict(cfg))
    resume = Resume(cfg.out_dir, model_args, cfg.fsdp) if start == "resume" else None
    if resume is not None and cfg.init_from == "auto" and resume.iter_num >= cfg.max_iters and not cfg.eval_only:
        if d.master:
            print(f"{cfg.out_dir} holds this run, finished at iteration {resume.iter_num}: nothing to do "
                  f"(raise --max_iters to train on)")  # fmt: skip
        return None

    distributed.check_shared(cfg.out_dir, d, "out_dir")
    try:
        data_path = ensure_dataset(cfg, d)
        distributed.check_shared(data_path, d, "dataset")
        dataset = open_dataset(data_path)
    except OSError as e:
        raise TokenFileError(f"dataset {cfg.dataset}: {e}") from None
    model_args["vocab_size"] = dataset.meta.get("vocab_size", 50304)
    hellaswag_set = None
    if cfg.hellaswag_file:  # read now: a bad file stops the run before any compute
        hellaswag_set = (load_tokenizer(dataset.meta), hellaswag.read_examples(cfg.hellaswag_file))
    if resume is not None:
        model_args = resume.model_args
    pretrained = None
    if start == "new" and cfg.init_from not in ("auto", "scratch"):
        # Finetuning: GPT-2's architecture and weights, with this config's block_size and dropout.
        pretrained = from_pretrained(cfg.init_from, cfg.block_size, cfg.dropout)
        model_args = asdict(pretrained.config)
        check_pretrained_vocab(cfg, dataset.meta, model_args["vocab_size"])
    try:
        dataset.check_vocab(model_args["vocab_size"])
        shape = (model_args["block_size"], cfg.batch_size)
        samplers = {
            name: WindowSampler(dataset.splits[split], *shape, cfg.seed, stream, device, dataset.fingerprint)
            for name, split, stream in (("train", "train", TRAIN_STREAM), ("val", "val", VAL_STREAM),
                                        ("eval_train", "train", TRAIN_EVAL_STREAM))
        }  # fmt: skip
        if resume is not None and not resume.nanogpt:
            samplers["train"].check_state(resume.loader, resume.iter_num * global_accum)
    except (TokenFileError, LoaderStateError, WindowError) as e:
        raise type(e)(f"dataset {cfg.dataset}: {e}") from None
    if d.master:
        checkpoint.remove_stale_temps(cfg.out_dir)
        if start == "new" and cfg.overwrite:
            outdir.clear_previous(cfg.out_dir)

    if device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank, which FSDP relies on
    raw_model = (pretrained if pretrained is not None else GPT(GPTConfig(**model_args))).to(device)
    torch.manual_seed(cfg.seed + d.rank)  # then each rank its own dropout masks
    model = parallelize(raw_model, d, device, cfg.fsdp, cfg.activation_checkpointing, cfg.compile, dtype)
    optimizer = make_optimizer(model, cfg, device)
    scaler = torch.amp.GradScaler(device.split(":")[0], enabled=dtype == "float16")
    iter_num, best_val_loss = 0, float("inf")
    if resume is not None:
        resume.restore(model, optimizer, scaler)
        iter_num, best_val_loss = resume.iter_num, resume.best_val_loss

    log = RunLog(cfg.out_dir, d.master, iter_num, cfg.max_iters, resumed=resume is not None, config=asdict(cfg),
                 start_row={"resumed": resume is not None, "job": outdir.job_id(),
                            "restart": os.environ.get("TORCHELASTIC_RESTART_COUNT")})  # fmt: skip
    if d.master:
        log.print("config: " + " ".join(f"{k}={v}" for k, v in asdict(cfg).items()))
        log.print(f"device {device}, dtype {dtype}, {d.world_size} process(es), "
                  f"{raw_model.num_params() / 1e6:.2f}M parameters")  # fmt: skip
        if global_accum != cfg.gradient_accumulation_steps:
            log.print(f"note: gradient_accumulation_steps={cfg.gradient_accumulation_steps} is fewer than the "
                      f"{d.world_size} processes: each does one micro-batch, {global_accum} per step")  # fmt: skip
        if resume is not None:
            log.print(f"resumed from {resume.path} at iteration {iter_num}")
            for note in resume.notes:
                log.print(f"note: {note}")
            if resume.dtype not in (None, dtype):
                scaler_note = "; a fresh float16 grad scaler" if dtype == "float16" else ""
                log.print(f"note: the checkpoint was trained in {resume.dtype}, this run is {dtype}{scaler_note}")
        # sample.py decodes with the run's own copy
        log.guarded(os.path.join(cfg.out_dir, META), lambda: write_meta(cfg.out_dir, dataset.meta))
    check_writes(log, d)
    peak = hardware.peak_flops(device, dtype) if d.master else None  # on the CPU, maybe a timed matmul
    if resume is not None:
        resume.restore_rng(d, device)  # last, so that nothing above draws from the restored streams
    redo_eval = resume is not None and not cfg.eval_only and not resume.evaluated
    return Run(
        cfg=cfg, d=d, device=device, dtype=dtype, raw_model=raw_model, model=model, model_args=model_args,
        optimizer=optimizer, scaler=scaler, samplers=samplers, dataset=dataset, log=log,
        guard=DivergenceGuard(cfg.max_nonfinite_steps, resume.nonfinite_in_a_row if resume else 0), accum=accum,
        tokens_per_iter=global_accum * cfg.batch_size * model_args["block_size"],
        peak=peak,
        iter_num=iter_num, best_val_loss=best_val_loss, start_iter=iter_num,
        eval_at_start=resume is None or cfg.eval_only or redo_eval, redo_eval=redo_eval,
        hellaswag=hellaswag_set, t_last=time.time(), t_saved=time.time(),
    )  # fmt: skip


def ensure_dataset(cfg, d):
    """Prepare a known dataset that is missing (rank 0 only), and return its directory."""
    path = os.path.join(cfg.data_dir, cfg.dataset)
    if is_dataset(path):  # also a folder that nanoGPT prepared
        return path
    if cfg.dataset != "shakespeare_char":
        raise TokenFileError(f"dataset {cfg.dataset!r} not found in {path}; run its script in prepare/ first")
    if d.master:
        from gptcraft.data.sources import SourceError
        from gptcraft.prepare import shakespeare_char

        try:
            shakespeare_char.prepare(path)
        except SourceError as e:
            raise SourceError(
                f"dataset shakespeare_char is not prepared and {e.problem}; offline, run "
                f"python prepare/shakespeare_char.py --input PATH/TO/tinyshakespeare.txt --out_dir {path}"
            ) from None
    distributed.barrier(d)
    return path


def check_pretrained_vocab(cfg, meta, vocab_size):
    """The dataset's token ids must mean to the pretrained model what they meant to its training."""
    if hub_name(cfg.init_from) is not None and meta.get("tokenizer") != "gpt2":
        raise ConfigError(f"init_from={cfg.init_from} needs a dataset tokenized with GPT-2 BPE; {cfg.dataset} "
                          f"uses {meta.get('tokenizer')!r}")  # fmt: skip
    if meta.get("vocab_size", 0) > vocab_size:
        raise ConfigError(f"dataset {cfg.dataset} has {meta['vocab_size']} token ids, more than the "
                          f"{vocab_size} of {cfg.init_from}")  # fmt: skip


def check_writes(log, d, failed=None):
    """Collective: stop every rank together, with rank 0's one line, once rank 0 could not write
    into out_dir (log.failure). failed: the flag, already reduced over the ranks."""
    if failed is None:
        failed = distributed.any_rank(torch.tensor([log.failure is not None]), d)[0]
    if failed:
        log.close()
        raise log.failure or TrackingError("rank 0 could not write into out_dir")


def evaluate_and_save(run):
    """Estimate train and val loss (and the whole val split at the end, with full_val), log them,
    and save when the run has moved since its start; returns whether it saved."""
    cfg = run.cfg
    eval_samplers = {"train": run.samplers["eval_train"], "val": run.samplers["val"]}
    losses = estimate_loss(run.model, eval_samplers, cfg, run.device, run.dtype, run.d)
    row = {"iter": run.iter_num, "train_loss": losses["train"], "val_loss": losses["val"],
           "tokens_seen": run.iter_num * run.tokens_per_iter}  # fmt: skip
    if cfg.full_val and (run.iter_num == cfg.max_iters or cfg.eval_only):
        val_data = [f.memmap() for f in run.dataset.splits["val"]]
        row["full_val_loss"] = full_split_loss(run.model, val_data, run.model_args["block_size"], cfg.batch_size,
                                               run.device, run.dtype, run.d)  # fmt: skip
    if run.hellaswag is not None:
        scores = hellaswag.score(run.model, *run.hellaswag, run.model_args["block_size"], run.device, run.dtype,
                                 run.d, cfg.batch_size)  # fmt: skip
        row.update(
            hellaswag_acc=scores["acc"],
            hellaswag_acc_norm=scores["acc_norm"],
            hellaswag_acc_norm_tokens=scores["acc_norm_tokens"],
        )
    run.log.record(row)
    if "full_val_loss" in row:
        run.log.print(f"full val loss {row['full_val_loss']:.4f} (every val token)")
    if run.hellaswag is not None:
        run.log.print(
            f"hellaswag acc {row['hellaswag_acc']:.4f}, acc_norm {row['hellaswag_acc_norm']:.4f}, "
            f"acc_norm_tokens {row['hellaswag_acc_norm_tokens']:.4f}"
        )
    improved = losses["val"] < run.best_val_loss
    run.best_val_loss = min(run.best_val_loss, losses["val"])
    saving = (run.iter_num > run.start_iter or run.redo_eval) and (improved or cfg.always_save_checkpoint)
    if saving:
        save(run, new_best=improved)
    run.t_last, run.iters_since_log = time.time(), 0  # evaluation time is not training time
    return saving


def checkpoint_due(run):
    """Whether checkpoint_interval or checkpoint_minutes ask for a save at this iteration."""
    cfg = run.cfg
    if run.iter_num == run.start_iter:
        return False
    return bool(cfg.checkpoint_interval and run.iter_num % cfg.checkpoint_interval == 0) or run.minutes_up


@torch.no_grad()
def estimate_loss(model, samplers, cfg, device, dtype, d):
    """Mean loss over eval_iters fixed batches per split, shared out across ranks."""
    model.eval()
    out = {}
    for split, sampler in samplers.items():
        losses = []  # kept on the device: one host sync per split, not one per batch
        for j, counted in distributed.even_share(cfg.eval_iters, d):
            x, y = sampler.batch(j)
            with hardware.autocast(device, dtype):
                _, loss = model(x, y)
            if counted:
                losses.append(loss.detach())
        local = sum(torch.stack(losses).tolist()) if losses else 0.0
        total = distributed.all_mean(local, d) * d.world_size
        out[split] = total / cfg.eval_iters
    model.train()
    return out


def save(run, new_best=False, evaluated=True):
    """Collective. Write the resume checkpoint, and best.pt when `new_best`; never weights that are
    no longer finite. evaluated: saved right after the evaluation at iter_num."""
    cfg, d = run.cfg, run.d
    if distributed.any_rank(torch.tensor([not weights_finite(run.model)]), d)[0]:
        run.log.print(f"checkpoint not saved at iter {run.iter_num}: the weights are not finite")
        return
    drawn = run.iter_num * run.accum * d.world_size  # global micro-batches so far
    progress = {"iter_num": run.iter_num, "best_val_loss": run.best_val_loss, "config": asdict(cfg),
                "loader": run.samplers["train"].state(drawn), "evaluated": evaluated,
                "nonfinite_in_a_row": run.guard.in_a_row}  # fmt: skip
    # best.pt first: a run killed between the two saves redoes these steps and writes it again.
    if new_best:
        state.save_best(cfg.out_dir, run.model, run.model_args, progress, d)
    state.save_latest(cfg.out_dir, run.model, run.optimizer, run.scaler, run.model_args, progress, d, run.device,
                      cfg.fsdp)  # fmt: skip
    run.t_saved, run.minutes_up = time.time(), False
    saved = checkpoint.SHARDED if cfg.fsdp else checkpoint.LATEST
    run.log.print(
        f"saved {saved}{' and ' + checkpoint.BEST if new_best else ''} in {cfg.out_dir} at iter {run.iter_num}"
    )


def train_step(run, x, y, stop):
    """One optimizer step over this rank's micro-batches, starting with (x, y); returns the first
    batch of the next step and whether every rank is to stop now.

    No host sync for the step's NaN and stop flags: they are reduced over ranks on the device,
    a NaN step's update is masked there (fused AdamW's found_inf), and the host reads them one
    step later, after the next step is launched (`settle`). Every rank reads the same reduced
    flags, so all stop at the same step."""
    lr = learning_rate(run.cfg, run.iter_num)
    set_learning_rate(run.optimizer, lr)
    step_loss = torch.zeros((), device=run.device)  # summed on the device: no host sync per micro-step
    for micro in range(run.accum):
        # Only the last micro-step reduces gradients across ranks.
        with grad_sync(run.model, micro == run.accum - 1):
            with hardware.autocast(run.device, run.dtype):
                _, loss = run.model(x, y)
                loss = loss / run.accum  # the step's gradient is the mean over its micro-batches
            step_loss += loss.detach()
            if micro == run.accum - 1:
                x, y = run.next_batch(run.iter_num + 1, 0)  # fetch while the device still works
            else:
                x, y = run.next_batch(run.iter_num, micro + 1)
            run.scaler.scale(loss).backward()
    run.scaler.unscale_(run.optimizer)  # true gradients, for the norm and clipping (no-op without fp16)
    grad_norm = clip_grad_norm(run.model, run.cfg.grad_clip)
    # The norm is global (DDP reduced the gradients, FSDP's norm spans the shards): any rank's
    # NaN shows in it. skip: leave the weights alone; bad: counts towards the divergence guard.
    skip = ~torch.isfinite(step_loss) | ~torch.isfinite(grad_norm)
    bad = nonfinite(step_loss, grad_norm, run.scaler.is_enabled())
    stop_here = torch.full_like(bad, stop.requested is not None)  # a fill: no copy that waits
    log_failed = torch.full_like(bad, run.log.failure is not None)
    minutes = run.cfg.checkpoint_minutes
    minutes_up = torch.full_like(bad, bool(minutes) and time.time() - run.t_saved >= 60 * minutes)
    flags = distributed.any_rank_on_device(torch.stack([skip, bad, stop_here, log_failed, minutes_up]), run.d)
    if getattr(run.optimizer, "_step_supports_amp_scaling", False):
        run.optimizer.found_inf = flags[0].to(grad_norm.device)  # the fused kernel skips when it is 1
        run.optimizer.step()
        del run.optimizer.found_inf
    elif not flags[0].item():  # an optimizer that cannot mask its update (Muon): read the flag now
        run.optimizer.step()
    run.scaler.update()  # fp16: lowers the scale after an overflow, as scaler.step would have
    run.optimizer.zero_grad(set_to_none=True)
    run.iter_num += 1
    run.iters_since_log += 1
    run.log.step()
    stopping = settle(run)  # the previous step's flags: this step is already queued behind them
    run.pending = (flags, run.iter_num)
    if run.iter_num % run.cfg.log_interval == 0:
        log_step(run, step_loss, grad_norm, lr)
    return x, y, stopping


def settle(run):
    """Read the flags of the last step not yet read: report a skipped step, count it for the
    divergence guard; returns whether every rank is to stop."""
    if run.pending is None:
        return False
    flags, iter_num = run.pending
    run.pending = None
    _, bad, stopping, log_failed, minutes_up = (bool(f) for f in flags.tolist())
    check_writes(run.log, run.d, log_failed)
    run.minutes_up = run.minutes_up or minutes_up
    if bad:
        run.log.print(f"skipped step {iter_num}: loss or gradient norm is NaN/Inf")
    run.guard.record(bad, iter_num)
    return stopping


def log_step(run, step_loss, grad_norm, lr):
    """Log the step's loss (averaged over ranks), pace, MFU and gradient norm. Reading the loss
    waits for the device: only at log steps."""
    train_loss = distributed.all_mean(step_loss.item(), run.d)
    dt = (time.time() - run.t_last) / run.iters_since_log
    tokens_per_s = run.tokens_per_iter / dt
    mfu = run.raw_model.estimate_mfu(tokens_per_s / run.d.world_size, run.peak) if run.peak else None
    run.log.record({"iter": run.iter_num, "loss": train_loss, "lr": lr, "ms_per_iter": 1000 * dt,
                    "tokens_per_s": tokens_per_s, "mfu": mfu, "grad_norm": grad_norm.item(),
                    "tokens_seen": run.iter_num * run.tokens_per_iter})  # fmt: skip
    run.t_last, run.iters_since_log = time.time(), 0


if __name__ == "__main__":
    run_cli(main)
