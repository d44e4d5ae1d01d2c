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


@pytest.fixture
def lines_drawn(monkeypatch):
    """{label: (xs, ys)} of the lines on the figures plot draws, kept when it closes them."""
    figures, close = [], plot.plt.close
    monkeypatch.setattr(plot.plt, "close", figures.append)
    yield lambda: {line.get_label(): (list(line.get_xdata()), list(line.get_ydata()))
                   for fig in figures for line in fig.axes[0].get_lines()}  # fmt: skip
    for fig in figures:
        close(fig)


# x of the point logged at iteration `it` (train row; an eval row is 0.1 s later), as write_log writes them
X_OF = {"iter": lambda it, val: it, "time": lambda it, val: it * 0.5 + (0.1 if val else 0.0),
        "tokens": lambda it, val: it * 256}  # fmt: skip


@pytest.mark.parametrize("x", ["iter", "time", "tokens"])
def test_several_runs(tmp_path, x, lines_drawn):
    runs = [write_log(tmp_path / "a", start=4.0), write_log(tmp_path / "b" / "run", iters=200, start=3.0)]
    out = tmp_path / f"compare_{x}.png"
    plot.main([*map(str, runs), "--x", x, "-o", str(out)])
    check_png(out)
    lines = lines_drawn()
    assert sorted(lines) == ["a train", "a val", "run train", "run val"]
    for name, start, iters in (("a", 4.0, 100), ("run", 3.0, 200)):
        train = range(10, iters + 1, 10)
        xs, ys = lines[f"{name} train"]
        assert xs == pytest.approx([X_OF[x](it, False) for it in train])  # seconds: the longest run is 100 s
        assert ys == pytest.approx([start * math.exp(-it / 80) + 1.5 for it in train])
        xs, ys = lines[f"{name} val"]
        assert xs == pytest.approx([X_OF[x](it, True) for it in range(0, iters + 1, 50)])
        assert ys == pytest.approx([start * math.exp(-it / 80) + 1.6 for it in range(0, iters + 1, 50)])


def test_legend_names_runs_apart(tmp_path):
    assert plot.run_names(["x/out", "y/out", "z/other/"]) == ["x/out", "y/out", "other"]


def test_truncated_log_plots_what_is_there(tmp_path, capsys):
    run = write_log(tmp_path / "killed", truncate=True)
    out = tmp_path / "loss.png"
    plot.main([str(run), "-o", str(out)])
    check_png(out)
    assert "line 15 is incomplete" in capsys.readouterr().err


BAD_ROWS = [b'{"iter": "5", "loss": 1.0}', b'{"iter": 7, "loss": "low"}', b'{"event": "start", "iter": null}',
            b'{"event": 3, "iter": 1}', b"[1, 2]", b'{"iter": 8, "loss": true}', b'{"time_s": "x", "iter": 9}',
            b'{"event": "start", "iter": 0, "wandb_id": 5}', b'{"iter": 9, "loss": "\xff"}', b"\xff\xfe"]  # fmt: skip


def test_rows_of_the_wrong_types_are_skipped_with_a_warning(tmp_path, capsys):
    """A damaged or hand-edited log.jsonl: each row a reader cannot compute with is one warning."""
    run = write_log(tmp_path / "run")
    with open(run / "log.jsonl", "ab") as f:
        f.write(b"\n".join(BAD_ROWS) + b"\n")
    out = tmp_path / "loss.png"
    plot.main([str(run), "-o", str(out), "--x", "time"])
    check_png(out)
    assert capsys.readouterr().err.count("is incomplete, corrupt or of the wrong types") == len(BAD_ROWS)


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
