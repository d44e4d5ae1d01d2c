"""gptcraft attention: the weights are the explicit equation's, rows sum to one, the future is masked;
the PNG has the grid's size, token labels and a white upper triangle; char, BPE and GPT-2 weights."""

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import GPT2_TIKTOKEN
from PIL import Image
from test_hf import random_hf_model
from transformers import GPT2LMHeadModel

from gptcraft.config import ConfigError
from gptcraft.data.shards import write_meta
from gptcraft.data.tokenizer import GPT2_META, CharTokenizer, GPT2Tokenizer
from gptcraft.load import load_model
from gptcraft.model import GPT, GPTConfig
from gptcraft.runs.checkpoint import save_checkpoint
from gptcraft.visualize import attention, png


def write_run(out_dir, meta, **model_args):
    """A run directory with a random model whose weights are large enough to give uneven attention."""
    args = {**dict(n_layer=2, n_head=2, n_embd=32, block_size=32, vocab_size=meta["vocab_size"]), **model_args}
    torch.manual_seed(0)
    model = GPT(GPTConfig(**args)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_checkpoint(out_dir / "ckpt.pt", {"model": model.state_dict(), "model_args": args})
    write_meta(out_dir, meta)
    return model


@pytest.fixture(scope="module")
def char_meta(shakespeare_path):
    return CharTokenizer.from_text(shakespeare_path.read_text()).meta()


def rotate_pairs(t, angle):
    """Each channel pair (t_i, t_{i + hs/2}) of t (1, nh, T, hs) turned by angle (T, hs/2)."""
    a, b = t.chunk(2, dim=-1)
    return torch.cat((a * angle.cos() - b * angle.sin(), a * angle.sin() + b * angle.cos()), dim=-1)


def equation_weights(model, idx):
    """Layer 0's softmax(Q K^T / sqrt(d_k) + M), written out from the parameters: (nh, T, T)."""
    cfg, T = model.config, idx.size(1)
    pos = torch.arange(T)
    block = model.transformer.h[0]
    x = block.ln_1(model.transformer.wte(idx) + model.position_embedding(pos))  # (1, T, C)
    q, k, _ = block.attn.c_attn(x).split(cfg.n_embd, dim=2)
    hs = cfg.n_embd // cfg.n_head
    q, k = (t.view(1, T, cfg.n_head, hs).transpose(1, 2) for t in (q, k))  # (1, nh, T, hs)
    if cfg.pos_embedding == "rope":
        angle = pos[:, None] * 10000.0 ** (-torch.arange(0, hs, 2) / hs)  # (T, hs/2)
        q, k = rotate_pairs(q, angle), rotate_pairs(k, angle)
    mask = torch.full((T, T), -math.inf).triu(1)  # -inf above the diagonal, 0 on and below
    return F.softmax(q @ k.transpose(-2, -1) / math.sqrt(hs) + mask, dim=-1)[0]


@pytest.mark.parametrize("pos_embedding", ["learned", "sinusoidal", "rope"])
def test_weights_are_the_explicit_equation_rows_sum_to_one_future_is_zero(tmp_path, char_meta, pos_embedding):
    model = write_run(tmp_path, char_meta, pos_embedding=pos_embedding, attention="explicit")
    idx = torch.randint(0, char_meta["vocab_size"], (1, 12))
    maps = attention.attention_maps(model, idx)
    assert maps.shape == (2, 2, 12, 12)
    with torch.no_grad():
        torch.testing.assert_close(maps[0], equation_weights(model, idx), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(maps.sum(-1), torch.ones(2, 2, 12))
    seen = torch.ones(12, 12, dtype=torch.bool).tril()  # (T, T): keys at or before the query
    assert (maps[..., ~seen] == 0).all() and (maps[..., seen] > 0).all()
    assert maps[0, 0, -1].std() > 0.01  # uneven weights: a uniform map could not tell the equation apart
    # Every layer's maps are those its forward pass multiplies the values by: weights @ V = what c_proj receives.
    received, values = [], []
    for block in model.transformer.h:
        block.attn.c_proj.register_forward_pre_hook(lambda m, args: received.append(args[0]))
        block.attn.register_forward_pre_hook(lambda m, args: values.append(m.heads(*args[:2])[2]))
    with torch.no_grad():
        model(idx)
    for layer in range(2):
        merged = (maps[layer] @ values[layer][0]).transpose(0, 1).reshape(12, 32)  # (T, C): heads side by side
        torch.testing.assert_close(merged, received[layer][0], rtol=1e-5, atol=1e-6)


def white(pixel):
    return all(channel > 250 for channel in pixel[:3])


def test_char_run_png_size_labels_and_white_upper_triangle(tmp_path, char_meta, capsys):
    write_run(tmp_path / "run", char_meta)
    out = tmp_path / "maps.png"
    attention.main([f"--out_dir={tmp_path / 'run'}", "--start=ROMEO: hi", "--layers=1", "--heads=0,1",
                    f"--output={out}", "--device=cpu"])  # fmt: skip
    assert capsys.readouterr().out.strip() == f"wrote {out} (1 layers x 2 heads, 9 tokens)"
    width, height = attention.figure_inches(1, 2, 9, attention.figure_title(tmp_path / "run"))
    with Image.open(out) as image:
        assert image.size == (round(width * png.DPI), round(height * png.DPI))

    # The figure itself: titles, tick labels, and the pixels of a masked and an unmasked cell.
    tok = CharTokenizer(char_meta["chars"])
    ids = tok.encode("ROMEO: hi")
    labels = attention.token_labels(tok, ids)
    assert labels == ["R", "O", "M", "E", "O", ":", "␣", "h", "i"]
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=32, vocab_size=65)).eval()
    maps = attention.attention_maps(model, torch.tensor([ids]))
    fig = attention.draw(maps, labels, [1], [0, 1], "title")
    fig.canvas.draw()
    pixels = np.asarray(fig.canvas.buffer_rgba())
    for ax, head in zip(fig.axes[:2], [0, 1], strict=True):
        assert ax.get_title() == f"layer 1, head {head}"
        assert [t.get_text() for t in ax.get_xticklabels()] == labels
        assert [t.get_text() for t in ax.get_yticklabels()] == labels

        def pixel(row, col, ax=ax):
            x, y = ax.transData.transform((col, row))  # display coordinates count y from the bottom
            return pixels[pixels.shape[0] - int(y), int(x)]

        assert white(pixel(0, 8)) and white(pixel(3, 4))  # keys after the query: masked, drawn empty
        assert not white(pixel(0, 0)) and not white(pixel(8, 0))  # weight 1 and a small weight, coloured


def test_bpe_run_labels_show_the_spaces_of_gpt2_tokens(tmp_path):
    write_run(tmp_path / "run", GPT2_META, n_layer=1, n_embd=16)
    attention.main([f"--out_dir={tmp_path / 'run'}", "--start=The cat sat", "--device=cpu",
                    f"--tokenizer_file={GPT2_TIKTOKEN}"])  # fmt: skip
    assert (tmp_path / "run" / "attention.png").exists()  # without --output: next to the run's checkpoint
    tok = GPT2Tokenizer(GPT2_TIKTOKEN)
    assert attention.token_labels(tok, tok.encode("The cat sat\n$5 é")) == ["The", "␣cat", "␣sat", "↵", r"\$", "5",
                                                                            "␣é"]  # fmt: skip
    lead_byte = tok.enc.encode_single_token(b"\xc3")  # the first byte of a two-byte character such as é
    assert attention.token_labels(tok, [lead_byte]) == ["�"]


def test_gpt2_weights_from_a_hugging_face_folder_match_transformers(tmp_path, char_meta):
    hf_dir = tmp_path / "hf"
    random_hf_model(hf_dir)
    (hf_dir / "meta.json").write_text(json.dumps(char_meta))
    out = tmp_path / "maps.png"
    attention.main([f"--init_from={hf_dir}", f"--output={out}", "--device=cpu"])
    assert out.exists()
    model, tok = load_model(str(hf_dir), None, "cpu")
    idx = torch.tensor([tok.encode("ROMEO:\nBut soft")])
    reference = GPT2LMHeadModel.from_pretrained(hf_dir, attn_implementation="eager").eval()
    with torch.no_grad():
        expected = torch.cat(reference(idx, output_attentions=True).attentions)  # (n_layer, nh, T, T)
    torch.testing.assert_close(attention.attention_maps(model, idx), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--layers=2"], "layers=2 names layer 2, but the model's are numbered 0 to 1"),
        (["--heads=0,-1"], "heads=0,-1 names head -1, but they are counted from 0"),
        (["--heads=first"], "heads expects all or indices separated by commas"),
        (["--start=" + "a" * 33], "the prompt is 33 tokens; the maps take at most 32"),
        (["--output=maps.jpg"], "output is a PNG image"),
        (["--start=ROMEO€"], "characters not in the vocabulary: '€'"),
    ],
)
def test_bad_input_is_one_clear_error_and_writes_nothing(tmp_path, char_meta, args, message):
    write_run(tmp_path / "run", char_meta)
    with pytest.raises(ConfigError, match=message):
        attention.main([f"--out_dir={tmp_path / 'run'}", f"--output={tmp_path / 'maps.png'}", *args])
    assert not (tmp_path / "maps.png").exists()


def test_a_grid_too_large_to_draw_asks_for_fewer_layers_or_heads(tmp_path, char_meta):
    write_run(tmp_path / "run", char_meta, n_layer=12, n_head=8, n_embd=32, block_size=128)
    with pytest.raises(ConfigError, match="pixel image; pick fewer with --layers and --heads"):
        attention.main([f"--out_dir={tmp_path / 'run'}", "--start=" + "a" * 100, f"--output={tmp_path / 'm.png'}"])


def test_a_single_map_keeps_its_whole_title(char_meta):
    model = GPT(GPTConfig(n_layer=1, n_head=1, n_embd=16, block_size=16, vocab_size=65)).eval()
    maps = attention.attention_maps(model, torch.tensor([[1, 2, 3, 4, 5, 6]]))
    fig = attention.draw(maps, list("ROMEO:"), [0], [0], attention.figure_title("out-shakespeare-char-cpu-long-name"))
    fig.canvas.draw()
    box = fig._suptitle.get_window_extent()
    assert 0 <= box.x0 and box.x1 <= fig.bbox.width
