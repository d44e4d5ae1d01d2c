"""gptcraft: the machinery behind model.py, train.py and sample.py. From the bottom up:

errors.py, files.py, config.py   the library's error, link-safe file writes, typed settings
system/    where a run executes: device, precision, torch.distributed
data/      tokenizers, the token shard format and meta.json, batch sampling, downloads
prepare/   dataset recipes that write token shards
hf.py      GPT-2 weights in and out of Hugging Face's format
runs/      run folders: checkpoints, saving and resuming, the lock, how a run starts there
load.py    the model a command runs (a run's checkpoint or GPT-2) and the options that name it
evaluate/  losses over many batches, whole splits, HellaSwag, the `eval` command
track/     log.jsonl, console and wandb reporting, loss plots
train/     the training loop and its concerns: config, setup, schedule, parallelism, optimizer, stops
generate.py, prompt.py, sample.py, export.py, visualize/: decoding, prompts, sampling, export, pictures
bench/     training and sampling speed
cli.py     the `gptcraft` command
"""

__version__ = "0.1.0"
