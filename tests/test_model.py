"""The model does what the equations say: shapes, masking, positions, attention, initialisation, learning."""

import math

import pytest
import torch
import torch.nn.functional as F

from gptcraft.generate import generate
from gptcraft.model import GPT, GPTConfig, explicit_attention, sinusoidal_positions

SMALL = dict(block_size=16, vocab_size=50, n_layer=2, n_head=4, n_embd=32)


def small_model(**overrides):
    torch.manual_seed(0)
    return GPT(GPTConfig(**{**SMALL, **overrides})).eval()


def test_shapes_with_and_without_targets():
    model = small_model()
    idx = torch.randint(0, 50, (3, 10))
    logits, loss = model(idx, idx)
    assert logits.shape == (3, 10, 50)
    assert loss.dim() == 0
    logits, loss = model(idx)
    assert logits.shape == (3, 1, 50) and loss is None
    # The last-position logits are the same whichever way they are computed.
    torch.testing.assert_close(logits[:, 0], model(idx, idx)[0][:, -1])


def test_sequence_longer_than_block_size_is_refused():
    with pytest.raises(ValueError, match="block_size"):
        small_model()(torch.zeros(1, 17, dtype=torch.long))


@pytest.mark.parametrize("pos_embedding", ["learned", "sinusoidal"])
@pytest.mark.parametrize("attention", ["sdpa", "explicit"])
def test_causality_future_tokens_do_not_change_past_logits(pos_embedding, attention):
    model = small_model(pos_embedding=pos_embedding, attention=attention)
    idx = torch.randint(0, 50, (2, 16))
    t = 7
    changed = idx.clone()
    changed[:, t + 1 :] = torch.randint(0, 50, (2, 16 - t - 1))
    assert not torch.equal(changed, idx)
    before, _ = model(idx, idx)
    after, _ = model(changed, changed)
    torch.testing.assert_close(before[:, : t + 1], after[:, : t + 1], rtol=0, atol=1e-6)
    # ...while the future positions do change: the test can tell.
    assert (before[:, t + 1 :] - after[:, t + 1 :]).abs().max() > 1e-3


def test_sinusoidal_buffer_equals_the_formula():
    T, d = 12, 10
    pe = sinusoidal_positions(T, d)
    for pos in range(T):
        for i in range(d // 2):
            angle = pos / 10000 ** (2 * i / d)
            assert pe[pos, 2 * i].item() == pytest.approx(math.sin(angle), abs=1e-6)
            assert pe[pos, 2 * i + 1].item() == pytest.approx(math.cos(angle), abs=1e-6)
    model = small_model(pos_embedding="sinusoidal")
    assert "pe" not in dict(model.named_parameters()) and "pe" not in model.state_dict()
    torch.testing.assert_close(model.pe, sinusoidal_positions(16, 32))


def test_attention_without_positions_is_permutation_equivariant():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 9, 8) for _ in range(3))
    perm = torch.randperm(9)
    for attend in (
        lambda q, k, v: explicit_attention(q, k, v, causal=False),
        lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=False),
    ):
        out = attend(q, k, v)
        out_perm = attend(q[:, :, perm], k[:, :, perm], v[:, :, perm])
        torch.testing.assert_close(out_perm, out[:, :, perm], rtol=1e-5, atol=1e-6)


def test_sdpa_and_explicit_attention_agree():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 9, 8) for _ in range(3))
    torch.testing.assert_close(
        explicit_attention(q, k, v, causal=True),
        F.scaled_dot_product_attention(q, k, v, is_causal=True),
        rtol=1e-5,
        atol=1e-6,
    )
    sdpa = small_model(attention="sdpa")
    explicit = small_model(attention="explicit")
    explicit.load_state_dict(sdpa.state_dict())
    idx = torch.randint(0, 50, (2, 16))
    torch.testing.assert_close(sdpa(idx, idx)[0], explicit(idx, idx)[0], rtol=1e-5, atol=1e-5)


def test_explicit_attention_masks_the_upper_triangle():
    q = k = torch.zeros(1, 1, 4, 2)  # equal scores: each query averages the keys it may see
    v = torch.arange(4.0).view(1, 1, 4, 1)
    out = explicit_attention(q, k, v, causal=True).flatten()
    torch.testing.assert_close(out, torch.tensor([0.0, 0.5, 1.0, 1.5]))


def test_loss_at_init_is_about_log_vocab_size():
    model = small_model(vocab_size=65)
    # Targets independent of the inputs: with tied embeddings, predicting the input token itself is easier.
    idx, targets = torch.randint(0, 65, (2, 8, 16))
    _, loss = model(idx, targets)
    assert abs(loss.item() - math.log(65)) < 0.1


def test_gpt2_small_has_gpt2_parameter_count_and_names():
    with torch.device("meta"):
        model = GPT(GPTConfig(vocab_size=50257, bias=True))
    assert model.num_params(non_embedding=False) == 124_439_808  # OpenAI's GPT-2 124M
    names = set(model.state_dict())
    for name in ("transformer.wte.weight", "transformer.wpe.weight", "transformer.h.11.ln_1.weight",
                 "transformer.h.0.attn.c_attn.weight", "transformer.h.0.attn.c_proj.bias",
                 "transformer.h.0.ln_2.bias", "transformer.h.0.mlp.c_fc.weight", "transformer.h.0.mlp.c_proj.weight",
                 "transformer.ln_f.weight", "lm_head.weight"):  # fmt: skip
        assert name in names, name
    assert model.lm_head.weight is model.transformer.wte.weight  # tied


def test_gpt2_initialisation():
    torch.manual_seed(0)
    cfg = GPTConfig(block_size=64, vocab_size=512, n_layer=8, n_head=4, n_embd=256)
    model = GPT(cfg)
    assert model.transformer.h[0].attn.c_attn.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert model.transformer.wte.weight.std().item() == pytest.approx(0.02, rel=0.05)
    residual_std = 0.02 / math.sqrt(2 * cfg.n_layer)
    assert model.transformer.h[3].mlp.c_proj.weight.std().item() == pytest.approx(residual_std, rel=0.05)
    assert model.transformer.h[3].attn.c_proj.weight.std().item() == pytest.approx(residual_std, rel=0.05)
    assert model.transformer.h[0].attn.c_attn.bias.abs().max().item() == 0


def test_bias_false_removes_every_bias():
    model = small_model(bias=False)
    assert not [n for n, _ in model.named_parameters() if n.endswith("bias")]


def test_a_small_model_overfits_one_batch():
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=32, vocab_size=40, n_layer=2, n_head=2, n_embd=64)).train()
    idx = torch.randint(0, 40, (4, 33))
    x, y = idx[:, :-1], idx[:, 1:]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(150):
        _, loss = model(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.05, loss.item()


def test_flops_per_token_follows_6n_plus_attention():
    """6N + 12 L C T, N counted by hand for SMALL (C=32, L=2, T=16, V=50, biases, tied lm_head)."""
    c = 32
    # ln_1, c_attn (q, k, v), attention's c_proj, ln_2, c_fc, the MLP's c_proj: weights and biases
    block = 2 * c + (3 * c * c + 3 * c) + (c * c + c) + 2 * c + (4 * c * c + 4 * c) + (4 * c * c + c)
    assert block == 12_704
    n = 2 * block + 2 * c + 50 * c  # blocks, ln_f, the token embedding (also lm_head); not the position table
    assert n == 27_072
    model = small_model()
    assert model.flops_per_token() == 6 * 27_072 + 12 * 2 * 32 * 16 == 174_720
    assert model.estimate_mfu(tokens_per_s=1000, peak_flops=174_720 * 2000) == pytest.approx(0.5)


def test_generate_extends_past_block_size_with_tokens_in_vocab():
    model = small_model()
    out = generate(model, torch.zeros(2, 1, dtype=torch.long), 20, temperature=1.0, top_k=5)
    assert out.shape == (2, 21)
    assert out.min() >= 0 and out.max() < 50
    greedy = generate(model, torch.zeros(1, 3, dtype=torch.long), 4, temperature=0)
    assert torch.equal(greedy, generate(model, torch.zeros(1, 3, dtype=torch.long), 4, temperature=0))
    seeded = [generate(model, torch.zeros(2, 1, dtype=torch.long), 20, top_k=5,
                       generator=torch.Generator().manual_seed(3)) for _ in range(2)]  # fmt: skip
    assert torch.equal(*seeded)


def test_the_model_config_refuses_a_softcap_that_is_not_a_number():
    """A checkpoint's model_args reach GPTConfig without the command line's parsing."""
    with pytest.raises(ValueError, match="logit_softcap must be finite and >= 0"):
        GPTConfig(logit_softcap=float("nan"))
