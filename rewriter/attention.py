"""Attention analysis: find every attention site in a captured graph by what attention *is*.

An attention site is a softmax over the last (key) axis whose input is, after optional score
modifiers (scale by mul/div, additive bias or mask, masked_fill/where, dtype casts), a product of
Q and Kᵀ (matmul, bmm or einsum), and whose output, after optional dropout and casts, multiplies V.
Each site records the q/k/v nodes, head counts and head dim where the layout tells them, and the
module path. Passes consume these records instead of re-deriving them.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.fx as fx

from .pass_infra import module_path

__all__ = ["AttentionSite", "SoftmaxReport", "find_attention", "SOFTMAX_OPS", "MATMUL_OPS"]

aten = torch.ops.aten
SOFTMAX_OPS = {aten.softmax.int, aten._softmax.default, aten._safe_softmax.default}
MATMUL_OPS = {aten.matmul.default, aten.bmm.default, aten.einsum.default}
# shape-preserving ops between a softmax and its neighbours that do not change what attention means
_PASSTHROUGH = {aten.to.dtype, aten.to.dtype_layout, aten._to_copy.default, aten.type_as.default,
                aten.contiguous.default, aten.clone.default, aten.alias.default}
_DROPOUT = {aten.dropout.default, aten.native_dropout.default, aten.feature_dropout.default}
_SCALE_OPS = {aten.mul.Tensor, aten.mul.Scalar, aten.div.Tensor, aten.div.Scalar}
_MASK_OPS = {aten.add.Tensor, aten.sub.Tensor, aten.masked_fill.Scalar, aten.masked_fill.Tensor,
             aten.where.self, aten.where.ScalarOther, aten.where.ScalarSelf, aten.where.Scalar}


def _val(n):
    v = n.meta.get("val") if isinstance(n, fx.Node) else None
    return v if isinstance(v, torch.Tensor) else None


def _int(x):
    try:
        return int(x)
    except (TypeError, ValueError):
        return None


@dataclasses.dataclass
class AttentionSite:
    softmax: fx.Node
    scores: fx.Node  # the Q·Kᵀ product
    output: fx.Node  # the P·V product
    q: fx.Node
    k: fx.Node  # as it enters Q·Kᵀ (may be transposed)
    v: fx.Node
    module: str
    layout: str  # "BHSD" (4-D) or "(BH)SD" (3-D)
    heads: int | None
    kv_heads: int | None
    head_dim: int | None
    v_head_dim: int | None
    modifiers: list[str] = dataclasses.field(default_factory=list)  # score ops between QKᵀ and softmax
    dropout: bool = False

    def kv_bytes_per_token(self, dtype_bytes: int) -> int | None:
        if self.kv_heads is None or self.head_dim is None:
            return None
        return self.kv_heads * (self.head_dim + (self.v_head_dim or self.head_dim)) * dtype_bytes


@dataclasses.dataclass
class SoftmaxReport:
    """Every softmax in the graph: an attention site, or the reason (and closest match) it is not."""

    node: fx.Node
    module: str
    site: AttentionSite | None
    reason: str = ""


def _softmax_dim(n: fx.Node) -> int | None:
    dim = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim")
    v = _val(n)
    if dim is None or v is None:
        return None
    return dim % v.dim()


def _walk_back(n: fx.Node, ops: set, mods: list[str]) -> fx.Node:
    """Follow the main (same-shape tensor) input through score modifiers, naming each."""
    cur = n
    while isinstance(cur, fx.Node) and cur.op == "call_function" and cur.target in ops:
        mods.append(str(cur.target.overloadpacket.__name__) if hasattr(cur.target, "overloadpacket") else str(cur.target))
        shape = _val(cur).shape if _val(cur) is not None else None
        nxt = None
        for a in cur.args:
            va = _val(a) if isinstance(a, fx.Node) else None
            if va is not None and shape is not None and va.shape == shape and va.is_floating_point():
                if nxt is None or (a.op == "call_function" and a.target in MATMUL_OPS | ops):
                    nxt = a
        if nxt is None:
            break
        cur = nxt
    return cur


def _heads_from_layout(q: fx.Node, k: fx.Node, v: fx.Node):
    vq, vk, vv = _val(q), _val(k), _val(v)
    if vq is None or vk is None or vv is None:
        return "?", None, None, None, None
    if vq.dim() == 4:
        kh = vk.shape[1]
        return "BHSD", _int(vq.shape[1]), _int(kh), _int(vq.shape[-1]), _int(vv.shape[-1])
    if vq.dim() == 3:
        return "(BH)SD", None, None, _int(vq.shape[-1]), _int(vv.shape[-1])
    return "?", None, None, None, None


def _kv_source_heads(k: fx.Node) -> int | None:
    """Head count of K before a repeat/expand that materialises shared K/V heads."""
    cur = k
    for _ in range(8):
        if not isinstance(cur, fx.Node) or cur.op != "call_function":
            break
        if cur.target in (aten.transpose.int, aten.permute.default, aten.contiguous.default, *_PASSTHROUGH):
            cur = cur.args[0]
            continue
        if cur.target in (aten.reshape.default, aten.view.default, aten._unsafe_view.default):
            src = cur.args[0]
            if isinstance(src, fx.Node) and src.op == "call_function" and src.target is aten.expand.default:
                base = _val(src.args[0])
                if base is not None and base.dim() == 5:
                    return _int(base.shape[1])
            break
        if cur.target is aten.repeat_interleave.self_int:
            base = _val(cur.args[0])
            return _int(base.shape[1]) if base is not None and base.dim() == 4 else None
        break
    v = _val(k)
    return _int(v.shape[1]) if v is not None and v.dim() == 4 else None


def _real_users(n: fx.Node) -> list[fx.Node]:
    """Users other than export's metadata asserts."""
    return [u for u in n.users if not (u.op == "call_function" and u.target is aten._assert_tensor_metadata.default)]


def _is_left_operand(mm: fx.Node, p: fx.Node) -> bool:
    if mm.target is aten.einsum.default:
        return mm.args[1][0] is p
    return mm.args[0] is p


def _classify(sm: fx.Node) -> SoftmaxReport:
    mod = module_path(sm)
    dim, v = _softmax_dim(sm), _val(sm)
    if v is None or dim is None:
        return SoftmaxReport(sm, mod, None, "softmax without shape information")
    if dim != v.dim() - 1:
        return SoftmaxReport(sm, mod, None, f"softmax over axis {dim}, not the last (key) axis")
    mods: list[str] = []
    scores = _walk_back(sm.args[0], _PASSTHROUGH | _SCALE_OPS | _MASK_OPS | {aten.tanh.default}, mods)
    if not (isinstance(scores, fx.Node) and scores.op == "call_function" and scores.target in MATMUL_OPS):
        what = scores.target if isinstance(scores, fx.Node) else scores
        return SoftmaxReport(sm, mod, None, f"softmax input is not a product of Q and Kᵀ (closest: reached {what} after {mods or 'nothing'})")
    # forward: softmax -> casts/dropout -> matmul with V (the probabilities as the left operand)
    cur, dropout = sm, False
    while True:
        users = _real_users(cur)
        if len(users) != 1:
            return SoftmaxReport(sm, mod, None, f"attention probabilities are used {len(users)} times "
                                 "(returned or reused), so fusing would lose them")
        u = users[0]
        if u.op == "call_function" and u.target in _PASSTHROUGH | _DROPOUT:
            dropout = dropout or u.target in _DROPOUT
            cur = u
            continue
        break
    if u.op != "call_function" or u.target not in MATMUL_OPS or not _is_left_operand(u, cur):
        return SoftmaxReport(sm, mod, None, f"probabilities do not multiply V (closest: Q·Kᵀ -> softmax found, "
                                            f"then {u.target if u.op == 'call_function' else u.op})")
    users = [u]
    out = users[0]
    if scores.target is aten.einsum.default:
        q, k = scores.args[1][0], scores.args[1][1]
        v_node = out.args[1][1] if out.target is aten.einsum.default else out.args[1]
    else:
        q, k = scores.args[0], scores.args[1]
        v_node = out.args[1]
    layout, heads, kvh, hd, vhd = _heads_from_layout(q, v_node, v_node)
    src_heads = _kv_source_heads(v_node)
    if src_heads is not None:
        kvh = src_heads
    site = AttentionSite(sm, scores, out, q, k, v_node, mod, layout, heads, kvh, hd, vhd, mods, dropout)
    return SoftmaxReport(sm, mod, site)


def find_attention(gm: fx.GraphModule) -> list[SoftmaxReport]:
    """Classify every softmax in the graph, in graph order."""
    return [_classify(n) for n in gm.graph.nodes if n.op == "call_function" and n.target in SOFTMAX_OPS]
