"""Everything a training run needs before its first step, checked before any compute: how it
starts in its out_dir, the data, the model (new, finetuned or resumed) and its parallel wrapping,
the optimizer, the log."""

import math
import os
from dataclasses import asdict, dataclass

import torch

from gptcraft.config import ConfigError
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
from gptcraft.hf import from_pretrained, hub_name
from gptcraft.model import GPT, GPTConfig
from gptcraft.runs import checkpoint, start
from gptcraft.runs.lock import job_id
from gptcraft.runs.resume import Resume
from gptcraft.system import distributed, hardware
from gptcraft.track.runlog import RunLog
from gptcraft.train import pace
from gptcraft.train.config import TrainConfig
from gptcraft.train.optimizer import make_optimizer
from gptcraft.train.parallelize import parallelize


@dataclass(frozen=True)
class Start:
    """Where the loop starts: a new run's defaults, or what a resumed run's checkpoint records.
    eval_at_start and redo_eval: whether the evaluation due at the first iteration is made, and
    saved (see Schedule)."""

    iter_num: int = 0
    best_val_loss: float = math.inf
    nonfinite_in_a_row: int = 0
    eval_at_start: bool = True
    redo_eval: bool = False


@dataclass
class Job:
    """What a run trains with, built once by `setup`: nothing here changes while it runs."""

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
    accum: int  # micro-steps per optimizer step on this rank
    first_batch: int  # global micro-batch number of iteration 0: nonzero where a resumed run draws more or
    # fewer micro-batches per step than its checkpoint's (gradient_accumulation_steps below the number of
    # processes, which changed), so that it goes on from the checkpoint's next batch
    tokens_per_iter: int
    peak: float | None  # FLOP/s that MFU is measured against (rank 0)
    forecast: pace.Forecast | None  # times at the CPU's peak (rank 0, on a CPU)
    hellaswag: tuple | None  # (tokenizer, examples) with hellaswag_file
    start: Start

    def next_batch(self, it, micro):
        # Global micro-batch number: ranks take consecutive slices of each step's batches.
        return self.samplers["train"].batch(
            self.first_batch + (it * self.d.world_size + self.d.rank) * self.accum + micro
        )

    def batches_drawn(self, it):
        """Global micro-batches drawn before iteration `it`."""
        return self.first_batch + it * self.d.world_size * self.accum

    def tokens_seen(self, it):
        return self.batches_drawn(it) * self.tokens_per_iter // (self.d.world_size * self.accum)


def setup(cfg, d, device):
    """Check everything that can be wrong before any compute, then build data, model, optimizer
    and log, and load the checkpoint of a resumed run; None when there is nothing to do."""
    dtype = hardware.resolve_dtype(cfg.dtype, device)
    accum = distributed.local_accumulation(cfg.gradient_accumulation_steps, d)
    global_accum = accum * d.world_size  # micro-batches per optimizer step over all ranks
    model_args = cfg.model_args()
    how = start.decide_start(asdict(cfg))
    resume = Resume(cfg.out_dir, model_args, cfg.fsdp) if how == "resume" else None
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
        tok, examples = load_tokenizer(dataset.meta), hellaswag.read_examples(cfg.hellaswag_file)
        hellaswag.check_encodable(examples, tok, cfg.hellaswag_file)
        hellaswag_set = (tok, examples)
    if resume is not None:
        model_args = resume.model_args
    pretrained = None
    if how == "new" and cfg.init_from not in ("auto", "scratch"):
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
        first_batch = 0
        if resume is not None and not resume.nanogpt:
            first_batch = samplers["train"].check_state(resume.loader) - resume.iter_num * global_accum
    except (TokenFileError, LoaderStateError, WindowError) as e:
        raise type(e)(f"dataset {cfg.dataset}: {e}") from None
    if d.master:
        checkpoint.clear_killed_saves(cfg.out_dir)
        if how == "new" and cfg.overwrite:
            start.clear_previous(cfg.out_dir)

    if device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank, which FSDP relies on
    raw_model = (pretrained if pretrained is not None else GPT(GPTConfig(**model_args))).to(device)
    torch.manual_seed(cfg.seed + d.rank)  # then each rank its own dropout masks
    compile_model = hardware.resolve_compile(cfg.compile, device)
    model = parallelize(raw_model, d, device, cfg.fsdp, cfg.activation_checkpointing, compile_model, dtype)
    optimizer = make_optimizer(model, cfg, device, d.world_size, d.rank)
    scaler = torch.amp.GradScaler(device.split(":")[0], enabled=dtype == "float16")
    begin = Start()
    if resume is not None:
        resume.restore(model, optimizer, scaler)
        redo_eval = not cfg.eval_only and not resume.evaluated
        begin = Start(resume.iter_num, resume.best_val_loss, resume.nonfinite_in_a_row,
                      eval_at_start=cfg.eval_only or redo_eval, redo_eval=redo_eval)  # fmt: skip

    log = RunLog(cfg.out_dir, d.master, begin.iter_num, cfg.max_iters, resumed=resume is not None,
                 config=asdict(cfg), start_row={"resumed": resume is not None, "job": job_id(),
                                                "restart": os.environ.get("TORCHELASTIC_RESTART_COUNT")})  # fmt: skip
    if d.master:
        log.print("config: " + " ".join(f"{k}={v}" for k, v in asdict(cfg).items()))
        log.print(f"device {device}, dtype {dtype}, {d.world_size} process(es), "
                  f"{raw_model.num_params() / 1e6:.2f}M parameters")  # fmt: skip
        if global_accum != cfg.gradient_accumulation_steps:
            log.print(f"note: gradient_accumulation_steps={cfg.gradient_accumulation_steps} is fewer than the "
                      f"{d.world_size} processes: each does one micro-batch, {global_accum} per step")  # fmt: skip
        if resume is not None:
            log.print(f"resumed from {resume.path} at iteration {begin.iter_num}")
            for note in resume.notes:
                log.print(f"note: {note}")
            if resume.dtype not in (None, dtype):
                scaler_note = "; a fresh float16 grad scaler" if dtype == "float16" else ""
                log.print(f"note: the checkpoint was trained in {resume.dtype}, this run is {dtype}{scaler_note}")
        # sample.py decodes with the run's own copy
        log.guarded(os.path.join(cfg.out_dir, META), lambda: write_meta(cfg.out_dir, dataset.meta))
    log.stop_on_failure(d)
    peak = hardware.peak_flops(device, dtype) if d.master else None  # on the CPU, maybe a timed matmul
    forecast = None
    if device == "cpu" and peak:  # a config sized for GPUs says so before its first evaluation
        forecast = pace.for_run(cfg, raw_model, accum, d.world_size, begin.iter_num, peak)
        if note := pace.start_note(forecast, cfg.max_iters):
            log.print(note)
    if resume is not None:
        resume.restore_rng(d, device)  # last, so that nothing above draws from the restored streams
    return Job(
        cfg=cfg, d=d, device=device, dtype=dtype, raw_model=raw_model, model=model, model_args=model_args,
        optimizer=optimizer, scaler=scaler, samplers=samplers, dataset=dataset, log=log, accum=accum,
        first_batch=first_batch, tokens_per_iter=global_accum * cfg.batch_size * model_args["block_size"], peak=peak,
        forecast=forecast,
        hellaswag=hellaswag_set, start=begin,
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
