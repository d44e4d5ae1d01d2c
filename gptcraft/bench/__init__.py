"""Speed benchmarks: training, sampling and the CPU speedrun (bench.py)."""
