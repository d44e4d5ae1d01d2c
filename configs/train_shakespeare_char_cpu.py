# A small character-level GPT that trains on a 2-core CPU in about a minute (65 s from start to
# exit with --full_val=True on an idle 2-core VM, see README, Results).
out_dir = "out-shakespeare-char-cpu"
eval_interval = 250
eval_iters = 20
log_interval = 10
always_save_checkpoint = False

dataset = "shakespeare_char"
gradient_accumulation_steps = 1
batch_size = 12
block_size = 64

n_layer = 4
n_head = 4
n_embd = 128
dropout = 0.0

learning_rate = 1e-3
max_iters = 2000
lr_decay_iters = 2000
beta2 = 0.99
warmup_iters = 100

device = "cpu"
dtype = "float32"  # CPUs without native bf16 run it hundreds of times slower
compile = False  # compiling costs more than it saves on a run this short
