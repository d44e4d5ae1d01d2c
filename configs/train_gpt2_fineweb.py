# GPT-2 small (124M) on 10B tokens of FineWeb-Edu, the reproduction recipe of build-nanogpt and
# llm.c (GPT-3 paper hyperparameters), for one node of 8 GPUs:
#   python prepare/fineweb.py --num_proc 16     (once: data/fineweb_edu10B/, about 10B tokens)
#   torchrun --standalone --nproc_per_node=8 train.py configs/train_gpt2_fineweb.py
# 64 sequences x 1024 tokens x 8 micro-batches = 524,288 tokens (2^19, about 0.5M) per step; with
# 8 processes each runs one micro-batch per step. 19,073 steps x 524,288 = 10.0B tokens, one epoch.
# Targets the anchors publish: HellaSwag acc_norm_tokens 0.2955 for OpenAI's GPT-2 124M (acc 0.2859;
# build-nanogpt's hellaswag.py, 10,042 examples, the scoring of gptcraft hellaswag); on plain
# FineWeb (--source fineweb, dataset = "fineweb10B") llm.c's trainer reaches val loss 3.2847
# after 10B tokens (modded-nanogpt's first README), the NanoGPT speedrun's target is 3.28.
out_dir = "out-gpt2-fineweb"
eval_interval = 250
eval_iters = 20  # x 64 x 1024 tokens: about 1.3M val tokens per evaluation
log_interval = 10
hellaswag_file = "data/hellaswag/hellaswag_val.jsonl"  # gptcraft hellaswag --init_from=gpt2 downloads it

dataset = "fineweb_edu10B"
batch_size = 64
block_size = 1024
gradient_accumulation_steps = 8

n_layer = 12
n_head = 12
n_embd = 768
dropout = 0.0
bias = False

learning_rate = 6e-4
max_iters = 19073
lr_decay_iters = 19073
warmup_iters = 715  # 375M tokens, as the GPT-3 paper warms up
min_lr = 6e-5  # 10% of the peak
weight_decay = 0.1
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0

dtype = "auto"
compile = True
