"""GPT-2 weights in Hugging Face's format, in and out.

In: OpenAI's checkpoints from the Hugging Face hub (gpt2, gpt2-medium, gpt2-large, gpt2-xl), or
a local folder in the same format (config.json with model.safetensors or pytorch_model.bin).
Out: a folder that transformers' GPT2LMHeadModel.from_pretrained loads with the same logits.

The parameter names are GPT-2's on both sides. The one real difference: Hugging Face keeps
GPT-2's projections as Conv1D, whose weight is (in, out), the transpose of nn.Linear's (out, in).
"""

import dataclasses
import json
import os
import pickle

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from gptcraft.data.tokenizer import GPT2_EOT
from gptcraft.errors import GptcraftError
from gptcraft.files import write_atomic
from gptcraft.model import GPT, GPTConfig

# OpenAI's GPT-2 checkpoints on the Hugging Face hub: 124M, 350M, 774M and 1558M parameters.
HUB_MODELS = {name: f"openai-community/{name}" for name in ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")}
HUB_PREFIX = "hub:"  # hub:gpt2 is the hub model even where a folder ./gpt2 exists
# Each is fetched at a pinned commit, so that what --init_from=gpt2 means cannot change upstream;
# hub:gpt2@REVISION fetches another (a commit, branch or tag: hub:gpt2@main is the newest).
HUB_REVISIONS = {
    "gpt2": "607a30d783dfa663caf39e06633721c8d4cfcd7e",
    "gpt2-medium": "6dcaa7a952f72f9298047fd5137cd6e4f05f41da",
    "gpt2-large": "32b71b12589c2f8d625668d2335a01cac3249519",
    "gpt2-xl": "15ea56dee5df4983c59b2538573817e1667135e2",
}
CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


class HFFormatError(GptcraftError, ValueError):
    """A checkpoint that is not GPT-2 in Hugging Face's format, or a model that format cannot hold."""


def hub_name(name_or_path):
    """The hub model that name_or_path names (hub:gpt2, or gpt2 where no file or folder has that
    name), or None for a local folder. A bare name that is both is refused: neither silently wins."""
    if name_or_path.startswith(HUB_PREFIX):
        name = name_or_path.removeprefix(HUB_PREFIX).partition("@")[0]
        if name not in HUB_MODELS:
            raise HFFormatError(f"{name_or_path!r} is not a hub model; use one of "
                                f"{', '.join(HUB_PREFIX + n for n in HUB_MODELS)}")  # fmt: skip
        return name
    if name_or_path not in HUB_MODELS:
        return None
    if os.path.exists(name_or_path):
        raise HFFormatError(f"{name_or_path} names both OpenAI's model on the hub and the local folder "
                            f"./{name_or_path}; write {HUB_PREFIX}{name_or_path} or ./{name_or_path}")  # fmt: skip
    return name_or_path


def hub_revision(name_or_path):
    """The revision the hub model of name_or_path is fetched at: its @REVISION, else the pinned one."""
    revision = name_or_path.partition("@")[2] if name_or_path.startswith(HUB_PREFIX) else ""
    return revision or HUB_REVISIONS[hub_name(name_or_path)]


def fetch(name_or_path):
    """The local folder of a Hugging Face GPT-2 checkpoint: the path itself, or a hub download
    (kept in the Hugging Face cache, which is used again when offline)."""
    name = hub_name(name_or_path)
    if name is None:
        if os.path.isdir(name_or_path):
            return name_or_path
        raise HFFormatError(f"{name_or_path!r} is neither a folder nor one of {', '.join(HUB_MODELS)}")
    from huggingface_hub import snapshot_download

    repo, revision = HUB_MODELS[name], hub_revision(name_or_path)
    try:
        return snapshot_download(repo, revision=revision, allow_patterns=["config.json", "model.safetensors"])
    except Exception as e:  # no network, or no cached copy: the hub's errors are many
        raise HFFormatError(
            f"cannot get {repo} at revision {revision} from the Hugging Face hub ({type(e).__name__}); "
            f"another revision: --init_from=hub:{name}@REVISION; on a machine without internet, "
            f"download config.json and model.safetensors from huggingface.co/{repo} elsewhere and pass their folder"
        ) from None


SIZES = ("n_layer", "n_head", "n_embd", "n_positions", "vocab_size")  # config.json keys a GPT is built from


def read_config(folder):
    """config.json of a Hugging Face checkpoint folder, with its sizes checked."""
    path = os.path.join(folder, "config.json")
    try:
        with open(path, encoding="utf-8") as f:
            hf = json.load(f)
    except FileNotFoundError:
        raise HFFormatError(f"{folder} has no config.json: not a Hugging Face checkpoint folder") from None
    except (OSError, ValueError) as e:  # ValueError: JSONDecodeError, UnicodeDecodeError
        raise HFFormatError(f"{path} cannot be read as JSON ({e}); download it again") from None
    if not isinstance(hf, dict):
        raise HFFormatError(f"{path} holds a JSON {type(hf).__name__}, not an object; download it again")
    bad = [k for k in SIZES if not (isinstance(hf.get(k), int) and not isinstance(hf.get(k), bool) and hf[k] > 0)]
    if bad:
        raise HFFormatError(f"{path}: {', '.join(f'{k}={hf.get(k)!r}' for k in bad)} must be positive integers")
    return hf


def check_size(args, where):
    """Refuse GPTConfig arguments whose float32 weights would not fit this machine's memory (an
    absurd n_layer=10**9 in a config.json or a checkpoint's model_args), before building anything."""
    d, per_block = args["n_embd"], 12 * args["n_embd"] ** 2 + 13 * args["n_embd"]  # attention 4d^2, MLP 8d^2
    params = args["n_layer"] * per_block + (2 * args["vocab_size"] + args["block_size"]) * d  # + embeddings, head
    memory = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    if 4 * params > memory:
        raise HFFormatError(f"{where}: its sizes make a model of about {params:.3g} parameters, "
                            f"{4 * params / 2**30:,.0f} GiB in float32, more than this machine's "
                            f"{memory / 2**30:,.0f} GiB of memory")  # fmt: skip


def config_from_hf(hf):
    """GPTConfig arguments for a Hugging Face GPT2Config (as its config.json dict); anything our
    GPT would compute differently is refused."""
    n_embd = hf["n_embd"]
    checks = [
        (hf.get("model_type", "gpt2") == "gpt2", f"model_type is {hf.get('model_type')!r}, not 'gpt2'"),
        (hf.get("activation_function", "gelu_new") in ("gelu_new", "gelu_pytorch_tanh"),
         f"activation_function {hf.get('activation_function')!r} is not GPT-2's tanh GELU"),
        (hf.get("n_inner") in (None, 4 * n_embd), f"n_inner {hf.get('n_inner')} is not 4 * n_embd"),
        (hf.get("layer_norm_epsilon", 1e-5) == 1e-5, f"layer_norm_epsilon {hf.get('layer_norm_epsilon')} is not 1e-5"),
        (hf.get("scale_attn_weights", True), "scale_attn_weights is off"),
        (not hf.get("scale_attn_by_inverse_layer_idx", False), "scale_attn_by_inverse_layer_idx is on"),
    ]  # fmt: skip
    problems = [why for ok, why in checks if not ok]
    if problems:
        raise HFFormatError("this GPT-2 checkpoint differs from the model here: " + "; ".join(problems))
    return dict(n_layer=hf["n_layer"], n_head=hf["n_head"], n_embd=n_embd, block_size=hf["n_positions"],
                vocab_size=hf["vocab_size"], bias=True, tie_embeddings=hf.get("tie_word_embeddings", True))  # fmt: skip


def read_weights(folder):
    """The state dict in a folder's model.safetensors, or else in its pytorch_model.bin."""
    safetensors_path, torch_path = os.path.join(folder, "model.safetensors"), os.path.join(folder, "pytorch_model.bin")
    path = next((p for p in (safetensors_path, torch_path) if os.path.exists(p)), None)
    if path is None:
        raise HFFormatError(f"{folder} holds neither model.safetensors nor pytorch_model.bin")
    try:
        if path == safetensors_path:
            return load_file(path)
        return torch.load(path, map_location="cpu", weights_only=True)
    except (SafetensorError, pickle.UnpicklingError, OSError, RuntimeError, EOFError, ValueError) as e:
        detail = (str(e).strip() or type(e).__name__).splitlines()[0][:200]
        raise HFFormatError(
            f"{path} is truncated, corrupt or not plain tensors ({detail}); download it again"
        ) from None


def from_hf_state_dict(hf_sd, tie_embeddings=True):
    """Our state dict from a Hugging Face GPT-2 one (GPT2LMHeadModel's, or GPT2Model's without
    the 'transformer.' prefix)."""
    sd = {}
    for key, tensor in hf_sd.items():
        key = key.removeprefix("transformer.")
        if key.endswith((".attn.bias", ".attn.masked_bias")):
            continue  # the causal mask, stored as a buffer by older versions: not a weight
        if key.endswith(CONV1D_WEIGHTS):
            tensor = tensor.t()
        sd[key if key == "lm_head.weight" else "transformer." + key] = tensor
    if tie_embeddings:
        sd["lm_head.weight"] = sd["transformer.wte.weight"]
    return sd


def from_pretrained(name_or_path, block_size=None, dropout=0.0):
    """A GPT with GPT-2 weights from the hub or a local folder (see fetch). block_size, when
    smaller than the checkpoint's, keeps only the first block_size position embeddings."""
    folder = fetch(name_or_path)
    args = config_from_hf(read_config(folder))
    check_size(args, os.path.join(folder, "config.json"))  # before reading any weights
    sd = from_hf_state_dict(read_weights(folder), args["tie_embeddings"])
    if block_size is not None:
        if block_size > args["block_size"]:
            raise HFFormatError(f"block_size {block_size} exceeds the {args['block_size']} positions of {name_or_path}")
        args["block_size"] = block_size
        sd["transformer.wpe.weight"] = sd["transformer.wpe.weight"][:block_size]
    model = GPT(GPTConfig(**args, dropout=dropout))
    try:
        model.load_state_dict(sd)
    except RuntimeError as e:
        detail = str(e).strip().splitlines()[-1].strip()[:300]
        raise HFFormatError(f"{folder}: the weights do not fit its config.json ({detail})") from None
    return model


def check_expressible(config):
    """Refuse, naming each field, a GPTConfig that GPT-2's architecture cannot represent: a field
    tagged beyond_gpt2 away from its default. (bias=False is written as zero biases, an untied head
    as its own lm_head.weight.)"""
    default = GPTConfig()
    odd = [f"{f.name}={getattr(config, f.name)!r} (GPT-2: {getattr(default, f.name)!r})"
           for f in dataclasses.fields(config)
           if f.metadata.get("beyond_gpt2") and getattr(config, f.name) != getattr(default, f.name)]  # fmt: skip
    if odd:
        raise HFFormatError(f"GPT-2's format cannot express {', '.join(odd)}; only GPT-2-style models export")


def to_hf_state_dict(model):
    """The Hugging Face GPT2LMHeadModel state dict of our model: Conv1D weights transposed,
    zero biases where ours has none, lm_head only when it is not the token embedding."""
    hf_sd = {}
    for key, tensor in model.state_dict().items():
        if key == "lm_head.weight" and model.config.tie_embeddings:
            continue  # transformers ties it back to transformer.wte.weight
        if key.endswith(CONV1D_WEIGHTS):
            tensor = tensor.t()
        hf_sd[key] = tensor.detach().cpu().contiguous()
    if not model.config.bias:
        for name, module in model.named_modules():
            if isinstance(module, (torch.nn.Linear, torch.nn.LayerNorm)) and name != "lm_head":
                out_features = module.weight.shape[0 if isinstance(module, torch.nn.Linear) else -1]
                hf_sd[f"{name}.bias"] = torch.zeros(out_features, dtype=module.weight.dtype)
    return hf_sd


def hf_config(config):
    """config.json of a Hugging Face GPT2Config for our GPTConfig."""
    hf = {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": config.vocab_size,
        "n_positions": config.block_size, "n_embd": config.n_embd, "n_layer": config.n_layer,
        "n_head": config.n_head, "n_inner": None, "activation_function": "gelu_new",
        "layer_norm_epsilon": 1e-5, "resid_pdrop": config.dropout, "embd_pdrop": config.dropout,
        "attn_pdrop": config.dropout, "initializer_range": 0.02, "scale_attn_weights": True,
        "tie_word_embeddings": config.tie_embeddings, "dtype": "float32",
    }  # fmt: skip
    if config.vocab_size > GPT2_EOT:  # GPT-2's BPE vocabulary: its end-of-text token exists
        hf.update(bos_token_id=GPT2_EOT, eos_token_id=GPT2_EOT)
    return hf


def save_hf(model, folder):
    """Write model as a Hugging Face GPT-2 folder: config.json and model.safetensors."""
    check_expressible(model.config)
    hf_sd = {k: v.float() for k, v in to_hf_state_dict(model).items()}
    os.makedirs(folder, exist_ok=True)
    # Each file written fresh and renamed into place: never through a link, never half written.
    weights = save(hf_sd, metadata={"format": "pt"})
    write_atomic(os.path.join(folder, "model.safetensors"), lambda f: f.write(weights))
    config = json.dumps(hf_config(model.config), indent=2).encode()
    write_atomic(os.path.join(folder, "config.json"), lambda f: f.write(config))
