"""How long a run needs on a CPU, said before its first evaluation: a config sized for GPUs (the
baby GPT, GPT-2) would otherwise print its parameter count and then nothing for many minutes.

The figures are the FLOPs a step or an evaluation must do, at the CPU's measured matmul peak: real
steps are slower (the CPU recipe's reach about 60% of it, see README's Results). Once steps run,
each console line gives the measured ms/iter and, from the second line on, the eta.
"""

from dataclasses import dataclass

from gptcraft.track.runlog import format_duration

CPU_SIZED = "configs/train_shakespeare_char_cpu.py"
LONG_RUN_S = 3600  # a run that needs at least this long on a CPU says so at start
LONG_EVAL_S = 30  # an evaluation that needs at least this long says so when it begins


@dataclass
class Forecast:
    """Seconds per optimizer step and per evaluation, and for the rest of the run, at `peak` FLOP/s."""

    peak: float
    step_s: float
    eval_s: float
    total_s: float


def forecast(flops_per_token, tokens_per_step, eval_tokens, peak, steps_left, evals_left):
    """flops_per_token: training FLOPs (forward and backward, 3x the forward's), per token of
    this process; eval_tokens: the tokens one evaluation feeds this process; peak: FLOP/s."""
    step_s = flops_per_token * tokens_per_step / peak
    eval_s = flops_per_token / 3 * eval_tokens / peak
    return Forecast(peak, step_s, eval_s, step_s * steps_left + eval_s * evals_left)


def for_run(cfg, model, accum, world_size, iter_num, peak):
    """The Forecast of a training run from iteration iter_num on, for one of world_size processes
    doing accum micro-batches per step."""
    tokens = cfg.batch_size * model.config.block_size
    evals_left = (cfg.max_iters - iter_num) // cfg.eval_interval + 1
    eval_tokens = 2 * -(-cfg.eval_iters // world_size) * tokens  # train and val, this process's share
    return forecast(model.flops_per_token(), accum * tokens, eval_tokens, peak, cfg.max_iters - iter_num, evals_left)


def start_note(f, max_iters):
    """A line for a run that will take long on this CPU, else None."""
    if f.total_s < LONG_RUN_S:
        return None
    return (f"note: this run is sized for a GPU. At this CPU's measured matmul peak ({f.peak / 1e9:.0f} "
            f"GFLOP/s) a step takes {f.step_s:.1f} s and an evaluation {format_duration(f.eval_s)}: "
            f"{format_duration(f.total_s)} to max_iters={max_iters}, and real steps are slower. For a CPU-sized "
            f"run use {CPU_SIZED}, or lower max_iters, eval_iters, batch_size or the model's size")  # fmt: skip


def eval_note(f, eval_iters):
    """A line as a long evaluation begins, else None."""
    if f.eval_s < LONG_EVAL_S:
        return None
    return (f"evaluating {eval_iters} batches per split (eval_iters): {format_duration(f.eval_s)} or more on "
            "this CPU; Ctrl-C stops it and saves")  # fmt: skip
