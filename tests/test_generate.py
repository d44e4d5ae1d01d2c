"""Generation: the KV cache gives the same tokens as full recomputation; sampling keeps only allowed tokens."""

import pytest
import torch

from gptcraft.generate import (
    context_start,
    decode_n_tokens,
    decode_one_token,
    generate,
    logits_to_probs,
    prefill,
    sample,
)
from gptcraft.model import GPT, GPTConfig

BLOCK = 16


def tiny_model(**overrides):
    """Random weights far from the initial ones: attention at initialisation is nearly uniform, so
    it would hardly notice keys at wrong positions."""
    torch.manual_seed(0)
    cfg = dict(block_size=BLOCK, vocab_size=40, n_layer=2, n_head=2, n_embd=32, **overrides)
    model = GPT(GPTConfig(**cfg)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return model


@pytest.mark.parametrize("pos_embedding", ["learned", "sinusoidal", "rope"])
@pytest.mark.parametrize("attention", ["sdpa", "explicit"])
def test_cached_forward_equals_full_forward(pos_embedding, attention):
    """A prefill then single tokens and a chunk through the cache give the logits of one full pass."""
    model = tiny_model(pos_embedding=pos_embedding, attention=attention)
    idx = torch.randint(0, 40, (3, BLOCK))
    full, _ = model(idx, idx)  # targets given: logits at every position, (B, T, V)
    cache = model.new_cache(3)
    pieces = [model(idx[:, :5], cache=cache)[0]]  # a prefill: positions 0 .. 4
    for t in range(5, 8):
        pieces.append(model(idx[:, t : t + 1], cache=cache, input_pos=torch.tensor([t]))[0])
    # several new queries after cached keys: each sees the cached positions and the new ones before it
    pieces.append(model(idx[:, 8:], cache=cache, input_pos=torch.arange(8, BLOCK))[0])
    cached = torch.cat([p[:, -1] for p in pieces], dim=0)
    expected = torch.cat([full[:, t] for t in (4, 5, 6, 7, BLOCK - 1)], dim=0)
    torch.testing.assert_close(cached, expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="longer than block_size"):
        model(torch.zeros(1, BLOCK + 1, dtype=torch.long))


@pytest.mark.parametrize("pos_embedding", ["learned", "sinusoidal", "rope"])
@pytest.mark.parametrize("keep", [None, 1, BLOCK - 1, BLOCK])
@pytest.mark.parametrize("sampling", [dict(temperature=0), dict(temperature=1.0, top_k=10, top_p=0.9)],
                         ids=["greedy", "sampled"])  # fmt: skip
def test_cached_equals_uncached_across_block_size(pos_embedding, keep, sampling):
    model = tiny_model(pos_embedding=pos_embedding)
    idx = torch.randint(0, 40, (3, 5))
    n = 3 * BLOCK  # the window slides several times
    out = {}
    for use_cache in (True, False):
        gen = torch.Generator().manual_seed(7)
        out[use_cache] = generate(model, idx, n, generator=gen, use_cache=use_cache, keep=keep, **sampling)
    assert out[True].shape == (3, 5 + n)
    assert torch.equal(out[True][:, :5], idx)
    assert torch.equal(out[True], out[False])


def test_sliding_one_token_matches_nanogpt_crop():
    """keep=block_size is nanoGPT's generate: predict from the last block_size tokens, every step."""
    model = tiny_model()
    idx = torch.randint(0, 40, (2, 3))
    expected = idx
    for _ in range(2 * BLOCK):
        logits, _ = model(expected[:, -BLOCK:])
        expected = torch.cat((expected, logits[:, -1].argmax(-1, keepdim=True)), dim=1)
    assert torch.equal(generate(model, idx, 2 * BLOCK, temperature=0, keep=BLOCK), expected)


def test_context_window_stays_within_keep_and_block_size():
    for keep in (1, 5, BLOCK - 1, BLOCK):
        starts = [context_start(n, BLOCK, keep) for n in range(1, 5 * BLOCK)]
        lengths = [n - context_start(n, BLOCK, keep) for n in range(1, 5 * BLOCK)]
        assert lengths[:BLOCK] == list(range(1, BLOCK + 1))  # the whole sequence while it fits
        assert min(lengths[BLOCK:]) == keep and max(lengths) == BLOCK
        assert starts == sorted(starts)  # the window only moves forward


def test_eos_stops_a_row_and_the_generation():
    model = tiny_model()
    idx = torch.randint(0, 40, (2, 4))
    greedy = generate(model, idx, 10, temperature=0)
    eos = greedy[0, 6].item()  # row 0 produces it at its third new token
    out = generate(model, idx, 10, temperature=0, eos_id=eos)
    row0 = out[0, 4:].tolist()
    first = row0.index(eos)
    assert all(t == eos for t in row0[first:])  # padded after its end
    assert torch.equal(out[1, : 4 + first + 1], greedy[1, : 4 + first + 1])
    steps = list(decode_n_tokens(model, idx[:1], 10, temperature=0, eos_id=eos))
    assert len(steps) == first + 1  # stops once every row has ended


def test_prefill_without_cache_returns_none():
    model = tiny_model()
    idx = torch.randint(0, 40, (1, 6))
    logits, cache = prefill(model, idx, use_cache=False)
    cached_logits, full_cache = prefill(model, idx)
    assert cache is None and full_cache[0].k.shape == (1, 2, BLOCK, 16)  # (B, nh, block_size, hs)
    torch.testing.assert_close(logits, cached_logits)


def test_top_k_and_top_p_keep_only_allowed_tokens():
    torch.manual_seed(0)
    logits = torch.randn(4, 50) * 3
    probs = logits_to_probs(logits, top_k=5)
    top5 = logits.topk(5).indices
    for row in range(4):
        assert set(probs[row].nonzero().flatten().tolist()) == set(top5[row].tolist())
    torch.testing.assert_close(probs.sum(-1), torch.ones(4))

    p = torch.softmax(logits, -1)
    probs = logits_to_probs(logits, top_p=0.8)
    for row in range(4):
        order = p[row].argsort(descending=True)
        mass = p[row][order].cumsum(0)
        n_keep = int((mass < 0.8).sum()) + 1  # the smallest prefix reaching 0.8
        assert set(probs[row].nonzero().flatten().tolist()) == set(order[:n_keep].tolist())
    assert logits_to_probs(logits, top_p=1e-9).count_nonzero(-1).tolist() == [1] * 4  # the most likely only

    gen = torch.Generator().manual_seed(0)
    draws = torch.cat([sample(logits, 1.0, top_k=3, top_p=0.99, generator=gen) for _ in range(200)], dim=1)
    for row in range(4):
        assert set(draws[row].tolist()) <= set(logits[row].topk(3).indices.tolist())
    assert torch.equal(sample(logits, 0.0), logits.argmax(-1, keepdim=True))


def test_temperature_sharpens_and_flattens():
    logits = torch.tensor([[2.0, 1.0, 0.0]])
    cold, warm = logits_to_probs(logits, 0.5), logits_to_probs(logits, 2.0)
    assert cold[0, 0] > logits_to_probs(logits)[0, 0] > warm[0, 0]


def test_keep_out_of_range_is_refused():
    with pytest.raises(ValueError, match="keep must be in"):
        generate(tiny_model(), torch.zeros(1, 1, dtype=torch.long), 3, keep=BLOCK + 1)


def test_prompt_longer_than_block_size_is_cropped_the_same_way():
    model = tiny_model()
    idx = torch.randint(0, 40, (2, 2 * BLOCK + 3))
    cached = generate(model, idx, BLOCK, temperature=0)
    assert torch.equal(cached, generate(model, idx, BLOCK, temperature=0, use_cache=False))
    assert torch.equal(cached[:, : idx.size(1)], idx)


@pytest.mark.cuda
def test_cached_equals_uncached_on_cuda():
    model = tiny_model().cuda()
    idx = torch.randint(0, 40, (3, 5), device="cuda")
    out = [generate(model, idx, 3 * BLOCK, temperature=0, use_cache=use_cache) for use_cache in (True, False)]
    assert torch.equal(out[0], out[1])


def perturbed_model(**overrides):
    """A tiny model with weights far from their initialisation, so that attention is far from uniform
    and a wrong position or a stale cached key changes the tokens."""
    model = tiny_model(**overrides)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return model


@pytest.mark.parametrize("pos_embedding", ["learned", "rope"])
@pytest.mark.parametrize("sampling", [dict(temperature=0), dict(temperature=1.0)], ids=["greedy", "sampled"])
def test_static_cache_equals_recompute_token_for_token(pos_embedding, sampling):
    model = perturbed_model(pos_embedding=pos_embedding, qk_norm=True)
    idx = torch.randint(0, 40, (2, 3))
    weights = torch.softmax(model(idx[:, :1].repeat(1, BLOCK), idx[:, :1].repeat(1, BLOCK))[0], -1)
    assert weights.max() > 0.2  # peaked predictions: not the near-uniform model of the initialisation
    out = {}
    for use_cache in (True, False):
        gen = torch.Generator().manual_seed(3)
        out[use_cache] = generate(model, idx, 3 * BLOCK, generator=gen, use_cache=use_cache, keep=5, **sampling)
    assert torch.equal(out[True], out[False])


def test_compiled_decoding_step_is_traced_once_for_every_position():
    """The whole generation, window slides included, replays one graph: a recompile raises."""
    import torch._dynamo

    model = perturbed_model(pos_embedding="rope")
    idx = torch.randint(0, 40, (2, 3))
    torch._dynamo.reset()
    step = torch.compile(decode_one_token, backend="eager", fullgraph=True)  # tracing, not code generation
    with torch._dynamo.config.patch(error_on_recompile=True):
        compiled = generate(model, idx, 3 * BLOCK, temperature=0, keep=5, decode=step)
    assert torch.equal(compiled, generate(model, idx, 3 * BLOCK, temperature=0, keep=5, use_cache=False))
