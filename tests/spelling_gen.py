"""A generator of attention spellings: modules composed of independent choices (hypothesis strategies).

Each :class:`Spelling` is one way people write one attention layer — the layout of q/k/v and how the
heads are split, the two products, where the scale goes, masks and position biases, the softmax, K/V
with fewer heads, cross-attention, and how the output leaves. :class:`Attention` builds the module a
spelling describes. :func:`spellings` draws the positives (every one must be fused by ``flash``);
:func:`negatives` draws modules with a softmax that must never be fused (softmax over the query axis,
probabilities returned or reused, a classifier, scores changed by data that is not a mask or bias).

Sizes are tiny (model width 16, 4 heads of 4) so hundreds of draws run in a CI minute.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import strategies as st

C, H, D, MAX_LEN = 16, 4, 8, 32
T_EXAMPLE, S_EXAMPLE = 6, 5  # query length; key length of cross-attention

LAYOUTS = ("bhsd", "bshd", "3d")  # q/k/v as they enter the products
SPLITS = ("view", "reshape", "unflatten", "rearrange")  # how the heads are split off the projection
SCORE_PRODUCTS = ("matmul", "at", "bmm", "baddbmm", "einsum")
PV_PRODUCTS = ("matmul", "at", "bmm", "einsum")
SCALES = ("scores_mul", "scores_div", "scores_tensor", "inplace", "q", "k", "split", "alpha", "none")
CAUSAL = ("none", "tril_buffer", "triu_buffer", "arange", "additive_buffer", "input")
FILLS = ("-inf", "min", "tensor0d", "buffer", "-1e9", "full_like")
MASK_HOW = ("masked_fill", "masked_fill_", "where_keep", "where_drop")
PADDING = ("none", "additive", "bool")
BIASES = ("none", "alibi", "alibi_tensor", "relpos", "table")
SOFTMAX_FNS = ("F", "torch", "method")
PRECISION = ("plain", "dtype", "upcast")
KV_REPEAT = ("repeat_interleave", "expand", "index", "broadcast")
OUTPUTS = ("transpose", "permute", "einsum_back")
NEGATIVE_KINDS = ("query_axis", "return_probs", "reuse_probs", "classifier", "data_gate", "data_replace", "square")


@dataclasses.dataclass(frozen=True)
class Spelling:
    layout: str = "bhsd"
    split: str = "view"
    scores: str = "matmul"
    pv: str = "matmul"
    letters: str = "bhqkde"  # einsum index letters for batch, heads, query, key, head dim, value dim
    k_first: bool = False  # einsum scores with K as the first operand
    heads_first: bool = False  # einsum scores written (heads, batch, q, k)
    k_mT: bool = False  # kᵀ spelled .mT instead of transpose
    scale: str = "scores_div"
    causal: str = "none"
    fill: str = "-inf"
    mask_how: str = "masked_fill"
    padding: str = "none"
    bias: str = "none"
    bias_before_scale: bool = False
    softmax: str = "F"
    precision: str = "plain"
    softmax_dim_positive: bool = False
    dropout: bool = False
    kv_heads: int = H
    kv_repeat: str = "repeat_interleave"
    cross: bool = False
    output: str = "transpose"
    project: bool = True
    negative: str = ""  # one of NEGATIVE_KINDS: this softmax must not be fused

    def __str__(self):
        d = dataclasses.asdict(self)
        base = dataclasses.asdict(Spelling())
        return "Spelling(" + ", ".join(f"{k}={v!r}" for k, v in d.items() if v != base[k]) + ")"

    @property
    def scores_rank(self) -> int:
        return 3 if self.layout == "3d" else 4

    def example_inputs(self, batch: int = 2, seq: int = T_EXAMPLE, mem: int = S_EXAMPLE):
        g = torch.Generator().manual_seed(batch * 100 + seq)
        x = torch.randn(batch, seq, C, generator=g)
        inputs = [x]
        s = mem if self.cross else seq
        if self.cross:
            inputs.append(torch.randn(batch, mem, C, generator=g))
        if self.padding != "none":
            pad = torch.ones(batch, s, dtype=torch.long)
            pad[-1, -(s // 3 or 1):] = 0
            inputs.append(pad)
        if self.causal == "input":
            inputs.append(torch.ones(1, 1, seq, seq, dtype=torch.bool).tril())
        return tuple(inputs)


@st.composite
def spellings(draw, negative: bool = False) -> Spelling:
    """One positive spelling (or, with ``negative``, a spelling made not-attention by one change)."""
    layout = draw(st.sampled_from(LAYOUTS))
    if layout == "bshd":
        scores = pv = "einsum"
    elif layout == "3d":
        scores = draw(st.sampled_from(SCORE_PRODUCTS))
        pv = draw(st.sampled_from(PV_PRODUCTS))
    else:
        scores = draw(st.sampled_from(("matmul", "at", "einsum")))
        pv = draw(st.sampled_from(("matmul", "at", "einsum")))
    letters = "".join(draw(st.permutations(list("abcdefghijlmnoprstuvwxyz")))[:6])
    scale = draw(st.sampled_from([s for s in SCALES if s != "alpha" or scores == "baddbmm"]))
    cross = draw(st.booleans())
    causal = "none" if cross else draw(st.sampled_from(CAUSAL))
    kv_heads = draw(st.sampled_from((H, 2, 1)))
    kv_repeat = draw(st.sampled_from([r for r in KV_REPEAT if r != "broadcast" or (kv_heads == 1 and layout != "3d")]))
    output = draw(st.sampled_from(OUTPUTS if pv == "einsum" else ("transpose", "permute")))
    spelling = Spelling(
        layout=layout, split=draw(st.sampled_from(SPLITS)), scores=scores, pv=pv, letters=letters,
        k_first=draw(st.booleans()) if scores == "einsum" else False,
        heads_first=draw(st.booleans()) if scores == pv == "einsum" and layout != "3d" else False,
        k_mT=draw(st.booleans()), scale=scale, causal=causal, fill=draw(st.sampled_from(FILLS)),
        mask_how=draw(st.sampled_from(MASK_HOW)), padding=draw(st.sampled_from(PADDING)),
        bias=draw(st.sampled_from(BIASES)), bias_before_scale=draw(st.booleans()),
        softmax=draw(st.sampled_from(SOFTMAX_FNS)), precision=draw(st.sampled_from(PRECISION)),
        softmax_dim_positive=draw(st.booleans()), dropout=draw(st.booleans()), kv_heads=kv_heads,
        kv_repeat=kv_repeat, cross=cross, output=output, project=draw(st.booleans()))
    if negative:
        spelling = dataclasses.replace(spelling, negative=draw(st.sampled_from(NEGATIVE_KINDS)))
    return spelling


def negatives():
    return spellings(negative=True)


class Attention(nn.Module):
    """The attention layer a :class:`Spelling` describes (eval mode: dropout is the identity)."""

    def __init__(self, sp: Spelling):
        super().__init__()
        self.sp = sp
        torch.manual_seed(0)
        self.wq = nn.Linear(C, H * D)
        self.wk = nn.Linear(C, sp.kv_heads * D)
        self.wv = nn.Linear(C, sp.kv_heads * D)
        self.wo = nn.Linear(H * D, C)
        self.drop = nn.Dropout(0.1)
        self.register_buffer("tril", torch.tril(torch.ones(MAX_LEN, MAX_LEN)))
        self.register_buffer("triu", torch.triu(torch.ones(MAX_LEN, MAX_LEN, dtype=torch.bool), diagonal=1))
        self.register_buffer("causal_bias", torch.full((MAX_LEN, MAX_LEN), float("-inf")).triu(1))
        self.register_buffer("neg", torch.tensor(float("-inf")))
        self.rel = nn.Embedding(2 * 4 + 1, H)
        self.table = nn.Parameter(torch.randn(H, MAX_LEN, MAX_LEN) * 0.1)
        self.gate = nn.Linear(C, H)
        self.head = nn.Linear(C, 8)
        self.codebook = nn.Parameter(torch.randn(8, C))
        self.eval()

    # -- pieces ---------------------------------------------------------------------------

    def _heads(self, t, n, length, batch):  # (B, L, n·D) -> (B, L, n, D)
        how = self.sp.split
        if how == "view" or how == "rearrange":
            return t.view(batch, length, n, D)
        if how == "reshape":
            return t.reshape(batch, length, -1, D)
        return t.unflatten(-1, (n, D))

    def _to_layout(self, t_BSHD, batch, length):
        if self.sp.layout == "bshd":
            return t_BSHD
        t = t_BSHD.permute(0, 2, 1, 3) if self.sp.split == "rearrange" else t_BSHD.transpose(1, 2)  # (B, n, L, D)
        return t

    def _repeat_kv(self, t, axis):  # fewer K/V heads -> H heads along ``axis``
        sp, rep = self.sp, H // self.sp.kv_heads
        if rep == 1 or sp.kv_repeat == "broadcast":
            return t
        if sp.kv_repeat == "repeat_interleave":
            return t.repeat_interleave(rep, dim=axis)
        if sp.kv_repeat == "index":
            idx = torch.arange(H, device=t.device) // rep
            return t[:, idx] if axis == 1 else t[:, :, idx]
        shape = list(t.shape)
        e = t.unsqueeze(axis + 1)
        big = shape[:axis + 1] + [rep] + shape[axis + 1:]
        shape[axis] = H
        return e.expand(*big).reshape(*shape)

    def _fill(self, scores):
        f = self.sp.fill
        if f == "-inf":
            return float("-inf")
        if f == "min":
            return torch.finfo(scores.dtype).min
        if f == "tensor0d":
            return torch.tensor(float("-inf"))
        if f == "buffer":
            return self.neg
        if f == "-1e9":
            return -1e9
        return torch.full_like(scores, float("-inf"))

    def _mask(self, scores, drop):  # ``drop``: True where a key is masked out
        how, fill = self.sp.mask_how, self._fill(scores)
        if isinstance(fill, torch.Tensor) and fill.dim():  # masked_fill takes only a 0-d fill tensor
            how = "where_drop"
        if how == "masked_fill":
            return scores.masked_fill(drop, fill)
        if how == "masked_fill_":
            return scores.masked_fill_(drop, fill)
        if how == "where_keep":
            return torch.where(~drop, scores, fill)
        return torch.where(drop, fill, scores)

    def _place(self, m, role):
        """A (B|H, Sq|1, Sk) tensor placed on the scores' layout: role 'b' (batch) or 'h' (heads)."""
        sp = self.sp
        if sp.layout == "3d":  # (B·H, Sq, Sk)
            b = self._batch
            if role == "h":
                return m[None].expand(b, *m.shape).reshape(b * H, *m.shape[1:])
            return m[:, None].expand(m.shape[0], H, *m.shape[1:]).reshape(m.shape[0] * H, *m.shape[1:])
        if sp.heads_first:  # (H, B, Sq, Sk)
            return m[:, None] if role == "h" else m[None]
        return m[:, None] if role == "b" else m[None]

    def _bias(self, tq, sk, device):
        kind = self.sp.bias
        i = torch.arange(tq, device=device)[:, None]
        j = torch.arange(sk, device=device)[None, :]
        if kind == "alibi":
            slopes = 2.0 ** (-8.0 * torch.arange(1, H + 1, device=device) / H)
            return slopes[:, None, None] * (j - i).abs().neg()
        if kind == "alibi_tensor":
            slopes = torch.tensor([2.0 ** (-8.0 * (h + 1) / H) for h in range(H)])
            return slopes[:, None, None] * (j - i)
        if kind == "relpos":
            buckets = (j - i).clamp(-4, 4) + 4
            return self.rel(buckets).permute(2, 0, 1)
        return self.table[:, :tq, :sk]

    # -- forward --------------------------------------------------------------------------

    def forward(self, x, *extra):
        sp = self.sp
        extra = list(extra)
        mem = extra.pop(0) if sp.cross else x
        pad = extra.pop(0) if sp.padding != "none" else None
        causal_in = extra.pop(0) if sp.causal == "input" else None
        if sp.negative == "classifier":  # a softmax over class logits, mixing a codebook: not attention
            p = F.softmax(self.head(x), dim=-1)
            return p @ self.codebook
        B, T, _ = x.shape
        S = mem.shape[1]
        self._batch = B
        q = self._heads(self.wq(x), H, T, B)  # (B, T, H, D)
        k = self._heads(self.wk(mem), sp.kv_heads, S, B)  # (B, S, Hkv, D)
        v = self._heads(self.wv(mem), sp.kv_heads, S, B)
        q, k, v = (self._to_layout(t, B, L) for t, L in ((q, T), (k, S), (v, S)))
        head_axis = 2 if sp.layout == "bshd" else 1
        k, v = self._repeat_kv(k, head_axis), self._repeat_kv(v, head_axis)
        if sp.layout == "3d":
            q, k, v = (t.reshape(B * H, t.shape[2], D) for t in (q, k, v))
        scale = 1 / math.sqrt(D)
        if sp.scale == "q":
            q = q * scale
        elif sp.scale == "k":
            k = k * scale
        elif sp.scale == "split":
            q, k = q * D ** -0.25, k / D ** 0.25
        scores = self._scores(q, k, scale)
        if sp.bias != "none" and sp.bias_before_scale:
            scores = scores + self._place(self._bias(T, S, x.device), "h")
        if sp.scale == "scores_mul":
            scores = scores * scale
        elif sp.scale == "scores_div":
            scores = scores / math.sqrt(D)
        elif sp.scale == "scores_tensor":
            scores = scores / torch.tensor(math.sqrt(D))
        elif sp.scale == "inplace":
            scores /= math.sqrt(D)
        if sp.bias != "none" and not sp.bias_before_scale:
            scores = scores + self._place(self._bias(T, S, x.device), "h")
        if sp.negative == "data_gate":
            gate = torch.sigmoid(self.gate(x)).transpose(1, 2)[..., None]  # (B, H, T, 1)
            gate = gate.reshape(B * H, T, 1) if sp.layout == "3d" else gate.transpose(0, 1) if sp.heads_first else gate
            scores = scores * gate
        if sp.negative == "data_replace":
            drop = self.tril[:T, :S] == 0
            scores = torch.where(drop, self.gate(x).mean(-1)[:, None, :, None].mean(), scores)
        if sp.negative == "square":
            scores = scores.square()
        if sp.causal != "none":
            if sp.causal == "tril_buffer":
                scores = self._mask(scores, self.tril[:T, :T] == 0)
            elif sp.causal == "triu_buffer":
                scores = self._mask(scores, self.triu[:T, :T])
            elif sp.causal == "arange":
                i = torch.arange(T, device=x.device)
                scores = self._mask(scores, i[:, None] < i[None, :])
            elif sp.causal == "additive_buffer":
                scores = scores + self.causal_bias[:T, :T]
            else:
                m = causal_in[0, 0]
                scores = self._mask(scores, ~m)
        if pad is not None:
            if sp.padding == "additive":
                scores = scores + self._place((1.0 - pad[:, None, :].to(scores.dtype)) * -10000.0, "b")
            else:
                scores = self._mask(scores, self._place(pad[:, None, :] == 0, "b"))
        dim = -2 if sp.negative == "query_axis" else (sp.scores_rank - 1 if sp.softmax_dim_positive else -1)
        p = self._softmax(scores, dim)
        if sp.dropout:
            p = self.drop(p)
        y = self._pv(p, v)
        out = self._merge(y, B, T)
        if sp.project:
            out = self.wo(out)
        if sp.negative == "return_probs":
            return out, p
        if sp.negative == "reuse_probs":
            return out + p.amax(-1).mean()
        return out

    def _scores(self, q, k, scale):
        sp = self.sp
        if sp.scores == "einsum":
            b, h, qq, kk, d, _ = sp.letters
            if sp.layout == "3d":
                a, bb, o = f"{b}{qq}{d}", f"{b}{kk}{d}", f"{b}{qq}{kk}"
            elif sp.layout == "bshd":
                a, bb = f"{b}{qq}{h}{d}", f"{b}{kk}{h}{d}"
                o = f"{h}{b}{qq}{kk}" if sp.heads_first else f"{b}{h}{qq}{kk}"
            else:
                a, bb = f"{b}{h}{qq}{d}", f"{b}{h}{kk}{d}"
                o = f"{h}{b}{qq}{kk}" if sp.heads_first else f"{b}{h}{qq}{kk}"
            if sp.k_first:
                return torch.einsum(f"{bb},{a}->{o}", k, q)
            return torch.einsum(f"{a},{bb}->{o}", q, k)
        kT = k.mT if sp.k_mT else k.transpose(-2, -1)
        if sp.scores == "matmul":
            return torch.matmul(q, kT)
        if sp.scores == "at":
            return q @ kT
        if sp.scores == "bmm":
            return torch.bmm(q, kT)
        alpha = scale if sp.scale == "alpha" else 1.0
        base = torch.zeros(q.shape[0], q.shape[1], k.shape[1], dtype=q.dtype, device=q.device)
        return torch.baddbmm(base, q, kT, beta=0.0 if sp.k_mT else 1.0, alpha=alpha)

    def _softmax(self, s, dim):
        sp = self.sp
        if sp.precision == "upcast":
            s = s.float()
        kw = {"dtype": torch.float32} if sp.precision == "dtype" else {}
        if sp.softmax == "F":
            p = F.softmax(s, dim=dim, **kw)
        elif sp.softmax == "torch":
            p = torch.softmax(s, dim, **kw)
        else:
            p = s.softmax(dim, **kw)
        return p.to(torch.float32) if sp.precision == "upcast" else p

    def _pv(self, p, v):
        sp = self.sp
        if sp.pv == "einsum":
            b, h, qq, kk, _, e = sp.letters
            if sp.layout == "3d":
                return torch.einsum(f"{b}{qq}{kk},{b}{kk}{e}->{b}{qq}{e}", p, v)
            pl = f"{h}{b}{qq}{kk}" if sp.heads_first else f"{b}{h}{qq}{kk}"
            vl = f"{b}{kk}{h}{e}" if sp.layout == "bshd" else f"{b}{h}{kk}{e}"
            ol = f"{b}{qq}{h}{e}" if sp.output == "einsum_back" else f"{b}{h}{qq}{e}"
            return torch.einsum(f"{pl},{vl}->{ol}", p, v)
        if sp.pv == "bmm":
            return torch.bmm(p, v)
        return torch.matmul(p, v) if sp.pv == "matmul" else p @ v

    def _merge(self, y, B, T):
        sp = self.sp
        if sp.layout == "3d":
            y = y.view(B, H, T, D)
        elif sp.pv == "einsum" and sp.output == "einsum_back":  # already (B, T, H, D)
            return y.reshape(B, T, H * D)
        if sp.output == "permute":
            return y.permute(0, 2, 1, 3).flatten(2)
        return y.transpose(1, 2).reshape(B, T, H * D)
