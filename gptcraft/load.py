"""The model a command runs, with its tokenizer: a training run's checkpoint (init_from=resume; ours
or nanoGPT's) or GPT-2 weights (a hub name or a Hugging Face folder, see hf.py); and the options
that every such command takes to say which, where and in what precision."""

import os
from dataclasses import dataclass

from gptcraft.config import option
from gptcraft.data.nanogpt import META_PKL, read_meta_pkl
from gptcraft.data.shards import META, read_meta
from gptcraft.data.tokenizer import GPT2_META, load_tokenizer
from gptcraft.errors import GptcraftError
from gptcraft.hf import HUB_MODELS, check_size, from_pretrained, hub_name
from gptcraft.model import GPT, GPTConfig
from gptcraft.quantize import check_scheme, for_inference, quantize_option
from gptcraft.runs.checkpoint import load_checkpoint, sampling_path
from gptcraft.system import hardware
from gptcraft.system.hardware import DTYPES

INIT_FROM_HELP = ("resume: the checkpoint in out_dir; gpt2, gpt2-medium, gpt2-large or gpt2-xl (or hub:gpt2, ...): "
                  "OpenAI's weights from the Hugging Face hub, at a pinned revision (hub:gpt2@REV: another); "
                  "or a local folder in Hugging Face's GPT-2 format (./gpt2 where the names meet)")  # fmt: skip


class InitFromError(GptcraftError):
    """init_from names no model this machine can load."""


def check_init_from(init_from, allowed=("resume",)):
    """Refuse an init_from that is none of `allowed`, a GPT-2 name or an existing folder."""
    if init_from in allowed or hub_name(init_from) is not None or os.path.isdir(init_from):
        return
    names = ", ".join((*allowed, *HUB_MODELS))
    raise InitFromError(f"init_from={init_from!r} is none of {names} and not a folder holding a Hugging Face GPT-2")


def device_option():
    """The `device` key that every command running a model shares."""
    return option("auto", "auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps")


def dtype_option():
    """The `dtype` key that every command running a model shares."""
    return option("auto", "auto: bfloat16 on CUDA where supported, else float16; float32 on CPU",
                  ("auto", *DTYPES))  # fmt: skip


@dataclass
class RunFolder:
    out_dir: str = option("out", "run directory holding ckpt.pt and meta.json (init_from=resume)")


def inference_dtype_option():
    """The `dtype` key of the commands that only run the model (see hardware.inference_dtype)."""
    return option("auto", "weights cast to this; auto: bfloat16 on CUDA (float16 where bf16 is missing) and on "
                  "CPUs with native bf16 (avx512_bf16, AMX), else float32", ("auto", *DTYPES))  # fmt: skip


@dataclass
class ModelOptions(RunFolder):
    """What sample, eval, hellaswag and attention share: which model, on which device, in what precision."""

    init_from: str = option("resume", INIT_FROM_HELP)
    device: str = device_option()
    dtype: str = inference_dtype_option()
    quantize: str = quantize_option()
    tokenizer_file: str = option("", "local GPT-2 .tiktoken file for offline use (or set GPTCRAFT_TIKTOKEN_FILE)")

    def __post_init__(self):
        check_init_from(self.init_from)

    def load(self):
        """(model, tokenizer, device, dtype name) that these options name: the model in eval mode, its
        weights cast to the inference dtype and quantized (quantize.for_inference), so no autocast."""
        device = hardware.resolve_device(self.device)
        check_scheme(self.quantize, device)  # before loading a model it could not run
        model, tokenizer = load_model(self.init_from, self.out_dir, device, self.tokenizer_file)
        model, dtype = for_inference(model, device, self.dtype, self.quantize)
        return model, tokenizer, device, dtype


def run_meta(out_dir, ckpt, vocab_size):
    """The tokenizer description of a run: out_dir/meta.json, which train.py writes; for a nanoGPT
    run, its dataset's meta.json or meta.pkl (data/<dataset>/, where nanoGPT's sample.py looks);
    else GPT-2 BPE, when the model has GPT-2's vocabulary."""
    if os.path.exists(os.path.join(out_dir, META)):
        return read_meta(out_dir)
    config = ckpt.get("config") or {}
    data_dir = os.path.join(config.get("data_dir", "data"), str(config.get("dataset", "")))
    if config.get("dataset") and os.path.exists(os.path.join(data_dir, META)):
        return read_meta(data_dir)
    if config.get("dataset") and os.path.exists(os.path.join(data_dir, META_PKL)):
        return read_meta_pkl(os.path.join(data_dir, META_PKL))
    if vocab_size < GPT2_META["vocab_size"]:
        where = f", or run from the folder that holds {data_dir}/{META_PKL}" if config.get("dataset") else ""
        raise InitFromError(f"{os.path.join(out_dir, META)} not found, and the model's {vocab_size}-token vocabulary "
                            f"is not GPT-2's; copy the dataset's meta.json into {out_dir}{where}")  # fmt: skip
    return dict(GPT2_META)


def load_run(out_dir, device):
    """(GPT, tokenizer description) of a training run's out_dir, ours or nanoGPT's: best.pt (lowest
    val loss) when there is one, else ckpt.pt."""
    path = sampling_path(out_dir)
    ckpt = load_checkpoint(path, map_location=device)
    try:
        config = GPTConfig(**ckpt["model_args"])
    except (TypeError, ValueError) as e:
        raise InitFromError(f"{path}: its model_args do not describe a GPT ({e})") from None
    check_size(ckpt["model_args"] | {"vocab_size": config.vocab_size}, path)
    model = GPT(config)
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:  # missing, unexpected or wrong-shaped weights
        detail = str(e).strip().splitlines()[-1].strip()[:300]
        raise InitFromError(f"{path}: the weights do not fit its model_args ({detail})") from None
    return model, run_meta(out_dir, ckpt, model.config.vocab_size)


def load_model(init_from, out_dir, device, tokenizer_file=""):
    """(model in eval mode on device, tokenizer) for init_from (see INIT_FROM_HELP); tokenizer_file:
    a local GPT-2 .tiktoken file for offline machines (see tokenizer.py)."""
    if init_from == "resume":
        model, meta = load_run(out_dir, device)
    else:
        model = from_pretrained(init_from)
        # A folder written by export.py carries the run's meta.json; OpenAI's models use GPT-2 BPE.
        local = hub_name(init_from) is None and os.path.exists(os.path.join(init_from, META))
        meta = read_meta(init_from) if local else GPT2_META
    tokenizer = load_tokenizer(meta, tokenizer_file or None)
    return model.to(device).eval(), tokenizer
