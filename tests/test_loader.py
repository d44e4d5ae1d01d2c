"""The window loader: valid windows across shards, per-rank streams, exact resume, flat memory."""

import os
import types

import numpy as np
import pytest
from conftest import GPT2_TIKTOKEN, tiny_train_args

from gptcraft.data.batches import TRAIN_STREAM, LoaderStateError, WindowSampler
from gptcraft.data.shards import open_shard, write_shard


def shards(tmp_path, sizes):
    """Shards whose token at position i of shard k is (k * 10_000 + i) % 65_536: windows are checkable."""
    files = []
    for k, n in enumerate(sizes):
        path = tmp_path / f"train_{k:06d}.bin"
        write_shard(path, (k * 10_000 + np.arange(n)) % 65_536)
        files.append(open_shard(path))
    return files


def test_windows_are_consecutive_tokens_of_one_shard_and_cover_every_shard(tmp_path):
    files = shards(tmp_path, [500, 40, 3000])  # the middle shard is shorter than a window
    sampler = WindowSampler(files, block_size=64, batch_size=16, seed=0, stream=TRAIN_STREAM)
    seen = set()
    for g in range(50):
        x, y = sampler.batch(g)
        assert x.shape == y.shape == (16, 64)
        assert (y[:, :-1] == x[:, 1:]).all()
        assert ((y[:, -1] - x[:, -1]) % 65_536 == 1).all()  # consecutive, within one shard
        assert ((x[:, 1:] - x[:, :-1]) % 65_536 == 1).all()
        seen.update((x[:, 0] // 10_000).tolist())
    assert seen == {0, 2}


def test_every_start_is_drawn_up_to_the_last_whole_window(tmp_path):
    """A file of block_size + 1 tokens holds exactly one window, one of block_size + 2 two."""
    (tmp_path / "exact").mkdir()
    exact = WindowSampler(shards(tmp_path / "exact", [33]), block_size=32, batch_size=4, seed=0, stream=TRAIN_STREAM)
    assert (exact.windows(0) == np.arange(33)).all()
    two = WindowSampler(shards(tmp_path, [34]), block_size=32, batch_size=8, seed=0, stream=TRAIN_STREAM)
    assert {int(w[0]) for g in range(4) for w in two.windows(g)} == {0, 1}


def test_batches_are_a_pure_function_of_seed_and_index(tmp_path):
    files = shards(tmp_path, [5000, 5000])
    a = WindowSampler(files, 32, 8, seed=1, stream=TRAIN_STREAM, fingerprint="f")
    b = WindowSampler(files, 32, 8, seed=1, stream=TRAIN_STREAM, fingerprint="f")
    run = [a.batch(g)[0] for g in range(10)]  # an uninterrupted run draws batches 0..9
    state = a.state(next_batch=6)  # the checkpoint taken after batch 5
    assert b.check_state(state) == 6  # a fresh process accepts it and goes on from there
    assert all((b.batch(g)[0] == run[g]).all() for g in range(6, 10))
    other = WindowSampler(files, 32, 8, seed=2, stream=TRAIN_STREAM, fingerprint="f")
    with pytest.raises(LoaderStateError, match="seed 1 -> 2"):
        other.check_state(state)
    moved = WindowSampler(files, 32, 8, seed=1, stream=TRAIN_STREAM, fingerprint="g")
    with pytest.raises(LoaderStateError, match="trained on other data"):
        moved.check_state(state)
    with pytest.raises(LoaderStateError, match="records no loader state"):
        a.check_state(None)


def test_ranks_draw_disjoint_batch_numbers_and_different_windows(tmp_path):
    """Under DDP each rank takes its own batch numbers of every step (2 ranks, 3 micro-batches
    each): together they draw each global batch once, and no two batches hold the same windows."""
    from gptcraft.system.distributed import Dist
    from gptcraft.train.setup import Job

    class Recorder:
        def batch(self, g):
            return g

    steps, accum = 10, 3
    drawn = {}
    for rank in (0, 1):
        run = types.SimpleNamespace(d=Dist(rank=rank, world_size=2), accum=accum, first_batch=0,
                                    samplers={"train": Recorder()})  # fmt: skip
        drawn[rank] = [Job.next_batch(run, it, micro) for it in range(steps) for micro in range(accum)]
    assert not set(drawn[0]) & set(drawn[1])
    assert sorted(drawn[0] + drawn[1]) == list(range(2 * accum * steps))
    sampler = WindowSampler(shards(tmp_path, [5000, 5000]), 32, 8, seed=1, stream=TRAIN_STREAM)
    starts = [tuple(sampler.batch(g)[0][:, 0].tolist()) for g in range(2 * accum * steps)]
    assert len(set(starts)) == len(starts)


def resident_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs Linux /proc")
def test_resident_memory_stays_flat_while_reading_a_large_dataset(tmp_path):
    n = 8_000_000  # 3 shards of 16 MB
    files = []
    for k in range(3):
        path = tmp_path / f"s{k}.bin"
        write_shard(path, np.full(n, k, dtype=np.uint16))
        files.append(open_shard(path))
    sampler = WindowSampler(files, block_size=1024, batch_size=32, seed=0, stream=TRAIN_STREAM)
    sampler.batch(0)
    before = resident_bytes()
    for g in range(1, 400):  # touches about 100 MB of pages, twice the dataset
        sampler.batch(g)
    assert resident_bytes() - before < 8 << 20


def test_resume_on_other_data_or_a_too_small_vocabulary_is_refused(tmp_path, char_data_dir, shakespeare_path):
    from gptcraft.errors import GptcraftError
    from gptcraft.prepare import shakespeare
    from gptcraft.train import loop

    out = tmp_path / "out"
    loop.main(tiny_train_args(char_data_dir, out, max_iters=10, eval_interval=10, eval_iters=1))
    other = tmp_path / "data" / "shakespeare_char"
    other.mkdir(parents=True)
    for name in ("meta.json", "val.bin"):
        (other / name).write_bytes((char_data_dir / "shakespeare_char" / name).read_bytes())
    (other / "train.bin").write_bytes((char_data_dir / "shakespeare_char" / "train.bin").read_bytes()[:-1000])
    args = tiny_train_args(tmp_path / "data", out, max_iters=20, eval_interval=10, init_from="resume")
    with pytest.raises(GptcraftError, match="trained on other data"):
        loop.main(args)
    # GPT-2 token ids do not fit the 65-token character model: refused at start, not in a kernel.
    shakespeare.prepare(tmp_path / "data" / "shakespeare", shakespeare_path, GPT2_TIKTOKEN)
    with pytest.raises(GptcraftError, match=r"token ids up to \d+, but the model.s vocab_size is 65"):
        loop.main([*args, "--dataset=shakespeare"])


def test_resumed_training_draws_the_batches_of_an_uninterrupted_run(tmp_path, shakespeare_path, monkeypatch):
    """End to end on GPT-2 shards: which training batches train.py draws, whole and resumed."""
    from gptcraft.prepare import shakespeare
    from gptcraft.train import loop

    shakespeare.prepare(tmp_path / "data" / "shakespeare", shakespeare_path, GPT2_TIKTOKEN)
    drawn, evaluating = [], []
    batch, estimate = WindowSampler.batch, loop.estimate_loss

    def recording(self, g):
        if self.stream == TRAIN_STREAM and not evaluating:
            drawn.append(g)
        return batch(self, g)

    def flagged(*args, **kwargs):
        evaluating.append(True)
        try:
            return estimate(*args, **kwargs)
        finally:
            evaluating.pop()

    monkeypatch.setattr(WindowSampler, "batch", recording)
    monkeypatch.setattr(loop, "estimate_loss", flagged)
    settings = dict(dataset="shakespeare", gradient_accumulation_steps=2, eval_interval=3, eval_iters=1,
                    max_iters=6, lr_decay_iters=6, warmup_iters=1)  # fmt: skip
    loop.main(tiny_train_args(tmp_path / "data", tmp_path / "whole", **settings))
    whole = list(drawn)
    loop.main(tiny_train_args(tmp_path / "data", tmp_path / "cut", **{**settings, "max_iters": 3}))
    drawn.clear()
    loop.main(tiny_train_args(tmp_path / "data", tmp_path / "cut", **settings, init_from="resume"))
    assert whole == list(range(13))  # 6 steps of 2 micro-batches, and the one fetched ahead
    assert drawn == whole[6:]


def test_the_eval_draws_train_batches_the_training_never_draws(char_data_dir, tmp_path, monkeypatch):
    from gptcraft.data.batches import TRAIN_EVAL_STREAM, VAL_STREAM
    from gptcraft.train import loop

    streams, estimate = [], loop.estimate_loss

    def recording(model, samplers, *args):
        streams.extend(s.stream for s in samplers.values())
        return estimate(model, samplers, *args)

    monkeypatch.setattr(loop, "estimate_loss", recording)
    loop.main(tiny_train_args(char_data_dir, tmp_path, max_iters=2, eval_interval=2, eval_iters=1))
    assert streams == [TRAIN_EVAL_STREAM, VAL_STREAM] * 2
