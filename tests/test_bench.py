"""bench.py: trains through train.py on random tokens, samples through generate.py, writes JSON."""

import json
import os
import time

import pytest
from conftest import run_script, tiny_train_args

from gptcraft.bench import speed
from gptcraft.config import run_cli
from gptcraft.errors import GptcraftError
from gptcraft.train import loop
from tools import time_nanogpt

TINY = ["--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=32", "--batch_size=4",
        "--gradient_accumulation_steps=2", "--vocab_size=65", "--compile=False", "--dtype=float32"]  # fmt: skip


def test_bench_cpu_writes_table_and_json(tmp_path):
    out = tmp_path / "bench.json"
    result = run_script("bench.py", *TINY, "--device=cpu", "--bench_iters=2", "--sample_tokens=40", "--json", out)
    r = json.loads(out.read_text())
    t, s = r["training"], r["sampling"]
    assert t["tokens_per_iter"] == 2 * 4 * 32
    assert t["ms_per_iter"] > 0 and t["tokens_per_s"] == pytest.approx(t["tokens_per_iter"] / t["ms_per_iter"] * 1e3)
    assert r["peak_flops"] > 1e9 and 0 < t["mfu"] < 1  # against the measured fp32 matmul peak
    assert t["mfu"] == pytest.approx(r["flops_per_token"] * t["tokens_per_s"] / r["peak_flops"])
    assert t["peak_memory_bytes"] > 10 * 2**20
    assert s["prompt_tokens"] == 16 and s["new_tokens"] == 40
    assert s["decode_tokens_per_s_cached"] > 0 and s["decode_tokens_per_s_full"] > 0
    assert s["weight_bytes"] == 4 * r["params"]  # fp32: every weight that does matmul work, read once a step
    assert s["memory_bandwidth"] > 1e8 and s["bandwidth_bound"] == s["memory_bandwidth"] / s["weight_bytes"]
    assert s["fraction_of_bound"] == pytest.approx(s["decode_tokens_per_s_cached"] / s["bandwidth_bound"])
    # The matmuls alone are part of a decoding step: faster than the whole step.
    assert s["matmul_tokens_per_s"] > s["decode_tokens_per_s_cached"] > 0
    assert s["fraction_of_matmuls"] == pytest.approx(s["decode_tokens_per_s_cached"] / s["matmul_tokens_per_s"])
    assert r["config"]["n_embd"] == 32 and r["device"].startswith("cpu")
    for line in (
        "tokens/s",
        "MFU",
        "decode tokens/s, KV cache",
        "bound: weights / bandwidth",
        "best decode / bound",
        "best decode / matmuls alone",
    ):
        assert line in result.stdout


def test_bench_reads_config_files_and_skips_parts(tmp_path, monkeypatch):
    monkeypatch.setattr(speed.hardware, "peak_flops", lambda device, dtype: 1e11)  # skip the matmul measurement
    out = tmp_path / "b.json"
    args = ["configs/train_shakespeare_char_cpu.py", *TINY, "--bench_iters=0", "--sample_tokens=5",
            "--sample_batch=3", f"--json={out}"]  # fmt: skip
    speed.main(args)
    r = json.loads(out.read_text())
    assert "training" not in r and r["sampling"]["new_tokens"] == 5 and r["sampling"]["batch"] == 3
    assert r["config"]["dataset"] == "shakespeare_char" and r["config"]["eval_interval"] == 250


def test_vocab_size_falls_back_to_known_datasets(tmp_path):
    cfg = speed.parse_args(["--dataset=shakespeare_char", f"--data_dir={tmp_path}"])
    assert speed.vocab_size(cfg) == 65
    assert speed.vocab_size(speed.parse_args([f"--data_dir={tmp_path}"])) == 50304


@pytest.mark.parametrize(
    "args, message",
    [(["--json"], "--json needs a path"), (["--bench_iters=-1"], "bench_iters must not be negative"),
     (["--prompt_tokens=99", "--block_size=32"], "prompt_tokens (99) must not exceed block_size"),
     (["--sample_batch=0"], "sample_batch and repeats must be positive"),
     (["--nanogpt_dir=/no/such/dir"], "--nanogpt_dir=/no/such/dir holds no train.py: point it at a nanoGPT checkout"),
     (["--nanogpt_dir=.", "--bench_iters=0"], "--nanogpt_dir times training steps")],
)  # fmt: skip
def test_bad_arguments_fail_fast(args, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda: speed.main(args, reference=time_nanogpt))  # as bench.py at the root runs it
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_the_nanogpt_side_by_side_needs_the_checkout_tools(tmp_path, capsys):
    """tools/ is not installed: `gptcraft bench` says where --nanogpt_dir runs, before any work."""
    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda: speed.main([f"--nanogpt_dir={tmp_path}"]))
    assert exit_info.value.code == 2 and "run python bench.py from a gptcraft checkout" in capsys.readouterr().err


@pytest.mark.cuda
def test_bench_cuda_compiled_bf16(tmp_path):
    out = tmp_path / "bench.json"
    args = [a for a in TINY if not a.startswith(("--compile", "--dtype"))]
    run_script("bench.py", *args, "--device=cuda", "--bench_iters=3", "--sample_tokens=20", "--json", out)
    r = json.loads(out.read_text())
    assert r["dtype"] in ("bfloat16", "float16") and r["compile"] is True
    assert r["training"]["tokens_per_s"] > 0 and r["training"]["peak_memory_bytes"] > 0
    assert r["sampling"]["decode_tokens_per_s_cached"] > 0


def test_speedrun_times_whole_runs_without_touching_the_configs_out_dir(char_data_dir, tmp_path):
    out = tmp_path / "s.json"
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "ckpt.pt").write_text("a real run")  # bench runs its own, never here
    args = tiny_train_args(char_data_dir, tmp_path / "run", max_iters=4, eval_interval=4, log_interval=2, eval_iters=1)
    t0 = time.perf_counter()
    result = run_script("bench.py", *args, "--speedrun=2", "--json", out)
    wall = time.perf_counter() - t0
    r = json.loads(out.read_text())["speedrun"]
    assert len(r["runs"]) == 2 and "training" not in json.loads(out.read_text())
    assert all(run["seconds"] > 0 for run in r["runs"]) and sum(run["seconds"] for run in r["runs"]) < wall
    assert os.listdir(tmp_path / "run") == ["ckpt.pt"] and (tmp_path / "run" / "ckpt.pt").read_text() == "a real run"
    # The loss over every val token of the weights the run ends with: the same run here gives it.
    same = tiny_train_args(char_data_dir, tmp_path / "same", max_iters=4, eval_interval=4, log_interval=2,
                           eval_iters=1, full_val=True)  # fmt: skip
    loop.main(same)
    rows = [json.loads(line) for line in (tmp_path / "same" / "log.jsonl").read_text().splitlines()]
    full_val = [row["full_val_loss"] for row in rows if "full_val_loss" in row]
    assert r["runs"][-1]["full_val_loss"] == pytest.approx(full_val[-1])
    assert r["median_full_val_loss"] == pytest.approx(r["runs"][0]["full_val_loss"])  # same seed, same run
    assert "run 2:" in result.stdout and "median" in result.stdout


def test_speedrun_needs_the_last_step_logged():
    with pytest.raises(GptcraftError, match="log_interval"):
        speed.parse_args(["--speedrun=1", "--max_iters=10", "--log_interval=3"])


def test_nanogpt_is_timed_side_by_side_from_its_own_log_lines(tmp_path, monkeypatch, capsys):
    """A stand-in for a nanoGPT checkout: its train.py checks the data it is given and prints
    nanoGPT's step lines, 7 ms each except the warm-up steps, which must not count."""
    for name in ("model.py", "configurator.py"):
        (tmp_path / name).write_text("")
    (tmp_path / "train.py").write_text(
        "import os, pickle, sys\n"
        "args = dict(a[2:].split('=', 1) for a in sys.argv[1:])\n"
        "assert pickle.load(open('data/bench/meta.pkl', 'rb')) == {'vocab_size': 65}\n"
        "assert os.path.getsize('data/bench/train.bin') >= 2 * 4 * 33 and args['n_embd'] == '32'\n"
        "n = int(args['max_iters'])\n"
        "for i in range(n + 1):\n"
        "    print(f'iter {i}: loss 4.1000, time {99.0 if i <= n // 2 else 7.0:.2f}ms, mfu -100.00%')\n"
    )
    monkeypatch.setattr(speed.hardware, "peak_flops", lambda device, dtype: 1e11)
    r = speed.main(
        [*TINY, "--bench_iters=2", "--sample_tokens=0", f"--nanogpt_dir={tmp_path}", "--repeats=3"],
        reference=time_nanogpt,
    )
    t = r["training"]
    assert t["nanogpt_ms_per_iter"] == [7.0, 7.0, 7.0] and len(t["runs_ms_per_iter"]) == 3
    assert t["ms_per_iter"] == sorted(t["runs_ms_per_iter"])[1]  # the median run
    assert t["speedup_vs_nanogpt"] == pytest.approx(7.0 / t["ms_per_iter"])
    assert "speed-up vs nanoGPT" in capsys.readouterr().out
