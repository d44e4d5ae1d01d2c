"""Train a GPT: one process on CPU or GPU, or many through torchrun (DDP).

python train.py configs/train_shakespeare_char_cpu.py --max_iters=500
torchrun --standalone --nproc_per_node=8 train.py configs/train_shakespeare_char.py
"""

import math
import os
import sys
import time
from dataclasses import asdict, dataclass

import torch

from gptcraft.config import ConfigError, option, parse_config, run_cli
from gptcraft.data.batches import TRAIN_STREAM, VAL_STREAM, WindowSampler
from gptcraft.data.shards import TokenFileError, is_dataset, open_dataset, write_meta
from gptcraft.evaluate.loss import full_split_loss
from gptcraft.hf import HUB_MODELS
from gptcraft.init_from import check_init_from, load_gpt2
from gptcraft.system import distributed, hardware
from gptcraft.track.runlog import RunLog, require_wandb
from gptcraft.train import checkpoint, state
from gptcraft.train.checkpoint import CheckpointError
from gptcraft.train.optimizer import OPTIMIZERS, make_optimizer
from gptcraft.train.parallelize import clip_grad_norm, grad_sync, parallelize
from gptcraft.train.state import Resume
from gptcraft.train.stops import DivergenceGuard, GracefulStop, TrainingDiverged, nonfinite, weights_finite
from model import ACTIVATIONS, ATTENTION_IMPLS, GPT, POS_EMBEDDINGS, GPTConfig

MODEL_KEYS = ("n_layer", "n_head", "n_embd", "block_size", "bias", "dropout", "pos_embedding", "attention",
              "qk_norm", "activation", "tie_embeddings", "zero_init_proj", "logit_softcap")  # fmt: skip


@dataclass
class TrainConfig:
    # I/O
    out_dir: str = option("out", "directory for ckpt.pt, log.jsonl and meta.json")
    eval_interval: int = option(2000, "evaluate train and val loss every this many iterations")
    log_interval: int = option(1, "print and log the training loss every this many iterations")
    eval_iters: int = option(200, "batches per split in each evaluation")
    eval_only: bool = option(False, "evaluate once and exit")
    full_val: bool = option(False, "at the last iteration also score the whole val split (log.jsonl: full_val_loss)")
    always_save_checkpoint: bool = option(True, "save at every eval, not only when val loss improves")
    init_from: str = option("scratch", "scratch: a new model; resume: continue from out_dir/ckpt.pt; gpt2, gpt2-medium,"
                            " gpt2-large, gpt2-xl or a Hugging Face GPT-2 folder: finetune those weights")  # fmt: skip
    seed: int = option(1337, "seed for initialisation, data order and dropout")
    # data
    dataset: str = option("openwebtext", "dataset name: token files are read from data_dir/dataset/")
    data_dir: str = option("data", "directory that holds the prepared datasets")
    gradient_accumulation_steps: int = option(40, "micro-batches per optimizer step, over all ranks together")
    batch_size: int = option(12, "sequences per micro-batch on each rank")
    block_size: int = option(1024, "context length in tokens")
    # model
    n_layer: int = option(12, "transformer blocks")
    n_head: int = option(12, "attention heads per block")
    n_embd: int = option(768, "width of the residual stream")
    dropout: float = option(0.0, "dropout probability (0 for pretraining, 0.1+ for finetuning)")
    bias: bool = option(False, "biases in Linear and LayerNorm layers")
    pos_embedding: str = option("learned", "position encoding", POS_EMBEDDINGS)
    attention: str = option("sdpa", "sdpa: fused kernels; explicit: the written-out equation", ATTENTION_IMPLS)
    qk_norm: bool = option(False, "RMS-normalise queries and keys per head")
    activation: str = option("gelu", "MLP non-linearity: gelu (GPT-2) or relu2 (relu(x)^2)", ACTIVATIONS)
    tie_embeddings: bool = option(True, "lm_head shares the token embedding's weight (False: a separate head)")
    zero_init_proj: bool = option(False, "initialise the blocks' output projections to zero")
    logit_softcap: float = option(0.0, "cap the logits smoothly at +-this value with tanh; 0 disables")
    # optimizer
    optimizer: str = option("adamw", "adamw; or muon: Muon for hidden matrices, AdamW for the rest", OPTIMIZERS)
    muon_lr: float = option(0.02, "peak learning rate of Muon's matrices (follows the same schedule)")
    muon_momentum: float = option(0.95, "Muon's momentum")
    learning_rate: float = option(6e-4, "peak learning rate")
    max_iters: int = option(600000, "optimizer steps in all")
    weight_decay: float = option(0.1, "AdamW weight decay, applied to matrices only")
    beta1: float = option(0.9, "AdamW beta1")
    beta2: float = option(0.95, "AdamW beta2")
    grad_clip: float = option(1.0, "clip the gradient norm to this value; 0 disables")
    # learning-rate schedule
    decay_lr: bool = option(True, "cosine decay after warmup; False keeps learning_rate constant")
    warmup_iters: int = option(2000, "linear warmup steps")
    lr_decay_iters: int = option(600000, "step at which the cosine reaches min_lr (about max_iters)")
    min_lr: float = option(6e-5, "floor of the schedule (about learning_rate / 10)")
    warmdown_iters: int = option(0, "> 0: instead of the cosine, hold learning_rate, then decay linearly to "
                                    "min_lr over the last warmdown_iters steps before max_iters")  # fmt: skip
    # system
    backend: str = option("auto", "torch.distributed backend: auto (nccl on CUDA, gloo on CPU), nccl, gloo",
                          ("auto", "nccl", "gloo"))  # fmt: skip
    device: str = hardware.device_option()
    dtype: str = hardware.dtype_option()
    compile: bool = option(True, "torch.compile the model (pays off on GPUs, not on small CPU runs)")
    fsdp: bool = option(False, "shard parameters, gradients and optimizer state across ranks (FSDP2) instead of DDP")
    activation_checkpointing: bool = option(False, "recompute each block's activations in backward to save memory")
    max_nonfinite_steps: int = option(10, "stop after this many steps in a row with a NaN/Inf loss or gradient norm")
    # tracking
    wandb_log: bool = option(False, 'log to Weights & Biases (install: pip install -e ".[wandb]")')
    wandb_project: str = option("gptcraft", "Weights & Biases project")
    wandb_run_name: str = option("", "Weights & Biases run name; empty: the name of out_dir")
    plot_loss: bool = option(False, "redraw out_dir/loss.png after every evaluation")

    def __post_init__(self):
        check_init_from(self.init_from, ("scratch", "resume"))
        positive = ("eval_interval", "log_interval", "eval_iters", "gradient_accumulation_steps", "batch_size",
                    "block_size", "n_layer", "n_head", "n_embd", "lr_decay_iters", "max_nonfinite_steps")  # fmt: skip
        for key in positive:
            if getattr(self, key) <= 0:
                raise ConfigError(f"{key} must be positive, got {getattr(self, key)}")
        for key in ("max_iters", "warmup_iters", "weight_decay", "grad_clip", "min_lr", "warmdown_iters"):
            if getattr(self, key) < 0:
                raise ConfigError(f"{key} must not be negative, got {getattr(self, key)}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.n_embd % self.n_head:
            raise ConfigError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        for key in ("learning_rate", "muon_lr"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"{key} must be positive, got {getattr(self, key)}")
        if self.logit_softcap < 0:
            raise ConfigError(f"logit_softcap must be >= 0 (0 disables it), got {self.logit_softcap}")
        if self.pos_embedding == "rope" and (self.n_embd // self.n_head) % 2:
            raise ConfigError(f"rope needs an even head size; n_embd / n_head is {self.n_embd // self.n_head}")
        if self.min_lr > self.learning_rate:
            raise ConfigError(f"min_lr ({self.min_lr}) must not exceed learning_rate ({self.learning_rate})")
        if self.wandb_log:
            require_wandb()


def learning_rate(cfg, it):
    """Linear warmup to learning_rate, then cosine decay to min_lr at lr_decay_iters, or with
    warmdown_iters a constant rate and a linear decay to min_lr at max_iters."""
    if not cfg.decay_lr:
        return cfg.learning_rate
    if it < cfg.warmup_iters:
        return cfg.learning_rate * (it + 1) / (cfg.warmup_iters + 1)
    if cfg.warmdown_iters:
        left = (cfg.max_iters - it) / cfg.warmdown_iters  # 1 where the warmdown starts, 0 at the end
        return cfg.min_lr + min(1.0, left) * (cfg.learning_rate - cfg.min_lr)
    if it >= cfg.lr_decay_iters:
        return cfg.min_lr
    progress = (it - cfg.warmup_iters) / max(1, cfg.lr_decay_iters - cfg.warmup_iters)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.learning_rate - cfg.min_lr)


def ensure_dataset(cfg, d):
    """Prepare a known dataset that is missing (rank 0 only), and return its directory."""
    path = os.path.join(cfg.data_dir, cfg.dataset)
    if is_dataset(path):  # also a folder that nanoGPT prepared
        return path
    if cfg.dataset != "shakespeare_char":
        raise ConfigError(f"dataset {cfg.dataset!r} not found in {path}; run its script in prepare/ first")
    if d.master:
        from gptcraft.data.sources import SourceError
        from gptcraft.prepare import shakespeare_char

        try:
            shakespeare_char.prepare(path)
        except SourceError as e:
            raise ConfigError(
                f"dataset shakespeare_char is not prepared and {e.problem}; offline, run "
                f"python prepare/shakespeare_char.py --input PATH/TO/tinyshakespeare.txt --out_dir {path}"
            ) from None
    if d.enabled:
        torch.distributed.barrier()
    return path


def check_pretrained_vocab(cfg, meta, vocab_size):
    """The dataset's token ids must mean to the pretrained model what they meant to its training."""
    if cfg.init_from in HUB_MODELS and meta.get("tokenizer") != "gpt2":
        raise ConfigError(f"init_from={cfg.init_from} needs a dataset tokenized with GPT-2 BPE; {cfg.dataset} "
                          f"uses {meta.get('tokenizer')!r}")  # fmt: skip
    if meta.get("vocab_size", 0) > vocab_size:
        raise ConfigError(f"dataset {cfg.dataset} has {meta['vocab_size']} token ids, more than the "
                          f"{vocab_size} of {cfg.init_from}")  # fmt: skip


def check_out_dir(out_dir):
    try:
        os.makedirs(out_dir, exist_ok=True)
        probe = os.path.join(out_dir, f".write_test.{os.getpid()}")
        open(probe, "w").close()
        os.remove(probe)
    except OSError as e:
        raise ConfigError(f"out_dir {out_dir} is not writable ({e.strerror}); choose another --out_dir") from None


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


def main(argv=None):
    cfg = parse_config(TrainConfig, sys.argv[1:] if argv is None else argv, prog="train.py")
    device = hardware.resolve_device(cfg.device)
    d, device = distributed.init(device, cfg.backend)
    try:
        with GracefulStop() as stop:
            best_val_loss = train(cfg, d, device, stop)
        # Tearing the process group down while another rank still uses it aborts the process.
        distributed.barrier(d)
        return best_val_loss
    except (TrainingDiverged, CheckpointError) as e:
        sys.exit(f"error: {e}")
    finally:
        distributed.shutdown()


def train(cfg, d, device, stop):
    dtype = hardware.resolve_dtype(cfg.dtype, device)
    accum = distributed.local_accumulation(cfg.gradient_accumulation_steps, d)  # micro-steps on this rank
    if d.master:
        check_out_dir(cfg.out_dir)
    model_args = {k: getattr(cfg, k) for k in MODEL_KEYS}
    resume = Resume(cfg.out_dir, model_args) if cfg.init_from == "resume" else None

    data_path = ensure_dataset(cfg, d)
    try:
        dataset = open_dataset(data_path)
    except (OSError, TokenFileError) as e:
        raise ConfigError(str(e)) from None
    meta = dataset.meta

    model_args["vocab_size"] = meta.get("vocab_size", 50304)
    if resume is not None:
        model_args = resume.model_args
    pretrained = None
    if cfg.init_from not in ("scratch", "resume"):
        # Finetuning: GPT-2's architecture and weights, with this config's block_size and dropout.
        pretrained = load_gpt2(cfg.init_from, cfg.block_size, cfg.dropout)
        model_args = asdict(pretrained.config)
        check_pretrained_vocab(cfg, meta, model_args["vocab_size"])
    try:
        dataset.check_vocab(model_args["vocab_size"])
        shape = (model_args["block_size"], cfg.batch_size)
        samplers = {
            split: WindowSampler(dataset.splits[split], *shape, cfg.seed, stream, device, dataset.fingerprint)
            for split, stream in (("train", TRAIN_STREAM), ("val", VAL_STREAM))
        }
        if resume is not None and not resume.nanogpt:
            drawn = resume.iter_num * cfg.gradient_accumulation_steps  # global micro-batches so far
            samplers["train"].check_state(resume.loader, drawn)
    except ValueError as e:  # TokenFileError, LoaderStateError
        raise ConfigError(f"dataset {cfg.dataset}: {e}") from None
    if d.master:
        checkpoint.remove_stale_temps(cfg.out_dir)

    if device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank, which FSDP relies on
    raw_model = (pretrained if pretrained is not None else GPT(GPTConfig(**model_args))).to(device)
    torch.manual_seed(cfg.seed + d.rank)  # then each rank its own dropout masks
    model = parallelize(raw_model, d, device, cfg.fsdp, cfg.activation_checkpointing, cfg.compile)
    optimizer = make_optimizer(model, cfg, device)
    scaler = torch.amp.GradScaler(device.split(":")[0], enabled=dtype == "float16")
    iter_num, best_val_loss = 0, float("inf")
    if resume is not None:
        resume.restore(model, optimizer, scaler)
        iter_num, best_val_loss = resume.iter_num, resume.best_val_loss
    start_iter = iter_num

    log = RunLog(cfg.out_dir, d.master, start_iter, cfg.max_iters, resumed=resume is not None,
                 config=asdict(cfg))  # fmt: skip
    if d.master:
        log.print("config: " + " ".join(f"{k}={v}" for k, v in asdict(cfg).items()))
        log.print(f"device {device}, dtype {dtype}, {d.world_size} process(es), "
                  f"{raw_model.num_params() / 1e6:.2f}M parameters")  # fmt: skip
        if resume is not None:
            log.print(f"resumed from {resume.path} at iteration {iter_num}")
            for note in resume.notes:
                log.print(f"note: {note}")
        write_meta(cfg.out_dir, meta)  # sample.py decodes with the run's own copy
    tokens_per_iter = cfg.gradient_accumulation_steps * cfg.batch_size * model_args["block_size"]
    peak = hardware.peak_flops(device, dtype) if d.master else None
    guard = DivergenceGuard(cfg.max_nonfinite_steps)
    if resume is not None:
        resume.restore_rng(d, device)  # last, so that nothing above draws from the restored streams
    # At start_iter a new run evaluates without saving, and so does an evaluation only. A resumed
    # run skips the evaluation its checkpoint was saved right after, but a stop signal saves
    # between evaluations: then the one due at that iteration is done now, and saved.
    redo_eval = resume is not None and not cfg.eval_only and not resume.evaluated
    eval_at_start = resume is None or cfg.eval_only or redo_eval

    def save(iter_num, best_val_loss, new_best=False, evaluated=True):
        """Collective. Write the resume checkpoint, and best.pt when `new_best`; never weights
        that are no longer finite. evaluated: saved right after the evaluation at iter_num."""
        if distributed.any_rank(torch.tensor([not weights_finite(model)]), d)[0]:
            log.print(f"checkpoint not saved at iter {iter_num}: the weights are not finite")
            return
        progress = {"iter_num": iter_num, "best_val_loss": best_val_loss, "config": asdict(cfg),
                    "loader": samplers["train"].state(iter_num * cfg.gradient_accumulation_steps),
                    "evaluated": evaluated}  # fmt: skip
        # best.pt first: a run killed between the two saves redoes these steps and writes it again.
        if new_best:
            state.save_best(cfg.out_dir, model, model_args, progress, d)
        state.save_latest(cfg.out_dir, model, optimizer, scaler, model_args, progress, d, device, cfg.fsdp)
        saved = checkpoint.SHARDED if cfg.fsdp else checkpoint.LATEST
        log.print(f"saved {saved}{' and ' + checkpoint.BEST if new_best else ''} in {cfg.out_dir} at iter {iter_num}")

    def next_batch(it, micro):
        # Global micro-batch number: ranks take consecutive slices of each step's batches.
        return samplers["train"].batch((it * d.world_size + d.rank) * accum + micro)

    x, y = next_batch(iter_num, 0)
    t_last, iters_since_log = time.time(), 0
    while True:
        due = iter_num % cfg.eval_interval == 0 or iter_num == cfg.max_iters or cfg.eval_only
        if due and (iter_num > start_iter or eval_at_start):
            losses = estimate_loss(model, samplers, cfg, device, dtype, d)
            row = {"iter": iter_num, "train_loss": losses["train"], "val_loss": losses["val"],
                   "tokens_seen": iter_num * tokens_per_iter}  # fmt: skip
            if cfg.full_val and (iter_num == cfg.max_iters or cfg.eval_only):
                val_data = [f.memmap() for f in dataset.splits["val"]]
                row["full_val_loss"] = full_split_loss(model, val_data, model_args["block_size"],
                                                       cfg.batch_size, device, dtype, d)  # fmt: skip
            log.record(row)
            if "full_val_loss" in row:
                log.print(f"full val loss {row['full_val_loss']:.4f} (every val token)")
            improved = losses["val"] < best_val_loss
            best_val_loss = min(best_val_loss, losses["val"])
            if (iter_num > start_iter or redo_eval) and (improved or cfg.always_save_checkpoint):
                save(iter_num, best_val_loss, new_best=improved)
            t_last, iters_since_log = time.time(), 0  # evaluation time is not training time
        if cfg.eval_only or iter_num >= cfg.max_iters:
            break

        lr = learning_rate(cfg, iter_num)
        for group in optimizer.param_groups:
            group["lr"] = lr * group["lr_scale"]
        step_loss = torch.zeros((), device=device)  # summed on the device: no host sync per micro-step
        for micro in range(accum):
            # Only the last micro-step reduces gradients across ranks.
            with grad_sync(model, micro == accum - 1):
                with hardware.autocast(device, dtype):
                    _, loss = model(x, y)
                    loss = loss / accum
                step_loss += loss.detach()
                if micro == accum - 1:
                    x, y = next_batch(iter_num + 1, 0)  # fetch while the device still works
                else:
                    x, y = next_batch(iter_num, micro + 1)
                scaler.scale(loss).backward()
        scaler.unscale_(optimizer)  # true gradients, for the norm and clipping (no-op without fp16)
        grad_norm = clip_grad_norm(model, cfg.grad_clip)
        # One host sync per step: every rank learns whether any rank diverged or was told to stop.
        bad = nonfinite(step_loss, grad_norm, scaler.is_enabled())
        stop_here = torch.full_like(bad, stop.requested is not None)  # a fill: no copy that waits
        skip, stopping = distributed.any_rank(torch.stack([bad, stop_here]), d)
        if not skip:
            scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        iter_num += 1
        iters_since_log += 1
        log.step()
        if skip:
            log.print(f"skipped step {iter_num}: loss or gradient norm is NaN/Inf")
        guard.record(skip, iter_num)

        if iter_num % cfg.log_interval == 0:
            # Reading the loss waits for the device: only at log steps.
            train_loss = distributed.all_mean(step_loss.item(), d)
            dt = (time.time() - t_last) / iters_since_log
            tokens_per_s = tokens_per_iter / dt
            mfu = raw_model.estimate_mfu(tokens_per_s / d.world_size, peak) if peak else None
            log.record({"iter": iter_num, "loss": train_loss, "lr": lr, "ms_per_iter": 1000 * dt,
                        "tokens_per_s": tokens_per_s, "mfu": mfu, "grad_norm": grad_norm.item(),
                        "tokens_seen": iter_num * tokens_per_iter})  # fmt: skip
            t_last, iters_since_log = time.time(), 0
        if stopping:
            save(iter_num, best_val_loss, evaluated=False)
            log.print(f"stopped by {stop.requested or 'a signal on another rank'} at iteration {iter_num}; "
                      f"continue with --init_from=resume --out_dir={cfg.out_dir}")  # fmt: skip
            break
    log.summary([os.path.join(cfg.out_dir, name) for name in (checkpoint.LATEST, checkpoint.SHARDED, checkpoint.BEST)])
    log.close()
    return best_val_loss


if __name__ == "__main__":
    run_cli(main)
