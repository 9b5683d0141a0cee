"""Tiny models that spell attention in different ways (and some that are not attention)."""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

D_MODEL, HEADS, HEAD_DIM = 32, 4, 8


class Spelled(nn.Module):
    """One attention layer; ``spelling`` picks how scores, masks, layout and K/V heads are written."""

    def __init__(self, spelling: str, kv_heads: int = HEADS, max_len: int = 64):
        super().__init__()
        self.s, self.kv_heads = spelling, kv_heads
        self.q = nn.Linear(D_MODEL, HEADS * HEAD_DIM)
        self.k = nn.Linear(D_MODEL, kv_heads * HEAD_DIM)
        self.v = nn.Linear(D_MODEL, kv_heads * HEAD_DIM)
        self.o = nn.Linear(HEADS * HEAD_DIM, D_MODEL)
        self.register_buffer("tril", torch.tril(torch.ones(max_len, max_len)))
        self.register_buffer("triu_bool", torch.triu(torch.ones(max_len, max_len, dtype=torch.bool), diagonal=1))
        self.alibi = nn.Parameter(torch.randn(HEADS, 1, 1) * 0.1)

    def forward(self, x):
        B, T, _ = x.shape
        s = self.s
        q = self.q(x).view(B, T, HEADS, HEAD_DIM).transpose(1, 2)  # (B, H, T, hd)
        k = self.k(x).view(B, T, self.kv_heads, HEAD_DIM).transpose(1, 2)  # (B, Hkv, T, hd)
        v = self.v(x).view(B, T, self.kv_heads, HEAD_DIM).transpose(1, 2)
        rep = HEADS // self.kv_heads
        if rep > 1 and "broadcast" not in s:
            if "interleave" in s:
                k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
            else:  # HF repeat_kv: expand + reshape
                k = k[:, :, None].expand(B, self.kv_heads, rep, T, HEAD_DIM).reshape(B, HEADS, T, HEAD_DIM)
                v = v[:, :, None].expand(B, self.kv_heads, rep, T, HEAD_DIM).reshape(B, HEADS, T, HEAD_DIM)
        if "broadcast" in s:  # multi-query: K/V (B, 1, T, hd) broadcast in the matmul
            q = q.reshape(B, HEADS, T, HEAD_DIM)
        scale = 1 / math.sqrt(HEAD_DIM)
        if "scale_q" in s:
            q = q * scale
        if "scale_k" in s:
            k = k / math.sqrt(HEAD_DIM)
        if "3d" in s:
            q, k, v = (t.reshape(B * t.shape[1], T, HEAD_DIM) for t in (q, k, v))
        if "einsum" in s:
            att = torch.einsum("bhqd,bhkd->bhqk", q, k)
        elif "bmm" in s:
            att = torch.bmm(q, k.transpose(1, 2))
        else:
            att = q @ k.transpose(-2, -1)
        if "div" in s:
            att = att / math.sqrt(HEAD_DIM)
        elif not any(w in s for w in ("scale_q", "scale_k", "noscale")):
            att = att * scale
        if "softcap" in s and "after" in s:  # Gemma2: cap first, then the mask
            att = torch.tanh(att / 5.0) * 5.0
        if "tril" in s:
            att = att.masked_fill(self.tril[:T, :T] == 0, float("-inf"))
        if "triu_where_min" in s:
            att = torch.where(self.triu_bool[:T, :T], torch.finfo(att.dtype).min, att)
        if "computed_causal" in s:
            causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
            att = att.masked_fill(~causal, torch.finfo(att.dtype).min)
        if "alibi" in s:
            pos = torch.arange(T, device=x.device)
            att = att + self.alibi * (pos[None, :] - pos[:, None]).abs().neg()
        if "softcap" in s and "after" not in s:
            att = torch.tanh(att / 5.0) * 5.0
        if "upcast" in s:
            p = F.softmax(att.float(), dim=-1).to(q.dtype)
        elif "wrongaxis" in s:
            p = F.softmax(att, dim=-2)
        else:
            p = F.softmax(att, dim=-1)
        if "einsum" in s:
            y = torch.einsum("bhqk,bhkd->bhqd", p, v)
        elif "bmm" in s:
            y = torch.bmm(p, v)
        else:
            y = p @ v
        y = y.reshape(B, HEADS, T, HEAD_DIM).transpose(1, 2).reshape(B, T, HEADS * HEAD_DIM)
        out = self.o(y)
        if "return_probs" in s:
            return out, p
        return out


class PaddedEncoder(nn.Module):
    """Additive padding mask from an input (B, 1, 1, S), as BERT builds it."""

    def __init__(self):
        super().__init__()
        self.att = Spelled("div")
        self.q, self.k, self.v, self.o = self.att.q, self.att.k, self.att.v, self.att.o

    def forward(self, x, mask):
        B, T, _ = x.shape
        q = self.q(x).view(B, T, HEADS, HEAD_DIM).transpose(1, 2)
        k = self.k(x).view(B, T, HEADS, HEAD_DIM).transpose(1, 2)
        v = self.v(x).view(B, T, HEADS, HEAD_DIM).transpose(1, 2)
        att = q @ k.transpose(-1, -2) / math.sqrt(HEAD_DIM) + (1.0 - mask[:, None, None, :].to(x.dtype)) * -10000.0
        return self.o((att.softmax(-1) @ v).transpose(1, 2).reshape(B, T, -1))


class SoftmaxClassifier(nn.Module):
    """A softmax that is not attention: class probabilities of a linear head."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(D_MODEL, 10)

    def forward(self, x):
        return F.softmax(self.lin(x), dim=-1)


POSITIVE = [  # spelling -> expected: causal?
    ("plain", False), ("div", False), ("noscale", False), ("scale_q", False), ("scale_k", False),
    ("einsum", False), ("bmm_3d", False), ("3d_div", False),
    ("tril_fill_ninf", True), ("triu_where_min", True), ("computed_causal", True),
    ("upcast_tril_fill_ninf", True), ("alibi", False), ("gqa_expand", False),
    ("gqa_interleave", False), ("mqa_broadcast", False), ("einsum_tril_fill_ninf", True),
]
NEGATIVE = [  # spelling -> reason fragment
    ("wrongaxis", "not the last (key) axis"),
    ("return_probs", "probabilities are used 2 times"),
    ("softcap", "soft-capped with tanh"),
]


def kv_heads_for(spelling: str) -> int:
    if spelling.startswith("gqa"):
        return 2
    if spelling.startswith("mqa"):
        return 1
    return HEADS
