"""gptcraft positions: the tables and similarities it draws are the model's encodings, defined as documented."""

import math

import pytest
import torch
from conftest import run_here
from PIL import Image

from gptcraft.config import ConfigError
from gptcraft.model import sinusoidal_positions
from gptcraft.runs.checkpoint import load_checkpoint, save_checkpoint
from gptcraft.visualize import positions


def offsets_only(similarity):
    """True when similarity[m, n] depends on m - n alone (constant along every diagonal)."""
    T = similarity.size(0)
    return all(torch.allclose(similarity.diagonal(d), similarity[0, d].expand(T - d), atol=1e-5) for d in range(T))


def test_sinusoidal_and_rope_similarities_depend_on_the_offset_alone():
    columns = positions.panels(block_size=20, n_embd=16, n_head=2)
    assert [c[0] for c in columns] == ["sinusoidal, d=16", "rope, head size 8: cos(pos θ_i)"]
    (_, pe, pe_sim), (_, rope_cos, rope_sim) = columns
    torch.testing.assert_close(pe, sinusoidal_positions(20, 16))
    assert pe_sim.shape == rope_sim.shape == (20, 20) and rope_cos.shape == (20, 4)
    for similarity in (pe_sim, rope_sim):
        torch.testing.assert_close(similarity.diagonal(), torch.ones(20))
        assert offsets_only(similarity) and similarity.min() < 0.9
    # rope: the mean over channel pairs of cos((m - n) theta_i), theta_i = 10000^(-2i/hs).
    theta = 10000.0 ** (-torch.arange(0, 8, 2) / 8)
    for m, n in [(0, 5), (7, 3), (19, 0)]:
        assert rope_sim[m, n].item() == pytest.approx(torch.cos((m - n) * theta).mean().item(), abs=1e-5)
        assert rope_cos[m, 1].item() == pytest.approx(math.cos(m * theta[1].item()), abs=1e-5)
    # sinusoidal: PE_m . PE_n = sum_i cos((m - n) omega_i), and every row has length sqrt(d/2).
    omega = 10000.0 ** (-torch.arange(0, 16, 2) / 16)
    assert pe_sim[3, 11].item() == pytest.approx(torch.cos(8 * omega).mean().item(), abs=1e-5)


def test_learned_table_of_a_run_is_drawn_next_to_the_fixed_ones(tmp_path, tiny_run_dir, capsys):
    out = tiny_run_dir / "positions.png"  # without --output: next to the run's checkpoint
    positions.main(["--init_from=resume", f"--out_dir={tiny_run_dir}"])
    printed = capsys.readouterr().out.strip()
    names = f"sinusoidal, d=32; {tiny_run_dir} (learned), d=32; rope, head size 16: cos(pos θ_i)"
    assert printed == f"wrote {out} ({names})"
    with Image.open(out) as image:
        assert image.size == (3 * 450, 900)  # three columns of 4.5 x 9 inches at 100 dpi
    wpe = load_checkpoint(tiny_run_dir / "ckpt.pt")["model"]["transformer.wpe.weight"]
    args = dict(block_size=32, n_embd=32, n_head=2, learned=wpe, learned_name="run")
    _, table, similarity = positions.panels(**args)[1]
    torch.testing.assert_close(table, wpe)
    unit = wpe / wpe.norm(dim=1, keepdim=True)
    assert similarity[4, 9].item() == pytest.approx((unit[4] @ unit[9]).item(), abs=1e-6)
    fig = positions.draw(positions.panels(**args), "title")
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]  # the top row, then the bottom one
    assert titles == ["sinusoidal, d=32", "run (learned), d=32", "rope, head size 16: cos(pos θ_i)",
                      *["cosine similarity of positions"] * 3]  # fmt: skip


def test_fixed_tables_only_through_the_gptcraft_command(tmp_path):
    out = tmp_path / "pos.png"
    result = run_here("-m", "gptcraft", "positions", "--block_size=16", "--n_embd=8", "--n_head=2", f"--output={out}")
    assert result.stdout.strip() == f"wrote {out} (sinusoidal, d=8; rope, head size 4: cos(pos θ_i))"
    with Image.open(out) as image:
        assert image.size == (900, 900)


def test_bad_input_is_one_clear_error(tmp_path, tiny_run_dir):
    out = f"--output={tmp_path / 'pos.png'}"
    run = ["--init_from=resume", f"--out_dir={tiny_run_dir}", out]
    with pytest.raises(ConfigError, match="block_size=64, but the learned table has only 32 positions"):
        positions.main([*run, "--block_size=64"])
    with pytest.raises(ConfigError, match=r"n_embd \(30\) must split into 4 heads of an even size"):
        positions.main(["--n_embd=30", "--n_head=4", out])
    with pytest.raises(ConfigError, match="output is a PNG image"):
        positions.main(["--output=pos.svg"])
    with pytest.raises(ConfigError, match=r"block_size must be >= 0 \(0: the model's, or the default\), got -1"):
        positions.main(["--block_size=-1", out])
    ckpt = load_checkpoint(tiny_run_dir / "ckpt.pt")
    ckpt["model_args"]["pos_embedding"] = "rope"
    del ckpt["model"]["transformer.wpe.weight"]
    save_checkpoint(tiny_run_dir / "ckpt.pt", ckpt)
    with pytest.raises(ConfigError, match="uses rope positions, not a learned table"):
        positions.main(run)
    assert not (tmp_path / "pos.png").exists()


def test_help_names_the_gptcraft_command(capsys):
    with pytest.raises(SystemExit) as e:
        positions.main(["--help"])
    assert e.value.code == 0
    assert capsys.readouterr().out.startswith("usage: gptcraft positions [CONFIG.py ...] [--key=value ...]")


def test_every_axis_has_whole_number_ticks():
    # rope with head size 4 has 2 channel pairs: matplotlib's own ticks would be 0, 0.5, 1
    fig = positions.draw(positions.panels(8, 8, 2), "t")
    fig.canvas.draw()
    ticks = [t for ax in fig.axes if ax.get_label() != "<colorbar>" for t in [*ax.get_xticks(), *ax.get_yticks()]]
    assert ticks and all(t == int(t) for t in ticks)
