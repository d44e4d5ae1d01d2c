"""gptcraft: the machinery behind model.py, train.py and sample.py.

system/    where a run executes: device, precision, torch.distributed
data/      tokenizers, the token shard format and meta.json, batch sampling, downloads
prepare/   dataset recipes that write token shards
train/     the training loop and its concerns: config, parallelism, optimizer, checkpoints, stops
evaluate/  loss over whole splits, the `eval` command
track/     log.jsonl, console and wandb reporting, loss plots
generate.py, sample.py, hf.py, init_from.py, export.py: decoding, sampling, Hugging Face GPT-2
bench/     speed benchmarks
"""

__version__ = "0.1.0"
