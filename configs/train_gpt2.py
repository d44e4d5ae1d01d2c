# GPT-2 small (124M) on OpenWebText, for one node of 8 GPUs:
#   python prepare/openwebtext.py   (once; see README)
#   torchrun --standalone --nproc_per_node=8 train.py configs/train_gpt2.py
# 12 sequences x 1024 tokens x 40 micro-steps = 491,520 tokens (about 0.5M) per optimizer step;
# with 8 processes each runs 5 micro-steps per step. 600k steps are about 300B tokens.
out_dir = "out-gpt2"
eval_interval = 1000
eval_iters = 200
log_interval = 10

dataset = "openwebtext"
batch_size = 12
block_size = 1024
gradient_accumulation_steps = 40

n_layer = 12
n_head = 12
n_embd = 768
dropout = 0.0
bias = False

learning_rate = 6e-4
max_iters = 600000
lr_decay_iters = 600000
min_lr = 6e-5
warmup_iters = 2000
weight_decay = 0.1
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0

# The GPU fast path (all defaults, spelled out): bf16 autocast, torch.compile, SDPA (flash) attention.
dtype = "auto"
compile = True
attention = "sdpa"
