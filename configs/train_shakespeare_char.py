# The baby GPT on tiny Shakespeare characters, for one GPU (about 10.7M parameters).
out_dir = "out-shakespeare-char"
eval_interval = 250  # the model overfits quickly on this small dataset: evaluate often
eval_iters = 200
log_interval = 10
always_save_checkpoint = False  # keep the checkpoint with the best val loss

dataset = "shakespeare_char"
gradient_accumulation_steps = 1
batch_size = 64
block_size = 256  # 256 characters of context

n_layer = 6
n_head = 6
n_embd = 384
dropout = 0.2

learning_rate = 1e-3  # small networks can take a larger rate; min_lr follows at a tenth
max_iters = 5000
lr_decay_iters = 5000
beta2 = 0.99  # more tokens per step than the default: less smoothing needed
warmup_iters = 100
