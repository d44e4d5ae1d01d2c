"""Export a trained checkpoint as a Hugging Face GPT-2 folder (config.json + model.safetensors).

gptcraft export --out_dir=out-shakespeare-char-cpu --hf_dir=hf-shakespeare-char

transformers then loads it: GPT2LMHeadModel.from_pretrained("hf-shakespeare-char"). The run's
meta.json (its tokenizer) is copied beside the weights, so sample.py --init_from=FOLDER works too.
"""

import os
import sys
from dataclasses import dataclass

from gptcraft.config import ConfigError, option, parse_config, run_cli
from gptcraft.data.shards import META, write_meta
from gptcraft.errors import GptcraftError
from gptcraft.files import replaceable_dir, replaced_dir
from gptcraft.hf import HFFormatError, check_expressible, save_hf
from gptcraft.load import RunFolder, load_run

HF_FILES = ("config.json", "model.safetensors")


@dataclass
class ExportConfig(RunFolder):
    hf_dir: str = option("", "folder to write config.json, model.safetensors and meta.json into")
    overwrite: bool = option(False, "replace a model that hf_dir already holds")

    def __post_init__(self):
        if not self.hf_dir:
            raise ConfigError("hf_dir is required: pass --hf_dir=FOLDER for the Hugging Face files")


class ExportError(GptcraftError, OSError):
    """The Hugging Face folder could not be written; the old one is as it was."""


def main(argv=None):
    cfg = parse_config(ExportConfig, sys.argv[1:] if argv is None else argv, prog="gptcraft export")
    way_out = "choose another --hf_dir"
    replaceable_dir(cfg.hf_dir, way_out)  # a file, a read-only folder or others' files: refused now
    existing = [n for n in HF_FILES if os.path.exists(os.path.join(cfg.hf_dir, n))]
    if existing and not cfg.overwrite:
        raise ConfigError(f"{cfg.hf_dir} already holds a model ({', '.join(existing)}); {way_out}, "
                          "or pass --overwrite=True to replace it")  # fmt: skip
    model, meta = load_run(cfg.out_dir, "cpu")
    try:
        check_expressible(model.config)  # before anything is written
    except HFFormatError as e:
        raise ConfigError(f"{cfg.out_dir}: {e}") from None
    try:
        # Built beside hf_dir and swapped in whole: a failure (a full disk) leaves the old folder as it was.
        with replaced_dir(cfg.hf_dir, lambda name: name in (*HF_FILES, META), way_out) as new:
            save_hf(model, new)
            write_meta(new, meta)  # the run's tokenizer, for sample.py --init_from=FOLDER
    except (OSError, RuntimeError) as e:  # RuntimeError: safetensors on a full disk
        if isinstance(e, GptcraftError):
            raise
        why = (getattr(e, "strerror", None) or str(e) or type(e).__name__).splitlines()[0]
        raise ExportError(f"could not write {cfg.hf_dir} ({why}); it is left as it was") from None
    print(
        f"wrote {cfg.hf_dir}: config.json, model.safetensors ({model.num_params(False) / 1e6:.2f}M parameters), "
        "meta.json"
    )


if __name__ == "__main__":
    run_cli(main)
