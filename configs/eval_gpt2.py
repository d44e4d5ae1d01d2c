# OpenAI's GPT-2 124M (init_from="gpt2") scored on OpenWebText, without training.
# python train.py configs/eval_gpt2.py   (after preparing OpenWebText)
# nanoGPT reports a val loss of about 3.12 for it.
init_from = "gpt2"
eval_only = True  # evaluate once and exit: no training step, no checkpoint
dataset = "openwebtext"
out_dir = "out-eval-gpt2"
batch_size = 8
eval_iters = 500  # 500 batches of 8 x 1024 tokens: about 4M tokens per split
compile = False  # one evaluation does not repay the compile time
