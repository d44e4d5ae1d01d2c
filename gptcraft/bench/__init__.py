"""Speed benchmarks: training, sampling, the CPU speedrun, corpus preparation."""
