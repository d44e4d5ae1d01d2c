"""Run folders, below training: what sampling, evaluation and export read, and what train.py writes.

checkpoint.py  the checkpoint files (ckpt.pt, ckpt.dcp/, best.pt), written so no crash loses one
resume.py      a run's whole state saved and restored: model, optimizer, scaler, RNG streams
lock.py        one run at a time in an out_dir
start.py       how a run starts there: new, continued or refused, and what a continued run may change
"""
