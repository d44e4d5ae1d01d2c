"""Everything a run needs to continue exactly where it stopped: model, optimizer, grad scaler,
counters, config and every rank's RNG states; saved and restored the same way whether the
model is plain, DDP-wrapped or sharded by FSDP2 (torch.distributed.checkpoint.state_dict).
A nanoGPT checkpoint resumes too: its weights, its AdamW state, its counters."""

import os
import random

import numpy as np
import torch

from gptcraft.hf import check_size
from gptcraft.model import GPT, GPTConfig
from gptcraft.runs import checkpoint
from gptcraft.runs.checkpoint import CheckpointError
from gptcraft.runs.start import MAY_CHANGE
from gptcraft.system import distributed


def state_dicts():
    """torch.distributed.checkpoint.state_dict: one state-dict format for plain, DDP and FSDP models.
    Imported at the first save or resume, not at start-up."""
    from torch.distributed.checkpoint import state_dict

    return state_dict


def full(cpu_offload=False):
    """Options for whole (unsharded) state dicts; cpu_offload: gathered into CPU memory, for saving."""
    return state_dicts().StateDictOptions(full_state_dict=True, cpu_offload=cpu_offload)


def rng_state(device):
    """This process's RNG states, as plain values and tensors so that weights_only loading accepts them."""
    kind, key, pos, has_gauss, gauss = np.random.get_state()
    numpy_state = {"kind": kind, "key": torch.from_numpy(key.astype(np.int64)), "pos": pos,
                   "has_gauss": has_gauss, "gauss": gauss}  # fmt: skip
    state = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
    if device.startswith("cuda"):
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state, device):
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and device.startswith("cuda"):
        torch.cuda.set_rng_state(state["cuda"], device)


class Resume:
    """The latest checkpoint of out_dir, read and checked before any compute; `restore` then
    loads it into the built model, optimizer and scaler."""

    def __init__(self, out_dir, model_keys, fsdp=False):
        """model_keys: this run's model settings, which must match those the checkpoint was trained with;
        fsdp: an FSDP run, the only kind that reads a ckpt.dcp directory (see checkpoint.latest_path)."""
        path = checkpoint.latest_path(out_dir, fsdp)
        if path is None:
            raise CheckpointError(f"init_from=resume but {out_dir} holds no checkpoint ({checkpoint.LATEST}); "
                                  "train first with init_from=scratch, or fix out_dir")  # fmt: skip
        self.path = path
        self.sharded = os.path.isdir(path)
        if self.sharded:
            self.state = checkpoint.load_sharded_state(path)
            shapes = checkpoint.sharded_shapes(path)
            shapes = {k.removeprefix("model."): v for k, v in shapes.items() if k.startswith("model.")}
        else:
            self.state = checkpoint.load_checkpoint(path)
            shapes = {k: tuple(v.shape) for k, v in self.state["model"].items()}
        # The checkpoint's model, with this run's choice of the settings that may change.
        free = {k: v for k, v in model_keys.items() if k in MAY_CHANGE}
        self.model_args = {**self.state["model_args"], **free}
        check_size(self.model_args, path)  # before a model of these sizes is built, even on the meta device
        self.iter_num = self.state["iter_num"]
        self.best_val_loss = self.state["best_val_loss"]
        self.loader = self.state.get("loader")
        self.evaluated = self.state.get("evaluated", True)  # False: saved by a stop signal
        self.nonfinite_in_a_row = self.state.get("nonfinite_in_a_row", 0)  # the divergence guard's count
        self.dtype = self.state.get("config", {}).get("dtype")
        self.nanogpt = not self.sharded and checkpoint.is_nanogpt(self.state)
        self.notes = []  # what a resumed run should know, printed by the trainer
        if self.nanogpt:
            self.notes.append(f"{path} is nanoGPT's: it records no batch position or RNG states, so the batches "
                              "and dropout masks from here on differ from those nanoGPT would draw")  # fmt: skip
        self.check_settings(model_keys)
        diff = checkpoint.shape_mismatch(model_shapes(self.model_args), shapes)
        if diff:
            raise CheckpointError(f"{path} is inconsistent: its weights do not fit its own model_args ("
                                  f"{'; '.join(diff[:8])}); use another checkpoint")  # fmt: skip

    def check_settings(self, model_keys):
        """The run's model settings must be those the checkpoint was trained with."""
        saved = self.state.get("config", {})
        differ = {k: v for k, v in model_keys.items() if k in saved and saved[k] != v and k not in MAY_CHANGE}
        if not differ:
            return
        if differ.get("block_size", 0) > saved["block_size"]:
            asked, trained = differ["block_size"], saved["block_size"]
            raise CheckpointError(f"block_size {asked} is larger than the block_size {trained} of the model in "
                                  f"{self.path}; use --block_size={trained}")  # fmt: skip
        asked = {**self.model_args, **differ}
        diff = checkpoint.shape_mismatch(model_shapes(asked), model_shapes(self.model_args))
        settings = ", ".join(f"{k}={saved[k]} (this run: {v})" for k, v in differ.items())
        keys = "; ".join(diff[:8]) + (" ..." if len(diff) > 8 else "") if diff else "none, but they compute differently"
        raise CheckpointError(f"{self.path} holds a different model: {settings}. Differing weights: {keys}. "
                              "Resume with the settings it was trained with, or start a new out_dir")  # fmt: skip

    def restore(self, model, optimizer, scaler):
        """Collective: load weights, optimizer and grad scaler state. A float16 run resumed from
        a checkpoint written in another dtype (no scaler state) starts with a fresh scaler."""
        sd = state_dicts()
        if self.nanogpt:
            self.restore_nanogpt(model, optimizer)
        elif self.sharded:
            optim = sd.get_optimizer_state_dict(model, optimizer)
            tensors = {"model": sd.get_model_state_dict(model), "optim": {"state": optim["state"]}}
            checkpoint.load_sharded(self.path, tensors)
            sd.set_model_state_dict(model, tensors["model"])
            optim = {"state": tensors["optim"]["state"], "param_groups": self.state["param_groups"]}
            sd.set_optimizer_state_dict(model, optimizer, optim)
        else:
            # A full checkpoint also loads into a sharded model: each rank keeps its own shard.
            sd.set_model_state_dict(model, self.state["model"], options=full())
            sd.set_optimizer_state_dict(model, optimizer, self.state["optimizer"], options=full())
        if not self.nanogpt and (self.state["scaler"] or not scaler.is_enabled()):
            scaler.load_state_dict(self.state["scaler"])
        self.rng_states = self.state.get("rng", [])
        self.state = None  # free the memory the weights and optimizer state took

    def restore_nanogpt(self, model, optimizer):
        """nanoGPT's weights, and its AdamW moments when this run's optimizer is an AdamW too."""
        sd = state_dicts()
        sd.set_model_state_dict(model, self.state["model"], options=full())
        ours = sd.get_optimizer_state_dict(model, optimizer, options=full())
        moments = nanogpt_optimizer_state(self.state["optimizer"], self.state["model"], self.model_args)
        if moments is None or not isinstance(optimizer, torch.optim.AdamW):
            self.notes.append("the optimizer starts afresh: its state does not match nanoGPT's AdamW groups")
            return
        sd.set_optimizer_state_dict(model, optimizer, {"state": moments, "param_groups": ours["param_groups"]},
                                    options=full())  # fmt: skip

    def restore_rng(self, d, device):
        """This rank's RNG states as they were at the save."""
        if self.nanogpt:
            return  # nanoGPT saves none
        states = self.rng_states
        if len(states) == d.world_size:
            set_rng_state(states[d.rank], device)
        elif d.master:
            print(f"note: {self.path} was saved by {len(states)} process(es), this run has {d.world_size}: "
                  "RNG states are not restored, so dropout masks differ from an uninterrupted run")  # fmt: skip


def nanogpt_optimizer_state(optim, weights, model_args):
    """nanoGPT's AdamW state {index: moments} keyed by parameter name instead, or None when its
    groups are not nanoGPT's two: the matrices (decayed), then the vectors, each in the order of
    named_parameters (that of the state dict, less lm_head.weight when it is tied to wte)."""
    tied = model_args.get("tie_embeddings", True)
    names = [k for k in weights if not (tied and k == "lm_head.weight")]
    groups = [[n for n in names if weights[n].dim() >= 2], [n for n in names if weights[n].dim() < 2]]
    saved = [g["params"] for g in optim.get("param_groups", [])]
    if [len(g) for g in saved] != [len(g) for g in groups]:
        return None
    by_index = {i: name for ids, group in zip(saved, groups, strict=True) for i, name in zip(ids, group, strict=True)}
    state = {by_index[i]: moments for i, moments in optim.get("state", {}).items()}
    if any(v.get("exp_avg") is None or v["exp_avg"].shape != weights[n].shape for n, v in state.items()):
        return None
    return state


def model_shapes(model_args):
    """{name: shape} of the state dict of the model these settings build, without building it."""
    with torch.device("meta"):
        model = GPT(GPTConfig(**model_args))
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def save_latest(out_dir, model, optimizer, scaler, model_args, progress, d, device, sharded):
    """Collective: write the resume checkpoint (ckpt.pt, or ckpt.dcp/ when `sharded`); progress:
    plain values such as iter_num, best_val_loss, config and the loader state."""
    reshard(model)
    state = {
        **progress,
        "model_args": model_args,
        "scaler": scaler.state_dict(),
        "rng": distributed.all_gather(rng_state(device), d),
    }
    sd = state_dicts()
    if sharded:
        optim = sd.get_optimizer_state_dict(model, optimizer)
        state["param_groups"] = optim["param_groups"]
        tensors = {"model": sd.get_model_state_dict(model), "optim": {"state": optim["state"]}}
        collective_write(lambda: checkpoint.save_sharded(out_dir, tensors, state, d.master), d)
        return
    state["model"] = sd.get_model_state_dict(model, options=full(cpu_offload=True))
    state["optimizer"] = sd.get_optimizer_state_dict(model, optimizer, options=full(cpu_offload=True))
    collective_write(lambda: d.master and checkpoint.save_full(out_dir, state), d)


def save_best(out_dir, model, model_args, progress, d):
    """Collective: write best.pt, the full model weights for sampling (gathered from all shards)."""
    reshard(model)
    weights = state_dicts().get_model_state_dict(model, options=full(cpu_offload=True))
    state = {**progress, "model": weights, "model_args": model_args}
    collective_write(lambda: d.master and checkpoint.save_checkpoint(os.path.join(out_dir, checkpoint.BEST), state), d)


def reshard(model):
    """FSDP keeps the root module's weights gathered after a forward with no backward (an
    evaluation); state dicts are made of the sharded parameters the optimizer holds."""
    if distributed.is_fsdp(model):
        model.reshard()


def collective_write(write, d):
    """Run `write`; if it fails on any rank, raise CheckpointError on every rank, so that no rank
    is left waiting for the others in the next collective."""
    error = None
    try:
        write()
    except checkpoint.CheckpointError as e:
        error = e
    if distributed.any_rank_says(error is not None, d):
        raise error or checkpoint.CheckpointError("saving the checkpoint failed on another rank")
