"""Generating tokens from a GPT: prefill the prompt, then decode one token per step.

Small functions with one job each, in the manner of gpt-fast: `logits_to_probs` and `sample`
turn logits into the next token; `prefill` runs a whole context through the model and fills a
KV cache; `decode_one_token` runs one new token against that cache; `decode_n_tokens` strings
them together and moves the context window; `generate` returns the finished sequences.

use_cache=False recomputes the whole context at every step instead (nanoGPT's way): the same
tokens, much slower. Both paths see the same context at every step (`context_start`), so for
the same seed they produce the same tokens.
"""

import torch


def logits_to_probs(logits, temperature=1.0, top_k=None, top_p=None):
    """Next-token probabilities (B, V) from logits (B, V): logits divided by temperature (> 0),
    then only the top_k most likely tokens kept, then only the smallest set of most likely tokens
    whose probability reaches top_p (nucleus sampling); what is left is renormalised. A temperature
    too small for float32 behaves as greedy decoding: the most likely tokens keep all the probability."""
    logits = logits.float()
    # Shifted so that the largest is 0: divided by a tiny temperature, it stays 0 and the rest go
    # to -inf, never inf - inf (NaN). The floor keeps the divisor above 0 once it is a float32.
    logits = (logits - logits.amax(dim=-1, keepdim=True)) / max(temperature, torch.finfo(torch.float32).tiny)
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, [-1]]  # (B, 1): the k-th largest logit
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if top_p is not None and top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs  # probability of the more likely tokens
        # A token stays while the more likely ones hold less than top_p: the most likely always stays.
        drop_sorted = mass_before >= top_p
        drop = torch.empty_like(drop_sorted).scatter_(-1, order, drop_sorted)  # back to vocabulary order
        probs = probs.masked_fill(drop, 0.0)
        probs = probs / probs.sum(dim=-1, keepdim=True)
    return probs


def sample(logits, temperature=1.0, top_k=None, top_p=None, generator=None):
    """The next token (B, 1) from logits (B, V): the most likely one at temperature 0, else a draw."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    probs = logits_to_probs(logits, temperature, top_k, top_p)
    return torch.multinomial(probs, num_samples=1, generator=generator)


@torch.no_grad()
def prefill(model, context, use_cache=True):
    """Run context (B, T), T <= block_size, through the model from position 0. Returns the logits
    of the token that follows, (B, V), and a KV cache holding the T positions (None without use_cache)."""
    cache = model.new_cache() if use_cache else None
    logits, _ = model(context, cache=cache)
    return logits[:, -1], cache


@torch.no_grad()
def decode_one_token(model, token, cache):
    """Run one token (B, 1) after the positions in `cache`, appending its keys and values there.
    Returns the logits of the token that follows, (B, V)."""
    logits, _ = model(token, cache=cache)
    return logits[:, -1]


def context_start(length, block_size, keep):
    """Where the context for the next token begins in a sequence of `length` tokens.

    While the sequence fits in block_size the context is all of it. Past that, each time the
    window overflows it jumps forward to hold only the last `keep` tokens, then grows back to
    block_size one token per step. Every kept token then sits at a new position, so their keys
    and values change and the cache is rebuilt by one prefill of `keep` tokens; the steps in
    between cost one token each. keep = block_size moves the window by one token every step
    (nanoGPT's crop to the last block_size tokens): every step past block_size is a full prefill.
    """
    if length <= block_size:
        return 0
    if keep >= block_size:
        return length - block_size
    since_first_jump = length - block_size - 1
    return length - keep - since_first_jump % (block_size - keep)


@torch.no_grad()
def decode_n_tokens(model, idx, n, temperature=1.0, top_k=None, top_p=None, generator=None,
                    use_cache=True, keep=None, eos_id=None):  # fmt: skip
    """Yield up to n new tokens (B, 1) that continue idx (B, T), one per step.

    keep: tokens kept when the window slides past block_size (default block_size // 2, see
    context_start). eos_id: a row that has produced it yields eos_id from then on, and the
    generation stops once every row has.
    """
    block_size = model.config.block_size
    keep = block_size // 2 if keep is None else keep
    if not 1 <= keep <= block_size:
        raise ValueError(f"keep must be in [1, block_size={block_size}], got {keep}")
    cache, cache_start = None, None  # the cache holds the context from cache_start on
    finished = torch.zeros(idx.size(0), 1, dtype=torch.bool, device=idx.device)
    for _ in range(n):
        start = context_start(idx.size(1), block_size, keep)
        if use_cache and start == cache_start:
            logits = decode_one_token(model, idx[:, -1:], cache)
        else:
            logits, cache = prefill(model, idx[:, start:], use_cache)
            cache_start = start
        token = sample(logits, temperature, top_k, top_p, generator)
        if eos_id is not None:
            token = token.masked_fill(finished, eos_id)
            finished |= token == eos_id
        idx = torch.cat((idx, token), dim=1)
        yield token
        if eos_id is not None and finished.all():
            return


def generate(model, idx, max_new_tokens, **kwargs):
    """idx (B, T) followed by up to max_new_tokens new tokens, (B, T + n); kwargs as decode_n_tokens."""
    return torch.cat([idx, *decode_n_tokens(model, idx, max_new_tokens, **kwargs)], dim=1)
