"""Built-in example models, written the old way (matmul -> softmax -> matmul, fp32).

Each factory returns ``(module, example_inputs)`` and is a SOURCE on the command line::

    evo-rewrite evo_rewrite.zoo:gpt --passes flash
    evo-rewrite evo_rewrite.zoo:llama --passes flash,fuse

``gpt``: nanoGPT (LayerNorm, GELU MLP, learned positions). ``encoder``: BERT-style. ``llama``: a
Llama-style decoder written by hand, no transformers (RMSNorm, SwiGLU, rotary): the architecture
Liger-Kernel patches in transformers, in a module it cannot patch; its pieces can be switched to
other spellings (Gemma's ``1 + w`` norm, GeGLU, a fused gate/up projection, interleaved rotary).
``cached_llama``: a Llama-style decoder that takes its KV cache (the cache protocol of
rewriter/decoder.py), captured as a decoder program.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["GPT", "Encoder", "Llama", "CachedLlama", "gpt", "encoder", "llama", "cached_llama"]


class CausalSelfAttention(nn.Module):
    """nanoGPT-style: one fused qkv projection, a tril mask buffer, masked_fill with -inf."""

    def __init__(self, d_model: int, n_head: int, block_size: int, dropout: float = 0.0):
        super().__init__()
        self.n_head, self.head_dim = n_head, d_model // n_head
        self.c_attn = nn.Linear(d_model, 3 * d_model)
        self.c_proj = nn.Linear(d_model, d_model)
        self.attn_dropout = nn.Dropout(dropout)
        self.register_buffer("bias", torch.tril(torch.ones(block_size, block_size)).view(1, 1, block_size, block_size))

    def forward(self, x):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(C, dim=2)
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(self.head_dim))  # (B, nh, T, T)
        att = att.masked_fill(self.bias[:, :, :T, :T] == 0, float("-inf"))
        att = F.softmax(att, dim=-1)
        att = self.attn_dropout(att)
        y = att @ v  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.c_proj(y)


class MLP(nn.Module):
    def __init__(self, d_model: int):
        super().__init__()
        self.c_fc = nn.Linear(d_model, 4 * d_model)
        self.c_proj = nn.Linear(4 * d_model, d_model)

    def forward(self, x):
        return self.c_proj(F.gelu(self.c_fc(x)))


class Block(nn.Module):
    def __init__(self, d_model, n_head, block_size):
        super().__init__()
        self.ln_1 = nn.LayerNorm(d_model)
        self.attn = CausalSelfAttention(d_model, n_head, block_size)
        self.ln_2 = nn.LayerNorm(d_model)
        self.mlp = MLP(d_model)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, vocab_size=256, block_size=64, n_layer=4, n_head=4, d_model=64):
        super().__init__()
        self.wte = nn.Embedding(vocab_size, d_model)
        self.wpe = nn.Embedding(block_size, d_model)
        self.h = nn.ModuleList([Block(d_model, n_head, block_size) for _ in range(n_layer)])
        self.ln_f = nn.LayerNorm(d_model)
        self.lm_head = nn.Linear(d_model, vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # tied, as in GPT-2

    def forward(self, idx):
        B, T = idx.size()
        pos = torch.arange(0, T, dtype=torch.long, device=idx.device)
        x = self.wte(idx) + self.wpe(pos)  # (B, T, C)
        for block in self.h:
            x = block(x)
        return self.lm_head(self.ln_f(x))  # (B, T, vocab)


class EncoderLayer(nn.Module):
    """BERT-style: separate q/k/v projections, division by sqrt(d), additive padding mask."""

    def __init__(self, d_model, n_head):
        super().__init__()
        self.n_head, self.head_dim = n_head, d_model // n_head
        self.query = nn.Linear(d_model, d_model)
        self.key = nn.Linear(d_model, d_model)
        self.value = nn.Linear(d_model, d_model)
        self.out = nn.Linear(d_model, d_model)
        self.ln1 = nn.LayerNorm(d_model)
        self.ff = nn.Sequential(nn.Linear(d_model, 4 * d_model), nn.GELU(), nn.Linear(4 * d_model, d_model))
        self.ln2 = nn.LayerNorm(d_model)

    def heads(self, x):  # (B, S, C) -> (B, nh, S, hs)
        B, S, _ = x.shape
        return x.view(B, S, self.n_head, self.head_dim).permute(0, 2, 1, 3)

    def forward(self, x, ext_mask):
        q, k, v = self.heads(self.query(x)), self.heads(self.key(x)), self.heads(self.value(x))
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(self.head_dim)  # (B, nh, S, S)
        scores = scores + ext_mask  # (B, 1, 1, S) additive: 0 keep, large negative drop
        probs = torch.softmax(scores, dim=-1)
        ctx = torch.matmul(probs, v).permute(0, 2, 1, 3).flatten(2)  # (B, S, C)
        x = self.ln1(x + self.out(ctx))
        return self.ln2(x + self.ff(x))


class Encoder(nn.Module):
    def __init__(self, vocab_size=256, max_len=64, n_layer=4, n_head=4, d_model=64):
        super().__init__()
        self.emb = nn.Embedding(vocab_size, d_model)
        self.pos = nn.Embedding(max_len, d_model)
        self.layers = nn.ModuleList([EncoderLayer(d_model, n_head) for _ in range(n_layer)])

    def forward(self, input_ids, attention_mask):
        T = input_ids.shape[1]
        x = self.emb(input_ids) + self.pos(torch.arange(T, device=input_ids.device))
        ext = (1.0 - attention_mask[:, None, None, :].to(x.dtype)) * torch.finfo(x.dtype).min
        for layer in self.layers:
            x = layer(x, ext)
        return x  # (B, S, C) last hidden state


def gpt(n_layer: int = 4, d_model: int = 64, n_head: int = 4, seed: int = 0):
    """A nanoGPT-style causal LM (fused qkv, tril mask buffer) and example token ids (2, 16)."""
    torch.manual_seed(seed)
    model = GPT(n_layer=n_layer, d_model=d_model, n_head=n_head).eval()
    return model, (torch.randint(0, 256, (2, 16)),)


def encoder(n_layer: int = 4, d_model: int = 64, n_head: int = 4, seed: int = 0):
    """A BERT-style encoder with an additive padding mask and example inputs (2, 16), one row padded."""
    torch.manual_seed(seed)
    model = Encoder(n_layer=n_layer, d_model=d_model, n_head=n_head).eval()
    ids = torch.randint(0, 256, (2, 16))
    mask = torch.ones(2, 16, dtype=torch.long)
    mask[1, 12:] = 0
    return model, {"input_ids": ids, "attention_mask": mask}


# ---- Llama-style decoder, by hand ---------------------------------------------------------------

class RMSNorm(nn.Module):
    """``style``: ``llama`` (fp32 math, cast back before the weight), ``gemma`` (``1 + w``, all fp32), ``plain``."""

    def __init__(self, d, style="llama", eps=1e-6):
        super().__init__()
        self.style, self.eps = style, eps
        self.weight = nn.Parameter(torch.randn(d) * 0.1 + (0.0 if style == "gemma" else 1.0))

    def forward(self, x):
        if self.style == "plain":  # x * rsqrt(mean(x²) + eps) * w, no casts
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight
        if self.style == "gemma":
            h = x.float()
            h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
            return (h * (1.0 + self.weight.float())).type_as(x)
        h = x.to(torch.float32)  # llama
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class HandLayerNorm(nn.Module):
    """LayerNorm written out: (x - mean) / sqrt(var + eps) * w + b."""

    def __init__(self, d, eps=1e-5):
        super().__init__()
        self.eps = eps
        self.weight, self.bias = nn.Parameter(torch.randn(d) * 0.1 + 1), nn.Parameter(torch.randn(d) * 0.1)

    def forward(self, x):
        mu = x.mean(-1, keepdim=True)
        var = (x - mu).pow(2).mean(-1, keepdim=True)
        return (x - mu) / torch.sqrt(var + self.eps) * self.weight + self.bias


def rotate_half(x):
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


def rotate_interleaved(x):
    return torch.stack((-x[..., 1::2], x[..., ::2]), dim=-1).flatten(-2)


class LlamaAttention(nn.Module):
    """q, k, v projections, rotary on q and k (cos/sin computed in forward), causal softmax attention."""

    def __init__(self, d_model, n_head, rotary="half", theta=10000.0):
        super().__init__()
        self.n_head, self.head_dim, self.rotary = n_head, d_model // n_head, rotary
        self.q, self.k, self.v, self.o = (nn.Linear(d_model, d_model, bias=False) for _ in range(4))
        hd = self.head_dim
        self.register_buffer("inv_freq", 1.0 / theta ** (torch.arange(0, hd, 2).float() / hd), persistent=False)

    def forward(self, x):
        B, S, C = x.shape
        hd = self.head_dim
        q, k, v = (p(x).view(B, S, self.n_head, hd).transpose(1, 2) for p in (self.q, self.k, self.v))  # (B, H, S, D)
        freqs = torch.arange(S, dtype=torch.float32, device=x.device)[:, None] * self.inv_freq[None, :]  # (S, D/2)
        if self.rotary == "interleaved":
            emb, rot = freqs.repeat_interleave(2, dim=-1), rotate_interleaved
        else:
            emb, rot = torch.cat((freqs, freqs), dim=-1), rotate_half
        cos, sin = emb.cos()[None, None].to(q.dtype), emb.sin()[None, None].to(q.dtype)  # (1, 1, S, D)
        if self.rotary == "swapped":  # near miss: the rotation the other way round
            h = hd // 2
            q = q * cos + torch.cat((q[..., h:], -q[..., :h]), -1) * sin
            k = k * cos + torch.cat((k[..., h:], -k[..., :h]), -1) * sin
        elif self.rotary != "none":
            q, k = q * cos + rot(q) * sin, k * cos + rot(k) * sin
        scores = q @ k.transpose(-2, -1) / math.sqrt(hd)  # (B, H, S, S)
        mask = torch.ones(S, S, dtype=torch.bool, device=x.device).tril()
        scores = scores.masked_fill(~mask, float("-inf"))
        y = torch.softmax(scores.float(), dim=-1).to(q.dtype) @ v  # (B, H, S, D)
        return self.o(y.transpose(1, 2).reshape(B, S, C))


class GatedMLP(nn.Module):
    """``down(act(gate(x)) * up(x))``; ``act``: silu | gelu | gelu_tanh (``leaky``: a near miss, the
    activation feeds something else too); ``fused``: one gate/up projection, chunked."""

    def __init__(self, d_model, d_ff, act="silu", fused=False):
        super().__init__()
        self.act, self.fused = act, fused
        if fused:
            self.gate_up = nn.Linear(d_model, 2 * d_ff, bias=False)
        else:
            self.gate, self.up = nn.Linear(d_model, d_ff, bias=False), nn.Linear(d_model, d_ff, bias=False)
        self.down = nn.Linear(d_ff, d_model, bias=False)

    def forward(self, x):
        a, b = self.gate_up(x).chunk(2, dim=-1) if self.fused else (self.gate(x), self.up(x))
        h = F.silu(a) if self.act in ("silu", "leaky") else F.gelu(a, approximate="tanh" if self.act == "gelu_tanh" else "none")
        out = self.down(h * b)
        if self.act == "leaky":
            out = out + h.sum(-1, keepdim=True)
        return out


class LlamaBlock(nn.Module):
    def __init__(self, d_model, n_head, d_ff, norm, act, fused, rotary):
        super().__init__()
        make = (lambda: HandLayerNorm(d_model)) if norm == "layer" else (lambda: RMSNorm(d_model, norm))
        self.ln1, self.attn = make(), LlamaAttention(d_model, n_head, rotary)
        self.ln2, self.mlp = make(), GatedMLP(d_model, d_ff, act, fused)

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class Llama(nn.Module):
    """Embedding, ``n_layer`` blocks, final norm, LM head; returns logits, or the mean next-token
    cross-entropy when ``labels`` are given (labels[:, t] is the target of position t; -100 is ignored)."""

    def __init__(self, vocab_size=64, n_layer=2, n_head=4, d_model=32, d_ff=48, norm="llama", act="silu",
                 fused=False, rotary="half"):
        super().__init__()
        self.vocab_size = vocab_size
        self.emb = nn.Embedding(vocab_size, d_model)
        self.blocks = nn.ModuleList([LlamaBlock(d_model, n_head, d_ff, norm, act, fused, rotary)
                                     for _ in range(n_layer)])
        self.norm = HandLayerNorm(d_model) if norm == "layer" else RMSNorm(d_model, norm)
        self.head = nn.Linear(d_model, vocab_size, bias=False)

    def forward(self, ids, labels=None):
        x = self.emb(ids)  # (B, S, C)
        for b in self.blocks:
            x = b(x)
        logits = self.head(self.norm(x))  # (B, S, V)
        if labels is None:
            return logits
        return F.cross_entropy(logits.float().view(-1, self.vocab_size), labels.view(-1), ignore_index=-100)


def llama(n_layer: int = 2, d_model: int = 32, n_head: int = 4, d_ff: int = 48, vocab_size: int = 64,
          seed: int = 0, labels: bool = False, **spelling):
    """A hand-written Llama-style decoder and example token ids (2, 12) (and labels, with ``labels=True``).

    ``spelling``: ``norm`` (llama | gemma | plain | layer), ``act`` (silu | gelu | gelu_tanh),
    ``fused`` (one gate/up projection), ``rotary`` (half | interleaved | none).
    """
    torch.manual_seed(seed)
    model = Llama(vocab_size, n_layer, n_head, d_model, d_ff, **spelling).eval()
    ids = torch.randint(0, vocab_size, (2, 12))
    return model, ((ids, torch.randint(0, vocab_size, (2, 12))) if labels else (ids,))


# ---- a Llama-style decoder that takes its KV cache (the cache protocol of rewriter/decoder.py) ----------

class CachedLlamaAttention(nn.Module):
    """Grouped-query attention over ``cat(past, new)`` K/V: additive mask, fp32 softmax, K/V heads
    repeated to the query heads when there are fewer."""

    def __init__(self, d_model, n_head, n_kv_head):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = n_head, n_kv_head, d_model // n_head
        hd = self.head_dim
        self.q = nn.Linear(d_model, n_head * hd, bias=False)
        self.k = nn.Linear(d_model, n_kv_head * hd, bias=False)
        self.v = nn.Linear(d_model, n_kv_head * hd, bias=False)
        self.o = nn.Linear(n_head * hd, d_model, bias=False)

    def forward(self, x, cos, sin, bias, past):
        B, S, _ = x.shape
        hd = self.head_dim
        q = self.q(x).view(B, S, self.n_head, hd).transpose(1, 2)  # (B, H, S, D)
        k = self.k(x).view(B, S, self.n_kv_head, hd).transpose(1, 2)  # (B, Hkv, S, D)
        v = self.v(x).view(B, S, self.n_kv_head, hd).transpose(1, 2)
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        if past is not None:
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)  # (B, Hkv, P+S, D)
        present = (k, v)
        rep = self.n_head // self.n_kv_head
        if rep > 1:
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        scores = q @ k.transpose(-2, -1) / math.sqrt(hd) + bias  # (B, H, S, P+S)
        y = torch.softmax(scores.float(), dim=-1).to(q.dtype) @ v
        return self.o(y.transpose(1, 2).reshape(B, S, -1)), present


class CachedLlamaBlock(nn.Module):
    def __init__(self, d_model, n_head, n_kv_head, d_ff):
        super().__init__()
        self.ln1, self.attn = RMSNorm(d_model), CachedLlamaAttention(d_model, n_head, n_kv_head)
        self.ln2, self.mlp = RMSNorm(d_model), GatedMLP(d_model, d_ff)

    def forward(self, x, cos, sin, bias, past):
        h, present = self.attn(self.ln1(x), cos, sin, bias, past)
        x = x + h
        return x + self.mlp(self.ln2(x)), present


class CachedLlama(nn.Module):
    """A Llama-style causal LM written by hand that takes its KV cache, following evo-rewrite's cache
    protocol (rewriter/decoder.py)::

        forward(input_ids, past_key_values=None, attention_mask=None, position_ids=None) -> (logits, presents)

    ``past_key_values``: None or a sequence of per-layer ``(key, value)``, each ``(B, Hkv, P, D)``;
    ``presents``: the same with ``P + S`` positions. ``attention_mask`` ``(B, P + S)``: 1 for real
    tokens, 0 for padding; ``position_ids`` ``(B, S)``: by default ``P, P + 1, ...``.
    """

    def __init__(self, vocab_size=64, n_layer=2, n_head=4, n_kv_head=None, d_model=32, d_ff=48, theta=10000.0):
        super().__init__()
        n_kv_head = n_kv_head or n_head
        self.vocab_size, self.head_dim = vocab_size, d_model // n_head
        self.emb = nn.Embedding(vocab_size, d_model)
        self.blocks = nn.ModuleList([CachedLlamaBlock(d_model, n_head, n_kv_head, d_ff) for _ in range(n_layer)])
        self.norm = RMSNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size, bias=False)
        hd = self.head_dim
        self.register_buffer("inv_freq", 1.0 / theta ** (torch.arange(0, hd, 2).float() / hd), persistent=False)

    def forward(self, input_ids, past_key_values=None, attention_mask=None, position_ids=None):
        B, S = input_ids.shape
        P = past_key_values[0][0].shape[2] if past_key_values else 0
        dev = input_ids.device
        if position_ids is None:
            position_ids = torch.arange(P, P + S, device=dev)[None].expand(B, S)
        x = self.emb(input_ids)  # (B, S, C)
        freqs = position_ids[..., None].float() * self.inv_freq  # (B, S, D/2)
        emb = torch.cat((freqs, freqs), dim=-1)[:, None]  # (B, 1, S, D)
        cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
        # causal with offset P (query i sees keys 0..P+i), and padding where the mask is 0
        allowed = torch.arange(P + S, device=dev)[None, :] <= torch.arange(S, device=dev)[:, None] + P  # (S, P+S)
        allowed = allowed[None, None]
        if attention_mask is not None:
            allowed = allowed & attention_mask[:, None, None, :].bool()  # (B, 1, S, P+S)
        bias = torch.zeros(allowed.shape, dtype=x.dtype, device=dev).masked_fill(~allowed, torch.finfo(x.dtype).min)
        presents = []
        for i, block in enumerate(self.blocks):
            x, present = block(x, cos, sin, bias, past_key_values[i] if past_key_values else None)
            presents.append(present)
        return self.head(self.norm(x)), tuple(presents)


def cached_llama(n_layer: int = 2, d_model: int = 32, n_head: int = 4, n_kv_head: int | None = None, d_ff: int = 48,
                 vocab_size: int = 64, seed: int = 0):
    """A hand-written Llama-style causal LM that takes its KV cache (:class:`CachedLlama`; ``n_kv_head``
    fewer than ``n_head``: grouped-query attention) and example token ids (2, 12). Captured as a decoder
    program by default on the command line (``evo-rewrite evo_rewrite.zoo:cached_llama --passes flash``)."""
    torch.manual_seed(seed)
    model = CachedLlama(vocab_size, n_layer, n_head, n_kv_head, d_model, d_ff).eval()
    return model, (torch.randint(0, vocab_size, (2, 12)),)
