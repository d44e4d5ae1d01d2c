"""The model to sample from, evaluate or export, with its tokenizer: a training run's checkpoint
(init_from=resume) or GPT-2 weights (a hub name or a Hugging Face folder, see hf.py)."""

import os

from gptcraft.data.shards import read_meta
from gptcraft.data.tokenizer import GPT2_META, load_tokenizer
from gptcraft.errors import GptcraftError
from gptcraft.hf import HUB_MODELS, from_pretrained, hub_name
from gptcraft.train.checkpoint import load_checkpoint, sampling_path
from model import GPT, GPTConfig

INIT_FROM_HELP = ("resume: the checkpoint in out_dir; gpt2, gpt2-medium, gpt2-large or gpt2-xl (or hub:gpt2, ...): "
                  "OpenAI's weights from the Hugging Face hub; or a local folder in Hugging Face's GPT-2 format "
                  "(./gpt2 where the names meet)")  # fmt: skip


class InitFromError(GptcraftError):
    """init_from names no model this machine can load."""


def check_init_from(init_from, allowed=("resume",)):
    """Refuse an init_from that is none of `allowed`, a GPT-2 name or an existing folder."""
    if init_from in allowed or hub_name(init_from) is not None or os.path.isdir(init_from):
        return
    names = ", ".join((*allowed, *HUB_MODELS))
    raise InitFromError(f"init_from={init_from!r} is none of {names} and not a folder holding a Hugging Face GPT-2")


def load_run_model(out_dir, device):
    """The GPT saved in a training run's out_dir: best.pt (lowest val loss) when there is one, else ckpt.pt."""
    ckpt = load_checkpoint(sampling_path(out_dir), map_location=device)
    model = GPT(GPTConfig(**ckpt["model_args"]))
    model.load_state_dict(ckpt["model"])
    return model


def load_model(init_from, out_dir, device, tokenizer_file=""):
    """(model in eval mode on device, tokenizer) for init_from (see INIT_FROM_HELP); tokenizer_file:
    a local GPT-2 .tiktoken file for offline machines (see tokenizer.py)."""
    if init_from == "resume":
        model, meta_dir = load_run_model(out_dir, device), out_dir
    else:
        model = from_pretrained(init_from)
        # A folder written by export.py carries the run's meta.json; OpenAI's models use GPT-2 BPE.
        local = hub_name(init_from) is None and os.path.exists(os.path.join(init_from, "meta.json"))
        meta_dir = init_from if local else None
    try:
        meta = read_meta(meta_dir) if meta_dir else GPT2_META
    except (FileNotFoundError, ValueError) as e:
        raise InitFromError(f"{e}; copy the dataset's meta.json into {meta_dir}") from None
    tokenizer = load_tokenizer(meta, tokenizer_file or None)
    return model.to(device).eval(), tokenizer
