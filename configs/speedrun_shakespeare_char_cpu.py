# CPU speedrun: whole-val loss <= 1.88 on tiny Shakespeare characters, fast, on a 2-core CPU.
#   python prepare/shakespeare_char.py                                       (once, not timed)
#   python bench.py configs/speedrun_shakespeare_char_cpu.py --speedrun=3    (timed, median of 3)
# or simply python train.py configs/speedrun_shakespeare_char_cpu.py. docs/speed.md, "CPU speedrun",
# says what each choice below bought, measured against the common CPU recipe
# (configs/train_shakespeare_char_cpu.py: 4 layers, AdamW, 2000 iters, 1.898 whole-val).
out_dir = "out-speedrun-shakespeare-char-cpu"
eval_interval = 250  # only at the start and the end: evaluation time counts until the last step
eval_iters = 5
log_interval = 50
always_save_checkpoint = False
full_val = True  # the score: every val token, at the last iteration (after the clock stops)

dataset = "shakespeare_char"
gradient_accumulation_steps = 1
batch_size = 32  # 2048 tokens per step: larger matmuls run closer to the CPU's peak
block_size = 64  # short context: cheaper attention, more sequences per step

# Shallow: at this budget more optimizer steps beat more depth (4 layers got less far in the same time).
n_layer = 2
n_head = 4
n_embd = 128
dropout = 0.0
bias = False

pos_embedding = "rope"
qk_norm = True
activation = "relu2"
tie_embeddings = False
zero_init_proj = True

optimizer = "muon"  # hidden matrices; AdamW for embeddings, head and gains
muon_lr = 0.015
learning_rate = 6e-3  # AdamW's part
weight_decay = 0.0
beta2 = 0.99
max_iters = 250
warmup_iters = 20
warmdown_iters = 100  # hold the rate, then decay linearly to 0 over the last 40% of the steps
min_lr = 0.0

device = "cpu"
dtype = "float32"  # no native bf16 on this CPU class
compile = False  # compiling takes longer than the whole run
