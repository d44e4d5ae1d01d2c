"""A GPT language model in one file, read top to bottom like the equations.

Token and position embeddings -> n_layer pre-LayerNorm residual blocks
(causal self-attention, then a GELU MLP) -> final LayerNorm -> lm_head tied to
the token embedding. Parameter names follow GPT-2's so its weights map one to one.
Newer switches (rotary positions, QK-norm, ReLU^2, untied head, zero-initialised
projections, logit soft-capping) are GPTConfig fields, all off by default.
A KVCache keeps each layer's keys and values in fixed buffers so that generation
(gptcraft/generate.py) feeds one new token per step instead of the whole context.
Nothing here knows about devices, precision, compile or distribution: the
trainer applies those.
"""

import math
from dataclasses import dataclass, field, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

POS_EMBEDDINGS = ("learned", "sinusoidal", "rope")
ATTENTION_IMPLS = ("sdpa", "explicit")
ACTIVATIONS = ("gelu", "relu2")


def setting(default, help, **tags):
    """A GPTConfig field: its default, one line of help (the command line's --help shows it) and tags.
    free=True: the weights compute the same function whatever the value, so it may change on resume.
    beyond_gpt2=True: a change from GPT-2's architecture; the default is GPT-2's choice."""
    return field(default=default, metadata={"help": help, **tags})


@dataclass
class GPTConfig:
    block_size: int = setting(1024, "context length in tokens: the longest sequence the model sees")
    vocab_size: int = setting(50304, "token ids the model knows (GPT-2's 50257 rounded up to a multiple of 64)")
    n_layer: int = setting(12, "transformer blocks")
    n_head: int = setting(12, "attention heads per block")
    n_embd: int = setting(768, "width of the residual stream")
    dropout: float = setting(0.0, "dropout probability (0 for pretraining, 0.1+ for finetuning)", free=True)
    bias: bool = setting(True, "biases in Linear and LayerNorm layers, as in GPT-2")
    pos_embedding: str = setting("learned", "position encoding: learned (GPT-2), sinusoidal (fixed) or rope "
                                 "(rotary q, k)", choices=POS_EMBEDDINGS, beyond_gpt2=True)  # fmt: skip
    attention: str = setting("sdpa", "sdpa: fused kernels; explicit: the written-out equation",
                             choices=ATTENTION_IMPLS, free=True)  # fmt: skip
    qk_norm: bool = setting(False, "RMS-normalise queries and keys per head before the dot product", beyond_gpt2=True)
    activation: str = setting("gelu", "MLP non-linearity: gelu (GPT-2) or relu2 (relu(x)^2)", choices=ACTIVATIONS,
                              beyond_gpt2=True)  # fmt: skip
    tie_embeddings: bool = setting(True, "lm_head shares the token embedding's weight (False: a separate head)")
    zero_init_proj: bool = setting(False, "output projections start at zero: each block starts as the identity")
    logit_softcap: float = setting(0.0, "> 0: logits = cap * tanh(logits / cap); 0 disables", beyond_gpt2=True)

    def __post_init__(self):
        for f in fields(self):
            if f.metadata.get("choices") and getattr(self, f.name) not in f.metadata["choices"]:
                raise ValueError(
                    f"{f.name} must be one of {', '.join(f.metadata['choices'])}; got {getattr(self, f.name)!r}"
                )
        for name in ("block_size", "vocab_size", "n_layer", "n_head", "n_embd"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.n_embd % self.n_head != 0:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if self.pos_embedding == "rope" and (self.n_embd // self.n_head) % 2:
            raise ValueError(f"rope rotates pairs of channels: head size {self.n_embd // self.n_head} must be even")
        if not 0 <= self.logit_softcap < math.inf:  # written so that nan fails too
            raise ValueError(f"logit_softcap must be finite and >= 0 (0 disables it), got {self.logit_softcap}")


def sinusoidal_positions(block_size: int, n_embd: int) -> torch.Tensor:
    """PE(pos, 2i) = sin(pos / 10000^(2i/d)), PE(pos, 2i+1) = cos(pos / 10000^(2i/d)); shape (T, d)."""
    pos = torch.arange(block_size, dtype=torch.float64).unsqueeze(1)  # (T, 1)
    two_i = torch.arange(0, n_embd, 2, dtype=torch.float64)  # (d/2,)
    angle = pos / 10000.0 ** (two_i / n_embd)  # (T, d/2)
    pe = torch.zeros(block_size, n_embd, dtype=torch.float64)
    pe[:, 0::2] = torch.sin(angle)
    pe[:, 1::2] = torch.cos(angle[:, : n_embd // 2])
    return pe.float()


def rope_tables(block_size: int, head_size: int, base: float = 10000.0):
    """cos and sin of the rotary angles pos * base^(-2i/hs), each of shape (T, hs/2)."""
    inv_freq = base ** (-torch.arange(0, head_size, 2, dtype=torch.float64) / head_size)  # (hs/2,)
    angle = torch.arange(block_size, dtype=torch.float64).unsqueeze(1) * inv_freq  # (T, hs/2)
    return torch.cos(angle).float(), torch.sin(angle).float()


def apply_rope(x, cos, sin):
    """Rotate channel pairs (x_i, x_{i+hs/2}) of x (B, nh, T, hs) by their position's angle;
    cos, sin: (T, hs/2) for the T positions of x. Dot products of rotated q and k then depend
    only on the distance between the two positions."""
    x1, x2 = x.float().chunk(2, dim=-1)  # each (B, nh, T, hs/2)
    rotated = torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
    return rotated.type_as(x)


def causal_mask(query_pos, S):
    """(T, S) bool, True where a query may look at a key: the query at position p sees keys 0 .. p.
    query_pos: (T,) the queries' positions; the keys sit at positions 0 .. S-1 (with a KV cache,
    the whole buffer: positions not written yet lie past every query and stay masked)."""
    return torch.arange(S, device=query_pos.device) <= query_pos.unsqueeze(1)


def attention_weights(q, k, causal=True, mask=None):
    """softmax(Q K^T / sqrt(d_k)) with future positions masked out: (B, nh, T, S), each row sums to one;
    q: (B, nh, T, hs), k: (B, nh, S, hs). mask: (T, S) bool of the allowed pairs, instead of the
    causal one of T queries over the first T keys."""
    att = q @ k.transpose(-2, -1) / math.sqrt(k.size(-1))  # (B, nh, T, S)
    if mask is None and causal:
        mask = causal_mask(torch.arange(q.size(-2), device=q.device), k.size(-2))
    if mask is not None:
        att = att.masked_fill(~mask, float("-inf"))  # -inf: weight 0 after softmax
    return F.softmax(att, dim=-1)


def explicit_attention(q, k, v, causal=True, dropout=None, mask=None):
    """softmax(Q K^T / sqrt(d_k)) V with future positions masked out; q: (B, nh, T, hs), k, v: (B, nh, S, hs);
    mask: as in attention_weights."""
    att = attention_weights(q, k, causal, mask)
    if dropout is not None:
        att = dropout(att)
    return att @ v  # (B, nh, T, hs)


class KVCache:
    """One attention layer's keys and values, in buffers allocated once for every position of the
    context: a prefill writes the prompt's, each decoding step one more, at the positions it is given
    as a tensor. Nothing about it changes shape or holds a Python-int length, so a compiled decoding
    step (torch.compile, CUDA graphs) is traced once and replayed for every position."""

    def __init__(self, batch_size, n_head, max_len, head_size, dtype=None, device=None):
        # Zeros, not empty: unwritten positions are masked, but 0 * NaN would still poison att @ v.
        self.k = torch.zeros(batch_size, n_head, max_len, head_size, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)  # (B, nh, max_len, hs)

    def update(self, input_pos, k, v):
        """Write k, v (B, nh, T, hs) at positions input_pos (T,); return the whole buffers (B, nh, max_len, hs)."""
        self.k.index_copy_(2, input_pos, k.to(self.k.dtype))
        self.v.index_copy_(2, input_pos, v.to(self.v.dtype))
        return self.k, self.v


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.dropout = config.dropout
        self.attention = config.attention
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # q, k, v in one matmul
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.attn_dropout = nn.Dropout(config.dropout)
        self.resid_dropout = nn.Dropout(config.dropout)
        if config.qk_norm:
            # Unit-RMS queries and keys bound the attention logits, whatever the weights grow to.
            self.q_norm = nn.RMSNorm(config.n_embd // config.n_head)
            self.k_norm = nn.RMSNorm(config.n_embd // config.n_head)

    def heads(self, x, rope=None):
        """Queries, keys and values of x (B, T, C), split into heads: each (B, nh, T, hs); rope: as in forward."""
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)  # each (B, T, C)
        hs = C // self.n_head
        q = q.view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, hs).transpose(1, 2)
        v = v.view(B, T, self.n_head, hs).transpose(1, 2)
        if hasattr(self, "q_norm"):
            # Normalised in float32 like the LayerNorms under autocast, then back to v's dtype.
            q, k = self.q_norm(q.float()).type_as(v), self.k_norm(k.float()).type_as(v)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        return q, k, v

    def forward(self, x, rope=None, cache=None, input_pos=None):
        """x: (B, T, C); rope: (cos, sin) of the T positions of x, each (T, hs/2), or None;
        cache: this layer's KVCache, written at input_pos (T,), the positions of x."""
        B, T, C = x.size()
        q, k, v = self.heads(x, rope)
        mask = None  # without a cache: queries and keys at the same positions, causal
        if cache is not None:
            k, v = cache.update(input_pos, k, v)  # (B, nh, max_len, hs): every position's buffer
            mask = causal_mask(input_pos, k.size(2))  # (T, max_len), from tensors only
        if self.attention == "sdpa":
            p = self.dropout if self.training else 0.0
            y = F.scaled_dot_product_attention(q, k.type_as(q), v.type_as(q), attn_mask=mask, dropout_p=p,
                                               is_causal=mask is None)  # fmt: skip
        else:
            y = explicit_attention(q, k.type_as(q), v.type_as(q), dropout=self.attn_dropout, mask=mask)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # re-assemble the heads side by side
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)
        self.activation = config.activation

    def forward(self, x):
        h = self.c_fc(x)  # (B, T, 4C)
        h = F.gelu(h, approximate="tanh") if self.activation == "gelu" else F.relu(h).square()
        return self.dropout(self.c_proj(h))


class Block(nn.Module):
    """Pre-LayerNorm residual block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x, rope=None, cache=None, input_pos=None):
        x = x + self.attn(self.ln_1(x), rope, cache, input_pos)
        x = x + self.mlp(self.ln_2(x))
        return x


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, config.n_embd),
                drop=nn.Dropout(config.dropout),
                h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
                ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
            )
        )
        # Fixed tables are buffers, not parameters, and not saved: they are functions of the config.
        if config.pos_embedding == "learned":
            self.transformer.wpe = nn.Embedding(config.block_size, config.n_embd)
        elif config.pos_embedding == "sinusoidal":
            self.register_buffer("pe", sinusoidal_positions(config.block_size, config.n_embd), persistent=False)
        else:
            cos, sin = rope_tables(config.block_size, config.n_embd // config.n_head)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            # Weight tying: the output projection is the token embedding, read backwards.
            self.transformer.wte.weight = self.lm_head.weight

        self.apply(self._init_weights)
        # GPT-2: projections that write into the residual stream are scaled by 1/sqrt(2 * n_layer),
        # two per block, so the stream's variance does not grow with depth. Zero-initialised, each
        # block starts as the identity and the gradient still reaches them (their inputs are not zero).
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                if config.zero_init_proj:
                    nn.init.zeros_(p)
                else:
                    nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self, non_embedding=True):
        """Parameter count; by default without the lookup tables that do no matmul work: position
        embeddings, and the token embedding when it is not tied to lm_head."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding and self.config.pos_embedding == "learned":
            n -= self.transformer.wpe.weight.numel()
        if non_embedding and not self.config.tie_embeddings:
            n -= self.transformer.wte.weight.numel()
        return n

    def position_embedding(self, pos):
        """Added to the token embeddings for positions pos (T,): (T, C), or 0 with rope."""
        if self.config.pos_embedding == "learned":
            return self.transformer.wpe(pos)  # (T, C)
        if self.config.pos_embedding == "sinusoidal":
            return self.pe[pos]
        return 0.0

    def rope(self, pos):
        """(cos, sin) of the rotary angles at positions pos (T,), each (T, hs/2); None without rope."""
        if self.config.pos_embedding != "rope":
            return None
        return self.rope_cos[pos], self.rope_sin[pos]

    def new_cache(self, batch_size, dtype=None):
        """An empty KV cache for forward(..., cache=, input_pos=): one KVCache per block, holding
        block_size positions of batch_size sequences, in dtype (default: the parameters')."""
        cfg, weight = self.config, self.lm_head.weight
        shape = (batch_size, cfg.n_head, cfg.block_size, cfg.n_embd // cfg.n_head)
        return [KVCache(*shape, dtype=dtype or weight.dtype, device=weight.device) for _ in self.transformer.h]

    def forward(self, idx, targets=None, cache=None, input_pos=None):
        """idx: (B, T) token ids. Returns logits (B, T, V) and the mean cross-entropy when
        targets (B, T) are given; otherwise logits for the last position only, (B, 1, V).
        input_pos: (T,) the positions of idx, default 0 .. T-1; with a cache (from new_cache) their
        keys and values are written there and each attends to the cached positions up to its own.
        input_pos is a tensor and is not checked against block_size here (that would read it back
        from the device and break a compiled graph): the caller keeps it below block_size."""
        B, T = idx.size()
        if input_pos is None:
            if T > self.config.block_size:
                raise ValueError(f"sequence of length {T} is longer than block_size {self.config.block_size}")
            input_pos = torch.arange(T, device=idx.device)  # (T,)
        x = self.transformer.wte(idx) + self.position_embedding(input_pos)  # (B, T, C)
        x = self.transformer.drop(x)
        rope = self.rope(input_pos)
        for i, block in enumerate(self.transformer.h):
            x = block(x, rope, cache[i] if cache is not None else None, input_pos)
        if targets is None:
            return self.logits(self.transformer.ln_f(x[:, [-1], :])), None
        return self.head(x, targets)

    def head(self, x, targets):
        """Final LayerNorm, logits (B, T, V) and the mean cross-entropy against targets (B, T),
        computed in float32; targets of -1 are ignored."""
        logits = self.logits(self.transformer.ln_f(x))
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.reshape(-1), ignore_index=-1)
        return logits, loss

    def logits(self, x):
        """lm_head, soft-capped when logit_softcap > 0: cap * tanh(z / cap) keeps |z| below cap."""
        logits = self.lm_head(x)
        cap = self.config.logit_softcap
        if cap > 0:
            logits = cap * torch.tanh(logits / cap)
        return logits

    def flops_per_token(self):
        """Training FLOPs per token: 6N for the matmuls of forward and backward, plus
        12 * n_layer * n_embd * T for attention's QK^T and AV (PaLM appendix B)."""
        cfg = self.config
        return 6 * self.num_params() + 12 * cfg.n_layer * cfg.n_embd * cfg.block_size

    def estimate_mfu(self, tokens_per_s, peak_flops):
        """Model FLOPs utilisation: achieved training FLOP/s over the device's peak."""
        return self.flops_per_token() * tokens_per_s / peak_flops
