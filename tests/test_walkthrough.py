"""docs/walkthrough.md: every line link points at the code it names; and the walkthrough's equations
that no other test demonstrates (LayerNorm, GELU, multi-head split and merge, the schedule, AdamW's groups).

A line link is [`code`](path#L12) or [`code`](path#L12-L14): the code in backticks must appear on
that line, or on one of those lines, so a link that drifts when the file is edited fails here.
"""

import math
import re

import pytest
import torch
import torch.nn.functional as F
from conftest import ROOT

from gptcraft.model import GPT, GPTConfig
from gptcraft.train.loop import TrainConfig, learning_rate
from gptcraft.train.optimizer import make_optimizer

WALKTHROUGH = ROOT / "docs" / "walkthrough.md"
LINK = re.compile(r"\[([^\]]*)\]\(([^)\s]+)\)")  # [text](target)
LINE_LINK = re.compile(r"`([^`]+)`\Z"), re.compile(r"(?P<path>[^#]+)#L(?P<first>\d+)(?:-L(?P<last>\d+))?\Z")


def links(text):
    return [(m.group(1), m.group(2), text.count("\n", 0, m.start()) + 1) for m in LINK.finditer(text)]


def check_link(doc, text, target):
    """None if target (relative to doc) exists and, for a line link, holds the code of text; else the problem."""
    if target.startswith(("http://", "https://")):
        return None
    path_part = target.split("#")[0]
    path = (doc.parent / path_part).resolve()
    if not path.exists():
        return f"{path_part} does not exist"
    if "#" not in target:
        return None
    code, where = LINE_LINK[0].fullmatch(text), LINE_LINK[1].fullmatch(target)
    if not code or not where:
        return "a line link is [`code on that line`](path#L12) or (path#L12-L14)"
    lines = path.read_text().splitlines()
    first, last = int(where["first"]), int(where["last"] or where["first"])
    if not 1 <= first <= last <= len(lines):
        return f"{path_part} has {len(lines)} lines, not {first}-{last}"
    snippet = code.group(1)
    if any(snippet in line for line in lines[first - 1 : last]):
        return None
    found = [str(i) for i, line in enumerate(lines, 1) if snippet in line]
    return f"{snippet!r} is not on line(s) {first}-{last} of {path_part}; it is on line(s) {', '.join(found) or 'none'}"


def test_every_link_of_the_walkthrough_points_at_its_code():
    found = links(WALKTHROUGH.read_text())
    assert sum("#L" in target for _, target, _ in found) >= 30
    problems = [(n, check_link(WALKTHROUGH, text, target)) for text, target, n in found]
    problems = [f"docs/walkthrough.md line {n}: {problem}" for n, problem in problems if problem]
    assert not problems, "\n".join(problems)


def test_the_link_check_catches_drifted_missing_and_malformed_links(tmp_path):
    doc = tmp_path / "docs" / "walk.md"
    doc.parent.mkdir()
    (tmp_path / "code.py").write_text("a = 1\nb = a + 1\n")
    assert check_link(doc, "`b = a + 1`", "../code.py#L2") is None
    assert check_link(doc, "`a = 1`", "../code.py#L1-L2") is None
    assert check_link(doc, "`b = a + 1`", "../code.py#L1") == (
        "'b = a + 1' is not on line(s) 1-1 of ../code.py; it is on line(s) 2"
    )
    assert check_link(doc, "`a = 1`", "../code.py#L3") == "../code.py has 2 lines, not 3-3"
    assert check_link(doc, "`a = 1`", "../gone.py#L1") == "../gone.py does not exist"
    assert check_link(doc, "a = 1", "../code.py#L1").startswith("a line link is")
    assert [(t, target) for t, target, _ in links("see [`x`](a.py#L1) and [docs](b.md)")] == [
        ("`x`", "a.py#L1"), ("docs", "b.md")]  # fmt: skip


def tiny(**overrides):
    torch.manual_seed(0)
    model = GPT(GPTConfig(**{**dict(block_size=16, vocab_size=65, n_layer=1, n_head=4, n_embd=32), **overrides}))
    with torch.no_grad():  # GPT-2's init sets gains to 1 and biases to 0: make them count
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def test_layernorm_is_the_formula():
    ln, x = tiny().transformer.h[0].ln_1, torch.randn(2, 5, 32) * 3 + 1
    mean, var = x.mean(-1, keepdim=True), x.var(-1, unbiased=False, keepdim=True)
    with torch.no_grad():
        torch.testing.assert_close(ln(x), (x - mean) / torch.sqrt(var + 1e-5) * ln.weight + ln.bias)


def test_gelu_mlp_is_the_formula():
    mlp, x = tiny().transformer.h[0].mlp, torch.randn(2, 5, 32)
    h = x @ mlp.c_fc.weight.T + mlp.c_fc.bias  # (B, T, 4C)
    gelu = 0.5 * h * (1 + torch.tanh(math.sqrt(2 / math.pi) * (h + 0.044715 * h**3)))
    with torch.no_grad():
        torch.testing.assert_close(mlp(x), gelu @ mlp.c_proj.weight.T + mlp.c_proj.bias)


@pytest.mark.parametrize("attention", ["sdpa", "explicit"])
def test_multi_head_attention_is_each_head_on_its_slice_then_concatenated(attention):
    attn, x = tiny(attention=attention).transformer.h[0].attn, torch.randn(2, 6, 32)
    Wq, Wk, Wv = attn.c_attn.weight.split(32)  # each (C, C): rows are output channels
    bq, bk, bv = attn.c_attn.bias.split(32)
    future = torch.ones(6, 6, dtype=torch.bool).triu(1)
    heads = []
    for h in range(4):  # head h reads channels 8h .. 8h+7 of q, k and v
        s = slice(8 * h, 8 * h + 8)
        q, k, v = (x @ W[s].T + b[s] for W, b in ((Wq, bq), (Wk, bk), (Wv, bv)))  # each (B, T, hs)
        scores = (q @ k.transpose(-2, -1) / math.sqrt(8)).masked_fill(future, -math.inf)
        heads.append(F.softmax(scores, dim=-1) @ v)
    y = torch.cat(heads, dim=-1)  # (B, T, C): the heads side by side
    with torch.no_grad():
        torch.testing.assert_close(attn(x), y @ attn.c_proj.weight.T + attn.c_proj.bias, rtol=1e-5, atol=1e-5)


def test_tied_head_reads_the_token_embedding_backwards():
    model, idx = tiny(), torch.randint(0, 65, (1, 4))
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()
    final = []  # the last LayerNorm's output x, (B, T, C)
    model.transformer.ln_f.register_forward_hook(lambda m, args, out: final.append(out))
    with torch.no_grad():
        logits, _ = model(idx, idx)
        torch.testing.assert_close(logits, final[0] @ model.transformer.wte.weight.T)  # logit_v = x . e_v


def test_warmup_then_cosine_to_min_lr():
    cfg = TrainConfig(learning_rate=1.0, min_lr=0.1, warmup_iters=10, lr_decay_iters=110, max_iters=200)
    assert [learning_rate(cfg, it) for it in (0, 4, 9)] == pytest.approx([1 / 11, 5 / 11, 10 / 11])  # linear
    assert learning_rate(cfg, 10) == pytest.approx(1.0)  # the peak, where the cosine starts
    assert learning_rate(cfg, 60) == pytest.approx(0.55)  # half way: half way between the two rates
    assert learning_rate(cfg, 35) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi / 4)))
    assert learning_rate(cfg, 110) == learning_rate(cfg, 190) == pytest.approx(0.1)


def test_adamw_decays_matrices_only():
    model = tiny()
    opt = make_optimizer(model, TrainConfig(weight_decay=0.1), "cpu")
    assert isinstance(opt, torch.optim.AdamW)
    decay = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    for name, p in model.named_parameters():
        assert decay[id(p)] == (0.1 if p.dim() >= 2 else 0.0), name  # no decay on gains, biases
