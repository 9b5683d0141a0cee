"""Built-in example models, written the old way (matmul -> softmax -> matmul, fp32).

Each factory returns ``(module, example_inputs)`` and is a SOURCE on the command line::

    evo-rewrite evo_rewrite.zoo:gpt --passes flash
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["GPT", "Encoder", "gpt", "encoder"]


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
