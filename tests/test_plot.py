"""plot.py: PNGs of one or several runs' losses, and clear messages for logs it cannot draw."""

import json
import math

import pytest
from conftest import run_here
from PIL import Image

from gptcraft.track import plot

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def write_log(out_dir, iters=100, start=4.2, truncate=False):
    """A log.jsonl like train.py's: a start row, train rows every 10 iters, eval rows every 50."""
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = [{"time_s": 0.0, "event": "start", "iter": 0, "wandb_id": None}]
    for it in range(0, iters + 1, 10):
        loss = start * math.exp(-it / 80) + 1.5
        if it:
            rows.append({"time_s": it * 0.5, "iter": it, "loss": loss, "lr": 1e-3, "tokens_seen": it * 256})
        if it % 50 == 0:
            rows.append({"time_s": it * 0.5 + 0.1, "iter": it, "train_loss": loss, "val_loss": loss + 0.1,
                         "tokens_seen": it * 256})  # fmt: skip
    text = "".join(json.dumps(r) + "\n" for r in rows)
    if truncate:
        text += '{"time_s": 60.0, "iter": 120, "lo'  # killed while writing
    (out_dir / "log.jsonl").write_text(text)
    return out_dir


def check_png(path):
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    with Image.open(path) as image:
        image.load()
        width, height = image.size
    assert 600 <= width <= 2000 and 400 <= height <= 1500


def test_one_run(tmp_path, capsys):
    run = write_log(tmp_path / "run")
    out = tmp_path / "loss.png"
    plot.main([str(run), "-o", str(out)])
    check_png(out)
    assert capsys.readouterr().out.strip() == f"wrote {out}"


@pytest.mark.parametrize("x", ["iter", "time", "tokens"])
def test_several_runs(tmp_path, x):
    runs = [write_log(tmp_path / "a", start=4.0), write_log(tmp_path / "b" / "run", iters=200, start=3.0)]
    out = tmp_path / f"compare_{x}.png"
    plot.main([*map(str, runs), "--x", x, "-o", str(out)])
    check_png(out)


def test_legend_names_runs_apart(tmp_path):
    assert plot.run_names(["x/out", "y/out", "z/other/"]) == ["x/out", "y/out", "other"]


def test_truncated_log_plots_what_is_there(tmp_path, capsys):
    run = write_log(tmp_path / "killed", truncate=True)
    out = tmp_path / "loss.png"
    plot.main([str(run), "-o", str(out)])
    check_png(out)
    assert "line 15 is incomplete" in capsys.readouterr().err


def test_default_output_is_the_runs_folder_for_one_run_and_the_working_directory_for_several(tmp_path, monkeypatch):
    a, b = write_log(tmp_path / "a"), write_log(tmp_path / "b")
    monkeypatch.chdir(tmp_path)
    plot.main(["a"])
    check_png(a / "loss.png")
    assert not (tmp_path / "loss.png").exists()
    plot.main(["a", "b"])
    check_png(tmp_path / "loss.png")
    assert not (b / "loss.png").exists()


def errors(tmp_path, *args):
    """Run `python -m gptcraft.track.plot` as a user would; return (exit status, stderr)."""
    result = run_here("-m", "gptcraft.track.plot", *args, cwd=tmp_path)
    assert "Traceback" not in result.stderr
    return result.returncode, result.stderr


def test_bad_input_gives_one_clear_line(tmp_path):
    (tmp_path / "not_a_run").mkdir()
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "log.jsonl").write_text('{"time_s": 0.0, "event": "start", "iter": 0}\n')
    code, err = errors(tmp_path, "not_a_run")
    assert code == 1 and err.strip() == (
        "error: not_a_run: no log.jsonl in this directory; give the out_dir of a train.py run"
    )
    code, err = errors(tmp_path, "missing")
    assert code == 1 and "missing: no log.jsonl in this path (no such directory)" in err
    code, err = errors(tmp_path, "empty")
    assert code == 1 and "log.jsonl has no loss rows yet" in err and "error: no run has logged a loss yet" in err
    assert not (tmp_path / "loss.png").exists() and not (tmp_path / "not_a_run" / "loss.png").exists()
    code, err = errors(tmp_path, "empty", "-o", "loss.jpg")
    assert code == 1 and "ending in .png" in err


def test_an_empty_run_beside_a_good_one_is_left_out(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "log.jsonl").write_text("")
    good = write_log(tmp_path / "good")
    out = tmp_path / "loss.png"
    plot.main([str(tmp_path / "empty"), str(good), "-o", str(out)])
    check_png(out)
    assert "empty: log.jsonl has no loss rows yet" in capsys.readouterr().err


def test_unwritable_output_is_one_line(tmp_path):
    run = write_log(tmp_path / "run")
    out = tmp_path / "no_such_dir" / "loss.png"
    with pytest.raises(SystemExit, match=f"^error: cannot write {out}: No such file or directory$"):
        plot.main([str(run), "-o", str(out)])
