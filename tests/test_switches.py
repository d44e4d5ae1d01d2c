"""The architecture and optimizer switches: off by default, and each does what it says when on."""

import json
import math

import pytest
import torch
from conftest import run_script, tiny_train_args

from gptcraft.model import GPT, GPTConfig, apply_rope, rope_tables
from gptcraft.train import loop, optimizer
from gptcraft.train.loop import TrainConfig, learning_rate
from gptcraft.train.optimizer import Optimizers, make_optimizer


def tiny(**kw):
    torch.manual_seed(0)
    return GPT(GPTConfig(block_size=16, vocab_size=65, n_layer=2, n_head=2, n_embd=32, **kw))


def batch(B=2, T=16):
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 65, (B, T), generator=g), torch.randint(0, 65, (B, T), generator=g)


def test_defaults_keep_gpt2_layout():
    m = tiny()
    c = m.config
    assert (c.pos_embedding, c.qk_norm, c.activation, c.tie_embeddings, c.zero_init_proj, c.logit_softcap) == (
        "learned", False, "gelu", True, False, 0.0)  # fmt: skip
    assert m.lm_head.weight is m.transformer.wte.weight
    names = set(m.state_dict())
    assert "transformer.wpe.weight" in names
    assert not any("norm" in n for n in names)  # GPT-2's names only: ln_1, ln_2, ln_f
    assert TrainConfig().optimizer == "adamw"


def test_rope_dot_products_depend_only_on_distance():
    hs = 8
    cos, sin = rope_tables(32, hs)
    q, k = torch.randn(1, 1, 1, hs), torch.randn(1, 1, 1, hs)

    def score(m, n):
        return (apply_rope(q, cos[[m]], sin[[m]]) * apply_rope(k, cos[[n]], sin[[n]])).sum()

    assert torch.allclose(score(5, 2), score(20, 17), atol=1e-5)
    assert not torch.allclose(score(5, 2), score(5, 4), atol=1e-3)
    # A rotation keeps the norm.
    assert torch.allclose(apply_rope(q, cos[[9]], sin[[9]]).norm(), q.norm(), atol=1e-5)


def test_rope_model_has_no_position_table_and_takes_offsets():
    m = tiny(pos_embedding="rope")
    assert "transformer.wpe.weight" not in m.state_dict()
    cos, sin = m.rope(torch.arange(4, 9))  # positions 4..8, as a KV cache continuing at 4 asks
    assert torch.equal(cos, m.rope_cos[4:9]) and torch.equal(sin, m.rope_sin[4:9])
    assert m.rope(torch.arange(3)) is not None and tiny().rope(torch.arange(3)) is None
    # With a KV cache the new tokens are rotated at their true positions: a prefill then
    # one-token steps give the logits of a single pass over the whole sequence. (Perturbed
    # weights: attention at initialisation is nearly uniform and blind to positions.)
    x, _ = batch()
    m.eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.3)
        whole, _ = m(x)  # logits after the last position, (B, 1, V)
        cache = m.new_cache(x.size(0))
        m(x[:, :10], cache=cache)
        for t in range(10, 16):
            step, _ = m(x[:, t : t + 1], cache=cache, input_pos=torch.tensor([t]))
    assert torch.allclose(step, whole, atol=1e-5)
    with pytest.raises(ValueError, match="even"):
        GPTConfig(n_embd=30, n_head=2, pos_embedding="rope")


def test_qk_norm_makes_attention_blind_to_query_key_scale():
    m = tiny(qk_norm=True, bias=False)
    attn = m.transformer.h[0].attn
    x = torch.randn(2, 16, 32)
    before = attn(x)
    with torch.no_grad():
        attn.c_attn.weight[: 2 * 32] *= 10.0  # the q and k rows
    assert torch.allclose(attn(x), before, atol=1e-4)
    plain = tiny(bias=False).transformer.h[0].attn
    y = plain(x)
    with torch.no_grad():
        plain.c_attn.weight[: 2 * 32] *= 10.0
    assert not torch.allclose(plain(x), y, atol=1e-3)


def test_relu2_mlp():
    mlp = tiny(activation="relu2").transformer.h[0].mlp
    x = torch.randn(3, 32)
    assert torch.allclose(mlp(x), mlp.c_proj(torch.relu(mlp.c_fc(x)) ** 2), atol=1e-6)
    with pytest.raises(ValueError, match="activation"):
        GPTConfig(activation="swish")


def test_untied_head_is_its_own_parameter():
    m = tiny(tie_embeddings=False)
    assert m.lm_head.weight is not m.transformer.wte.weight
    assert "lm_head.weight" in m.state_dict() and "transformer.wte.weight" in m.state_dict()
    # The token table does no matmul once untied: it leaves the FLOP count like the position table.
    assert m.num_params() == tiny().num_params()
    assert m.num_params(non_embedding=False) == tiny().num_params(non_embedding=False) + 65 * 32


def test_zero_init_projections_make_blocks_identities():
    m = tiny(zero_init_proj=True)
    projections = [p for n, p in m.named_parameters() if n.endswith("c_proj.weight")]
    assert len(projections) == 4 and all(p.abs().sum() == 0 for p in projections)
    block, x = m.transformer.h[0], torch.randn(2, 16, 32)
    assert torch.allclose(block(x), x)
    # The gradient still reaches them, so they learn.
    _, loss = m(*batch())
    loss.backward()
    assert all(p.grad.abs().sum() > 0 for p in projections)


def test_logit_softcap_bounds_logits():
    capped, plain = tiny(logit_softcap=2.0), tiny()
    with torch.no_grad():
        capped.lm_head.weight.mul_(100.0)
    plain.load_state_dict(capped.state_dict())  # same weights, no cap
    x, _ = batch()
    logits, raw = capped(x, x)[0], plain(x, x)[0]
    assert raw.abs().max() > 10.0 and logits.abs().max() <= 2.0
    assert torch.allclose(logits, 2.0 * torch.tanh(raw / 2.0), atol=1e-5)
    with pytest.raises(ValueError, match="logit_softcap"):
        GPTConfig(logit_softcap=-1.0)


def test_muon_takes_hidden_matrices_and_adamw_the_rest():
    m = tiny(tie_embeddings=False)
    cfg = TrainConfig(optimizer="muon", learning_rate=1e-3, muon_lr=0.02)
    opt = make_optimizer(m, cfg, "cpu")
    assert isinstance(opt, Optimizers)
    muon, adamw = opt.optimizers
    assert isinstance(muon, torch.optim.Muon) and isinstance(adamw, torch.optim.AdamW)
    names = {id(p): n for n, p in m.named_parameters()}
    in_muon = {names[id(p)] for g in muon.param_groups for p in g["params"]}
    in_adamw = {names[id(p)] for g in adamw.param_groups for p in g["params"]}
    assert in_muon == {n for n, p in m.named_parameters() if n.startswith("transformer.h.") and p.dim() == 2}
    assert {"transformer.wte.weight", "lm_head.weight", "transformer.ln_f.weight"} <= in_adamw
    assert not in_muon & in_adamw and len(in_muon | in_adamw) == len(names)
    assert muon.param_groups[0]["lr_scale"] == pytest.approx(20.0)

    x, y = batch()
    losses = []
    for _ in range(5):
        _, loss = m(x, y)
        losses.append(loss.item())
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert losses[-1] < losses[0] - 0.5
    state = opt.state_dict()
    fresh = make_optimizer(m, cfg, "cpu")
    fresh.load_state_dict(state)
    assert torch.equal(fresh.optimizers[0].state[m.transformer.h[0].attn.c_attn.weight]["momentum_buffer"],
                       muon.state[m.transformer.h[0].attn.c_attn.weight]["momentum_buffer"])  # fmt: skip


def test_adamw_default_single_optimizer():
    opt = make_optimizer(tiny(), TrainConfig(), "cpu")
    assert isinstance(opt, torch.optim.AdamW)
    assert all(g["lr_scale"] == 1.0 for g in opt.param_groups)


def test_warmdown_schedule():
    cfg = TrainConfig(learning_rate=1.0, min_lr=0.0, warmup_iters=10, max_iters=100, warmdown_iters=40)
    assert learning_rate(cfg, 0) < 0.2
    assert learning_rate(cfg, 10) == 1.0 and learning_rate(cfg, 60) == 1.0
    assert math.isclose(learning_rate(cfg, 80), 0.5)
    assert learning_rate(cfg, 100) == 0.0


def test_our_muon_is_torchs_with_newton_schulz_in_the_dtype_asked_for(monkeypatch):
    torch.manual_seed(0)
    params = [torch.randn(64, 32), torch.randn(32, 96)]  # tall and wide
    grads = [[torch.randn_like(p) for p in params] for _ in range(3)]

    def run(make):
        ps = [torch.nn.Parameter(p.clone()) for p in params]
        opt = make(ps)
        for step_grads in grads:
            for p, g in zip(ps, step_grads, strict=True):
                p.grad = g.clone()
            opt.step()
        return ps, opt

    theirs, _ = run(lambda ps: torch.optim.Muon(ps, lr=0.02, weight_decay=0.1))
    ours, opt = run(lambda ps: optimizer.Muon(ps, lr=0.02, weight_decay=0.1, ns_dtype=torch.bfloat16))
    assert all(torch.equal(a, b) for a, b in zip(theirs, ours, strict=True))  # bit for bit
    assert set(opt.state[ours[0]]) == {"momentum_buffer"}  # the same state dict as torch's
    seen = []
    real = optimizer.orthogonalize
    monkeypatch.setattr(optimizer, "orthogonalize", lambda g, *a: seen.append(a[-1]) or real(g, *a))
    fp32, _ = run(lambda ps: optimizer.Muon(ps, lr=0.02, weight_decay=0.1, ns_dtype=torch.float32))
    assert seen == [torch.float32] * 6
    for a, b in zip(theirs, fp32, strict=True):  # bf16 rounding apart, the same update
        torch.testing.assert_close(a, b, rtol=0, atol=2e-3)
    cpu = make_optimizer(tiny(), TrainConfig(optimizer="muon"), "cpu")
    assert cpu.optimizers[0].ns_dtype == torch.float32  # no native bf16 on most CPUs


def newton_schulz_float64(g, steps=5, a=3.4445, b=-4.7750, c=2.0315):
    """Muon's quintic iteration written out in float64, on the wide orientation: X <- aX + bAX + cA^2X."""
    x = g.double().T if g.size(0) > g.size(1) else g.double()
    x = x / x.norm()
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + b * gram @ x + c * gram @ gram @ x
    return x.T if g.size(0) > g.size(1) else x


def test_muon_runs_newton_schulz_in_float32_on_the_cpu():
    """docs/testing.md: on the CPU Muon's update is the float32 one. Against a float64 reference
    its error is about 1e-6; bfloat16's is about 1e-2, so atol 1e-4 tells them apart."""
    torch.manual_seed(0)
    p0, grad = torch.randn(64, 32), torch.randn(64, 32)  # tall: the step is scaled by sqrt(rows / cols)
    muon = make_optimizer(torch.nn.Linear(32, 64, bias=False), TrainConfig(optimizer="muon"), "cpu").optimizers[0]
    p = torch.nn.Parameter(p0.clone())
    opt = optimizer.Muon([p], lr=1.0, weight_decay=0.0, ns_dtype=muon.ns_dtype)
    p.grad = grad.clone()
    opt.step()
    # The first step's momentum buffer is a positive multiple of the gradient, and the iteration
    # normalises its input: the update is the iteration of the gradient itself.
    update = (p0.double() - p.detach().double()) / math.sqrt(2)
    reference = newton_schulz_float64(grad)
    torch.testing.assert_close(update, reference, rtol=0, atol=1e-4)
    in_bf16 = optimizer.orthogonalize(grad, (3.4445, -4.7750, 2.0315), 5, 1e-7, torch.bfloat16)
    assert (in_bf16.double() - reference).abs().max() > 1e-3  # the tolerance separates the two


def test_muon_run_resumes_exactly(char_data_dir, tmp_path):
    """Both optimizers' state goes into the checkpoint and comes back: a resumed Muon run ends
    with the same weights as an uninterrupted one."""
    switches = dict(optimizer="muon", pos_embedding="rope", qk_norm=True, tie_embeddings=False, eval_interval=4)
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    loop.main(tiny_train_args(char_data_dir, straight, max_iters=8, **switches))
    loop.main(tiny_train_args(char_data_dir, resumed, max_iters=4, **switches))
    loop.main(tiny_train_args(char_data_dir, resumed, max_iters=8, init_from="resume", **switches))
    a = torch.load(straight / "ckpt.pt", weights_only=True)["model"]
    b = torch.load(resumed / "ckpt.pt", weights_only=True)["model"]
    assert a.keys() == b.keys() and "lm_head.weight" in a
    for name in a:
        assert torch.equal(a[name], b[name]), name


@pytest.mark.cuda
def test_all_switches_train_on_cuda_compiled_bf16(char_data_dir, tmp_path):
    out = tmp_path / "run"
    switches = dict(optimizer="muon", pos_embedding="rope", qk_norm=True, activation="relu2", tie_embeddings=False,
                    zero_init_proj=True, logit_softcap=30.0, warmdown_iters=10, full_val=True)  # fmt: skip
    args = tiny_train_args(char_data_dir, out, max_iters=20, eval_interval=20, **switches)
    args = [a for a in args if not a.startswith(("--device", "--dtype", "--compile"))]
    run_script("train.py", *args, "--device=cuda", "--dtype=bfloat16", "--compile=True")
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    full = [r["full_val_loss"] for r in rows if "full_val_loss" in r]
    assert len(full) == 1 and math.isfinite(full[0]) and full[0] < 4.0
