"""Hand-written (no transformers) models for tests/test_fuse.py: every spelling ``fuse`` recognises, and near misses.

``TinyLM(...)`` is a Llama-style decoder whose pieces are chosen by flags: RMSNorm plain / Llama-cast /
Gemma ``1 + w`` / LayerNorm written out, SwiGLU / GeGLU (erf or tanh) with separate or fused gate/up
projections, rotary rotate-half or interleaved with cos/sin computed in forward, and optionally the
LM head + cross-entropy loss as the output. This module holds no tests.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

VOCAB, HIDDEN, HEADS, FFN = 64, 32, 4, 48
HEAD_DIM = HIDDEN // HEADS


class RMSNorm(nn.Module):
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


class Attention(nn.Module):
    def __init__(self, rotary="half"):
        super().__init__()
        self.rotary = rotary
        self.q, self.k, self.v, self.o = (nn.Linear(HIDDEN, HIDDEN, bias=False) for _ in range(4))
        self.register_buffer("inv_freq", 1.0 / 10000 ** (torch.arange(0, HEAD_DIM, 2).float() / HEAD_DIM))

    def forward(self, x):
        B, S, _ = x.shape
        q, k, v = (p(x).view(B, S, HEADS, HEAD_DIM).transpose(1, 2) for p in (self.q, self.k, self.v))  # (B, H, S, D)
        freqs = torch.arange(S, dtype=torch.float32, device=x.device)[:, None] * self.inv_freq[None, :]  # (S, D/2)
        if self.rotary == "interleaved":
            emb = freqs.repeat_interleave(2, dim=-1)
            rot = rotate_interleaved
        else:
            emb = torch.cat((freqs, freqs), dim=-1)
            rot = rotate_half
        cos, sin = emb.cos()[None, None], emb.sin()[None, None]  # (1, 1, S, D)
        if self.rotary == "swapped":  # near miss: rotation the other way round
            q, k = q * cos + torch.cat((q[..., 4:], -q[..., :4]), -1) * sin, k * cos + torch.cat((k[..., 4:], -k[..., :4]), -1) * sin
        elif self.rotary != "none":
            q, k = q * cos + rot(q) * sin, k * cos + rot(k) * sin
        scores = q @ k.transpose(-2, -1) / HEAD_DIM ** 0.5
        mask = torch.ones(S, S, dtype=torch.bool, device=x.device).tril()
        scores = scores.masked_fill(~mask, float("-inf"))
        y = torch.softmax(scores, dim=-1) @ v
        return self.o(y.transpose(1, 2).reshape(B, S, HIDDEN))


class MLP(nn.Module):
    def __init__(self, act="silu", fused=False):
        super().__init__()
        self.act, self.fused = act, fused
        if fused:
            self.gate_up = nn.Linear(HIDDEN, 2 * FFN, bias=False)
        else:
            self.gate, self.up = nn.Linear(HIDDEN, FFN, bias=False), nn.Linear(HIDDEN, FFN, bias=False)
        self.down = nn.Linear(FFN, HIDDEN, bias=False)

    def forward(self, x):
        if self.fused:
            a, b = self.gate_up(x).chunk(2, dim=-1)
        else:
            a, b = self.gate(x), self.up(x)
        if self.act == "silu":
            h = F.silu(a)
        else:
            h = F.gelu(a, approximate="tanh" if self.act == "gelu_tanh" else "none")
        out = self.down(h * b)
        if self.act == "leaky":  # near miss: the activation also feeds something else
            out = out + h.sum(-1, keepdim=True)
        return out


class Block(nn.Module):
    def __init__(self, norm, act, fused, rotary):
        super().__init__()
        make = (lambda: HandLayerNorm(HIDDEN)) if norm == "layer" else (lambda: RMSNorm(HIDDEN, norm))
        self.ln1, self.attn, self.ln2, self.mlp = make(), Attention(rotary), make(), MLP(act, fused)

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class TinyLM(nn.Module):
    """Embedding, ``layers`` blocks, final norm, LM head; returns logits, or the loss when ``labels`` are given."""

    def __init__(self, layers=2, norm="llama", act="silu", fused=False, rotary="half"):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, HIDDEN)
        self.blocks = nn.ModuleList([Block(norm, act, fused, rotary) for _ in range(layers)])
        self.norm = HandLayerNorm(HIDDEN) if norm == "layer" else RMSNorm(HIDDEN, norm)
        self.head = nn.Linear(HIDDEN, VOCAB, bias=False)

    def forward(self, ids, labels=None):
        x = self.emb(ids)
        for b in self.blocks:
            x = b(x)
        logits = self.head(self.norm(x))
        if labels is None:
            return logits
        return F.cross_entropy(logits.float().view(-1, VOCAB), labels.view(-1), ignore_index=-100)


def tiny_lm(seed=0, **kw):
    torch.manual_seed(seed)
    return TinyLM(**kw).eval()


# ---- near misses, one per kind ------------------------------------------------------------------

class EpsFromInput(nn.Module):
    """RMSNorm whose eps is a tensor input, not a constant."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(HIDDEN))

    def forward(self, x, eps):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * self.weight


class WeightFromInput(nn.Module):
    """RMSNorm whose weight is computed from an input (a conditioning vector)."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(HIDDEN, HIDDEN)

    def forward(self, x, cond):
        w = self.proj(cond)  # (HIDDEN,)
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w


class LossAndLogits(nn.Module):
    """A loss program that also returns its logits: the LM head cannot be fused with the loss."""

    def __init__(self):
        super().__init__()
        self.emb, self.head = nn.Embedding(VOCAB, HIDDEN), nn.Linear(HIDDEN, VOCAB, bias=False)

    def forward(self, ids, labels):
        logits = self.head(self.emb(ids))
        return F.cross_entropy(logits.view(-1, VOCAB), labels.view(-1)), logits


class SharedResidual(nn.Module):
    """A residual sum read by the norm and by two other nodes: the norm is fused without the add."""

    def __init__(self):
        super().__init__()
        self.norm, self.lin = RMSNorm(HIDDEN), nn.Linear(HIDDEN, HIDDEN)

    def forward(self, x, h):
        s = x + h
        return self.lin(self.norm(s)) + s, s * 2
