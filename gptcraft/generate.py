"""Generating tokens from a GPT: prefill the prompt, then decode one token per step.

Small functions with one job each, in the manner of gpt-fast: `logits_to_probs` and `sample`
turn logits into the next token; `prefill` runs a whole context through the model and fills a
KV cache; `decode_one_token` runs one new token against that cache; `decode_n_tokens` strings
them together and moves the context window; `generate` returns the finished sequences.
The KV cache is static (model.py's KVCache): fixed buffers written at an `input_pos` tensor, so
`compile_decoder` compiles the decoding step once for every position.

use_cache=False recomputes the whole context at every step instead (nanoGPT's way): the same
tokens, much slower. Both paths see the same context at every step (`context_start`), so for
the same seed they produce the same tokens.
"""

import weakref

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


# model -> {(batch size, dtype): its KV cache}. Kept while the model lives: a compiled decoding step
# guards on the addresses of the cache's buffers, so new buffers at every call would recompile it.
_CACHES = weakref.WeakKeyDictionary()


def cache_for(model, batch_size):
    """The KV cache of `model` for batch_size sequences, made once and reused by every later call:
    one generation at a time per model and batch size. Its dtype is the one the keys will have:
    autocast's when it is on, else the embeddings' (the dtype the model was cast to)."""
    device_type = model.transformer.wte.weight.device.type
    dtype = model.transformer.wte.weight.dtype
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
    caches = _CACHES.setdefault(model, {})
    if (batch_size, dtype) not in caches:
        caches[batch_size, dtype] = model.new_cache(batch_size, dtype)
    return caches[batch_size, dtype]


@torch.no_grad()
def prefill(model, context, use_cache=True, cache=None):
    """Run context (B, T), T <= block_size, through the model from position 0. Returns the logits
    of the token that follows, (B, V), and a KV cache holding the T positions (None without
    use_cache): `cache` itself when given (overwritten from position 0), else the model's (cache_for)."""
    if use_cache and cache is None:
        cache = cache_for(model, context.size(0))
    logits, _ = model(context, cache=cache if use_cache else None)
    return logits[:, -1], cache if use_cache else None


@torch.no_grad()
def decode_one_token(model, token, cache, input_pos):
    """Run one token (B, 1) at position input_pos (1,) after the positions in `cache`, writing its
    keys and values there. Returns the logits of the token that follows, (B, V). Every tensor keeps
    its shape from one position to the next: compiled, this is traced once."""
    logits, _ = model(token, cache=cache, input_pos=input_pos)
    return logits[:, -1]


def compile_decoder(mode=None):
    """decode_one_token under torch.compile, as one graph; mode="reduce-overhead" on CUDA replays it
    as a CUDA graph. It compiles at its first call (seconds to a minute), then runs for every position."""
    compiled = torch.compile(decode_one_token, mode=mode, fullgraph=True)

    def decode(model, token, cache, input_pos):
        for layer in cache:
            # Buffers that stay at one address: a CUDA graph may write into them in place. Marked here,
            # not when the cache is made, so that eager decoding never imports torch._dynamo.
            torch._dynamo.mark_static_address(layer.k)
            torch._dynamo.mark_static_address(layer.v)
        return compiled(model, token, cache, input_pos)

    return decode


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
    since_first_jump = length - block_size - 1
    # The window holds keep, keep + 1, ..., block_size tokens: block_size - keep + 1 lengths per period.
    return length - keep - since_first_jump % (block_size - keep + 1)


# Tokens between two checks that every row has produced end-of-text: the check reads a flag back
# from the device, which waits for the queued steps, so it is not done at every token.
EOS_CHECK_EVERY = 8


@torch.no_grad()
def decode_n_tokens(model, idx, n, temperature=1.0, top_k=None, top_p=None, generator=None,
                    use_cache=True, keep=None, eos_id=None, decode=decode_one_token, out=None):  # fmt: skip
    """Yield up to n new tokens (B, 1) that continue idx (B, T), one per step.

    keep: tokens kept when the window slides past block_size (default block_size // 2, see
    context_start). eos_id: a row that has produced it yields eos_id from then on, and the
    generation stops once every row has (seen every EOS_CHECK_EVERY tokens, so up to that many
    more eos_id may come). decode: the decoding step, decode_one_token or its compiled form
    (compile_decoder). out: a (B, T + n) buffer that receives idx and the new tokens (default a
    new one); the tokens yielded are views of it.

    Nothing here waits on the device between checks: the position of the newest token lives on
    the device and advances in place, the tokens are written into `out`, and the model's one KV
    cache for this batch size (cache_for) serves every step and every call, refilled from
    position 0 when the window slides, so a compiled step sees the same tensors throughout.
    """
    block_size = model.config.block_size
    keep = block_size // 2 if keep is None else keep
    if not 1 <= keep <= block_size:
        raise ValueError(f"keep must be in [1, block_size={block_size}], got {keep}")
    B, T = idx.shape
    out = torch.empty(B, T + n, dtype=idx.dtype, device=idx.device) if out is None else out
    out[:, :T] = idx
    cache = cache_for(model, B) if use_cache else None
    input_pos = torch.zeros(1, dtype=torch.long, device=idx.device)  # the next token's position in the window
    cache_start, token = None, None  # the cache holds the context from cache_start on; the last token drawn
    finished = torch.zeros(B, 1, dtype=torch.bool, device=idx.device)
    for length in range(T, T + n):  # tokens so far: the one drawn now goes to out[:, length]
        start = context_start(length, block_size, keep)
        if use_cache and start == cache_start:
            logits = decode(model, token, cache, input_pos)  # token (B, 1): a fresh tensor, contiguous
            input_pos += 1
        else:
            logits, cache = prefill(model, out[:, start:length], use_cache, cache)
            cache_start = start
            input_pos.fill_(length - start)  # a scalar kernel argument: no copy from the host
        token = sample(logits, temperature, top_k, top_p, generator)
        if eos_id is not None:
            token = token.masked_fill(finished, eos_id)
            finished |= token == eos_id
        out[:, length : length + 1] = token
        yield out[:, length : length + 1]
        if eos_id is not None and (length - T + 1) % EOS_CHECK_EVERY == 0 and finished.all():
            return


def generate(model, idx, max_new_tokens, **kwargs):
    """idx (B, T) followed by up to max_new_tokens new tokens, (B, T + n); kwargs as decode_n_tokens."""
    out = torch.empty(idx.size(0), idx.size(1) + max_new_tokens, dtype=idx.dtype, device=idx.device)
    n = sum(1 for _ in decode_n_tokens(model, idx, max_new_tokens, out=out, **kwargs))
    return out[:, : idx.size(1) + n]
