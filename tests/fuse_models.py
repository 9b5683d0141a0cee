"""Hand-written (no transformers) models for tests/test_fuse.py: every spelling ``fuse`` recognises, and near misses.

``tiny_lm(...)`` is ``evo_rewrite.zoo.llama`` (a hand-written Llama-style decoder whose pieces are chosen
by flags: RMSNorm plain / Llama-cast / Gemma ``1 + w`` / LayerNorm written out, SwiGLU / GeGLU (erf or
tanh) with separate or fused gate/up projections, rotary rotate-half or interleaved with cos/sin
computed in forward, and the LM head + cross-entropy loss as the output when given labels) at a
tiny size; below it, near misses. This module holds no tests.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from evo_rewrite import zoo

VOCAB, HIDDEN, HEADS, FFN = 64, 32, 4, 48
HEAD_DIM = HIDDEN // HEADS


RMSNorm = zoo.RMSNorm


def tiny_lm(seed=0, layers=2, **spelling):
    """``zoo.llama`` at the test size (vocab 64, hidden 32, 4 heads, FFN 48) with the given spelling."""
    model, _ = zoo.llama(n_layer=layers, d_model=HIDDEN, n_head=HEADS, d_ff=FFN, vocab_size=VOCAB, seed=seed,
                         **spelling)
    return model


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
