# OpenAI's GPT-2 774M (init_from="gpt2-large") scored on OpenWebText, without training.
# python train.py configs/eval_gpt2_large.py   (after preparing OpenWebText)
# nanoGPT reports a val loss of about 2.67 for it.
init_from = "gpt2-large"
eval_only = True  # evaluate once and exit: no training step, no checkpoint
dataset = "openwebtext"
out_dir = "out-eval-gpt2-large"
batch_size = 8
eval_iters = 500  # 500 batches of 8 x 1024 tokens: about 4M tokens per split
compile = False  # one evaluation does not repay the compile time
