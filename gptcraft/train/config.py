"""The training run's settings: every key train.py takes, its default, its help and its checks.

The model's keys are GPTConfig's own fields (all but vocab_size, which comes from the dataset),
taken from model.py with their help and choices: they are defined there once and checked there once.
"""

from dataclasses import dataclass, fields, make_dataclass

from gptcraft.config import check_ranges, check_seed, option, options_of, refuse
from gptcraft.load import check_init_from, device_option, dtype_option
from gptcraft.model import GPTConfig
from gptcraft.track.runlog import require_wandb
from gptcraft.train.optimizer import OPTIMIZERS

MODEL_KEYS = tuple(f.name for f in fields(GPTConfig) if f.name != "vocab_size")


@dataclass
class RunSettings:
    # I/O
    out_dir: str = option("out", "directory for ckpt.pt, log.jsonl and meta.json")
    eval_interval: int = option(2000, "evaluate train and val loss every this many iterations")
    log_interval: int = option(10, "print and log the training loss every this many iterations")
    eval_iters: int = option(200, "batches per split in each evaluation")
    eval_only: bool = option(False, "evaluate once and exit")
    full_val: bool = option(False, "at the last iteration also score the whole val split (log.jsonl: full_val_loss)")
    always_save_checkpoint: bool = option(True, "save at every eval, not only when val loss improves")
    init_from: str = option("auto", "auto: continue the run in out_dir if it is this one, else start a new one; "
                            "scratch: a new model; resume: continue from out_dir's checkpoint; gpt2, gpt2-medium, "
                            "gpt2-large, gpt2-xl (hub:gpt2, ...) or a Hugging Face GPT-2 folder (./gpt2): "
                            "finetune those weights")  # fmt: skip
    overwrite: bool = option(False, "a new run into an out_dir holding another run's checkpoint deletes its "
                             "checkpoints and log.jsonl (otherwise it stops with an error)")  # fmt: skip
    checkpoint_interval: int = option(0, "also save the resume checkpoint every this many iterations, without "
                                      "evaluating (0: only at evaluations)")  # fmt: skip
    checkpoint_minutes: float = option(0.0, "also save the resume checkpoint when this many minutes have passed "
                                       "since the last save (0: off)")  # fmt: skip
    seed: int = option(1337, "seed for initialisation, data order and dropout")
    # data
    dataset: str = option("openwebtext", "dataset name: token files are read from data_dir/dataset/")
    data_dir: str = option("data", "directory that holds the prepared datasets")
    gradient_accumulation_steps: int = option(40, "micro-batches per optimizer step over all ranks together (each "
                                              "rank does its share; at least one each)")  # fmt: skip
    batch_size: int = option(12, "sequences per micro-batch on each rank")


# Then the model's keys, GPTConfig's own. Its defaults are GPT-2's; a model trained from scratch
# here has no biases, as in nanoGPT.
ModelSettings = make_dataclass("ModelSettings", options_of(GPTConfig, MODEL_KEYS, bias=False), bases=(RunSettings,))


@dataclass
class TrainConfig(ModelSettings):
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
    min_lr: float | None = option(None, "floor of the schedule; auto: learning_rate / 10")
    warmdown_iters: int = option(0, "> 0: instead of the cosine, hold learning_rate, then decay linearly to "
                                    "min_lr over the last warmdown_iters steps before max_iters")  # fmt: skip
    # system
    backend: str = option("auto", "torch.distributed backend: auto (nccl on CUDA, gloo on CPU), nccl, gloo",
                          ("auto", "nccl", "gloo"))  # fmt: skip
    dist_timeout_s: int = option(1800, "seconds a rank waits for the others in a collective (rank 0 writing a "
                                 "large ckpt.pt takes long; torch's default is 600)")  # fmt: skip
    device: str = device_option()
    dtype: str = dtype_option()
    compile: bool | None = option(None, "torch.compile the model; auto: on CUDA only (on the CPU compiling "
                                  "took longer than it saved)")  # fmt: skip
    fsdp: bool = option(False, "shard parameters, gradients and optimizer state across ranks (FSDP2) instead of DDP")
    activation_checkpointing: bool = option(False, "recompute each block's activations in backward to save memory")
    max_nonfinite_steps: int = option(10, "stop after this many steps in a row with a NaN/Inf loss or gradient norm")
    # tracking
    wandb_log: bool = option(False, 'log to Weights & Biases (install: pip install -e ".[wandb]")')
    wandb_project: str = option("gptcraft", "Weights & Biases project")
    wandb_run_name: str = option("", "Weights & Biases run name; empty: the name of out_dir")
    plot_loss: bool = option(False, "redraw out_dir/loss.png after every evaluation")
    hellaswag_file: str = option("", "HellaSwag jsonl (hellaswag_val.jsonl) to score at every evaluation, logged "
                                 "as hellaswag_acc, hellaswag_acc_norm and hellaswag_acc_norm_tokens; "
                                 "empty: none")  # fmt: skip
    hellaswag_batch_size: int = option(8, "HellaSwag examples per forward pass (4 rows each), apart from batch_size: "
                                       "its rows are only as wide as the longest ending needs")  # fmt: skip

    def __post_init__(self):
        check_init_from(self.init_from, ("auto", "scratch", "resume"))
        if self.min_lr is None:  # follows a learning rate lowered for finetuning
            # A tenth, written as a person would (6e-4 gives 6e-5, not 5.9999999999999995e-05): a run
            # made with the value spelled out is the same run.
            self.min_lr = float(f"{self.learning_rate / 10:.12g}")
        problems = []
        try:
            GPTConfig(**self.model_args())  # the model's own checks, on this run's values
        except ValueError as e:
            problems.append(str(e))
        problems += check_ranges(
            self,
            positive=("eval_interval", "log_interval", "eval_iters", "gradient_accumulation_steps", "batch_size",
                      "lr_decay_iters", "max_nonfinite_steps", "learning_rate", "muon_lr", "dist_timeout_s",
                      "hellaswag_batch_size"),
            nonnegative=("max_iters", "checkpoint_interval", "checkpoint_minutes", "warmup_iters", "weight_decay",
                         "grad_clip", "min_lr", "warmdown_iters"),
            fraction=("beta1", "beta2", "muon_momentum"),
        )  # fmt: skip
        problems += check_seed(self.seed)
        if self.min_lr > self.learning_rate:
            problems.append(f"min_lr ({self.min_lr}) must not exceed learning_rate ({self.learning_rate})")
        if self.fsdp and self.optimizer == "muon":
            # Newton-Schulz needs whole matrices; FSDP holds shards of them.
            problems.append("optimizer=muon does not run under fsdp=True (it needs whole matrices); use DDP")
        refuse(problems)
        if self.wandb_log:
            require_wandb()

    def model_args(self):
        """The GPTConfig arguments these settings give, all but vocab_size."""
        return {k: getattr(self, k) for k in MODEL_KEYS}
