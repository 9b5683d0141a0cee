"""Attention analysis: find every attention site in a captured graph by what attention *is*.

An attention site is a softmax over the last (key) axis whose input is, after optional score
modifiers (scale by mul/div, additive bias or mask, masked_fill/where, dtype casts, tanh capping),
a product of Q and Kᵀ (matmul, bmm or einsum), and whose output, after optional dropout and casts,
is the left operand of a product with V. A call of ``scaled_dot_product_attention`` is a site that
is already fused. Each site records the q/k/v nodes, the score chain, head counts and head dim
(where the layout tells them), any materialised K/V head repeat, and the module path. Passes
consume these records instead of re-deriving them.
"""

from __future__ import annotations

import dataclasses
import re

import torch
import torch.fx as fx

from .pass_infra import module_path

__all__ = ["AttentionSite", "SoftmaxReport", "find_attention", "attention_sites", "untranspose", "INPLACE", "RESHAPES", "val", "real_users", "SOFTMAX_OPS", "MATMUL_OPS", "SDPA_OPS"]

aten = torch.ops.aten
SOFTMAX_OPS = {aten.softmax.int, aten._softmax.default, aten._safe_softmax.default}
MATMUL_OPS = {aten.matmul.default, aten.bmm.default, aten.einsum.default}
SCORE_OPS = MATMUL_OPS | {aten.baddbmm.default}  # baddbmm(bias, q, kᵀ, beta, alpha): ALiBi in Bloom
SDPA_OPS = {aten.scaled_dot_product_attention.default, aten._scaled_dot_product_cudnn_attention.default,
            aten._scaled_dot_product_flash_attention.default, aten._scaled_dot_product_efficient_attention.default}
CASTS = {aten.to.dtype, aten.to.dtype_layout, aten._to_copy.default, aten.type_as.default,
         aten.contiguous.default, aten.clone.default, aten.alias.default}
DROPOUT = {aten.dropout.default, aten.native_dropout.default, aten.feature_dropout.default}
SCALE_OPS = {aten.mul.Tensor, aten.mul.Scalar, aten.div.Tensor, aten.div.Scalar}
MASK_OPS = {aten.add.Tensor, aten.sub.Tensor, aten.masked_fill.Scalar, aten.masked_fill.Tensor,
            aten.where.self, aten.where.ScalarOther, aten.where.ScalarSelf}
CAP_OPS = {aten.tanh.default}
# in-place spellings that export keeps (Falcon's `scores /= sqrt(d)`) and their meaning
INPLACE = {aten.mul_.Tensor: aten.mul.Tensor, aten.mul_.Scalar: aten.mul.Scalar, aten.div_.Tensor: aten.div.Tensor,
           aten.div_.Scalar: aten.div.Scalar, aten.add_.Tensor: aten.add.Tensor, aten.sub_.Tensor: aten.sub.Tensor,
           aten.masked_fill_.Scalar: aten.masked_fill.Scalar, aten.masked_fill_.Tensor: aten.masked_fill.Tensor}
RESHAPES = {aten.view.default, aten.reshape.default, aten._unsafe_view.default}
CHAIN_OPS = CASTS | SCALE_OPS | MASK_OPS | CAP_OPS | set(INPLACE) | RESHAPES
_ASSERT = aten._assert_tensor_metadata.default


def val(n):
    """The FakeTensor a node computes (from export's meta), or None."""
    v = n.meta.get("val") if isinstance(n, fx.Node) else None
    return v if isinstance(v, torch.Tensor) else None


def _int(x):
    try:
        return int(x)
    except (TypeError, ValueError):
        return None


def real_users(n: fx.Node) -> list[fx.Node]:
    """Users other than export's metadata asserts."""
    return [u for u in n.users if not (u.op == "call_function" and u.target is _ASSERT)]


@dataclasses.dataclass
class AttentionSite:
    softmax: fx.Node | None  # None for an already fused site
    scores: fx.Node | None  # the Q·Kᵀ product
    output: fx.Node  # the P·V product (or the fused call)
    q: fx.Node  # (…, Sq, D)
    k: fx.Node  # as it enters the Q·Kᵀ product: (…, D, Sk) for matmul/bmm, (…, Sk, D) for einsum
    v: fx.Node  # (…, Sk, Dv)
    module: str
    layout: str  # "BHSD", "(BH)SD" or "?"
    heads: int | None
    kv_heads: int | None  # after removing a materialised repeat
    head_dim: int | None
    v_head_dim: int | None
    chain: list[fx.Node] = dataclasses.field(default_factory=list)  # QKᵀ -> ... -> softmax input, in order
    after: list[fx.Node] = dataclasses.field(default_factory=list)  # softmax -> ... -> P (casts, dropout)
    k_transposed: bool = True  # k enters as Kᵀ
    kv_repeat: tuple[fx.Node, fx.Node, int] | None = None  # (k source, v source, repeat factor)
    fused: bool = False
    cross: bool = False  # query and key sequence lengths are different symbols

    @property
    def modifiers(self) -> list[str]:
        return [_opname(n) for n in self.chain]

    @property
    def dropout(self) -> bool:
        return any(n.target in DROPOUT for n in self.after)

    def kv_bytes_per_token(self, dtype_bytes: int) -> int | None:
        if self.kv_heads is None or self.head_dim is None:
            return None
        return self.kv_heads * (self.head_dim + (self.v_head_dim or self.head_dim)) * dtype_bytes


@dataclasses.dataclass
class SoftmaxReport:
    """Every softmax (or fused attention call) in the graph: a site, or the reason it is not one."""

    node: fx.Node
    module: str
    site: AttentionSite | None
    reason: str = ""


def _opname(n: fx.Node) -> str:
    t = n.target
    return t.overloadpacket.__name__ if hasattr(t, "overloadpacket") else getattr(t, "__name__", str(t))


def _softmax_dim(n: fx.Node) -> int | None:
    dim = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim")
    v = val(n)
    if dim is None or v is None:
        return None
    return dim % v.dim()


def _find_scores(start, shape) -> tuple[fx.Node | None, list[fx.Node], str]:
    """Search back from the softmax input through chain ops for the Q·Kᵀ product.

    Explores every same-shape floating operand (depth-first, nearest first), so a score bias made
    by other matmuls (relative position terms) is not mistaken for the main product unless it is one.
    Returns (product, chain from product to softmax input in order, closest miss).
    """
    best_miss = "nothing"

    def visit(n, path, depth):
        nonlocal best_miss
        if not isinstance(n, fx.Node) or depth > 12:
            return None
        if n.op == "call_function" and n.target in SCORE_OPS:
            v = val(n)
            if v is not None and tuple(v.shape[-2:]) == tuple(shape[-2:]) or v is None:
                return n, path
        if n.op != "call_function" or n.target not in CHAIN_OPS:
            if depth >= len(path):
                best_miss = f"{_opname(n) if n.op == 'call_function' else n.op} after {[_opname(p) for p in reversed(path)] or 'nothing'}"
            return None
        vn = val(n)
        if n.target in RESHAPES:
            cands = [n.args[0]]
        else:
            cands = [a for a in n.args if isinstance(a, fx.Node) and val(a) is not None and val(a).is_floating_point()
                     and (vn is None or val(a).dim() == vn.dim())]
        cands.sort(key=lambda a: (a.op != "call_function" or a.target not in SCORE_OPS | CHAIN_OPS))
        for a in cands:
            found = visit(a, path + [n], depth + 1)
            if found:
                return found
        return None

    found = visit(start, [], 0)
    if not found:
        return None, [], best_miss
    prod, path = found
    return prod, list(reversed(path)), ""


_EINSUM_TERM = re.compile(r"^([a-zA-Z.]*)$")


def _einsum_roles(eq: str):
    """For 'bhqd,bhkd->bhqk' return (q letter, k letter, contracted letter) or None."""
    eq = eq.replace(" ", "")
    if "->" not in eq:
        return None
    ins, out = eq.split("->")
    parts = ins.split(",")
    if len(parts) != 2 or not all(_EINSUM_TERM.match(p) for p in parts):
        return None
    a, b = parts
    if len(a) < 2 or len(b) < 2 or a[:-2] != b[:-2] or out[:-2] != a[:-2]:
        return None
    return a, b, out


def _qk_from_product(prod: fx.Node):
    """(q, k, k_transposed) from the Q·Kᵀ product, or a reason string."""
    if prod.target is aten.einsum.default:
        roles = _einsum_roles(prod.args[0])
        if roles is None:
            return f"einsum '{prod.args[0]}' is not a batched Q·Kᵀ"
        a, b, out = roles
        if a[-1] == b[-1] and out[-2:] == a[-2] + b[-2]:  # ...qd,...kd->...qk
            return prod.args[1][0], prod.args[1][1], False
        if a[-1] == b[-2] and out[-2:] == a[-2] + b[-1]:  # ...qd,...dk->...qk
            return prod.args[1][0], prod.args[1][1], True
        return f"einsum '{prod.args[0]}' is not a batched Q·Kᵀ"
    if prod.target is aten.baddbmm.default:
        return prod.args[1], prod.args[2], True
    return prod.args[0], prod.args[1], True


def _v_from_product(out: fx.Node, p: fx.Node):
    if out.target is aten.einsum.default:
        roles = _einsum_roles(out.args[0])
        if roles is None or out.args[1][0] is not p:
            return None
        a, b, o = roles
        if a[-1] == b[-2] and o[-2:] == a[-2] + b[-1]:  # ...qk,...kd->...qd
            return out.args[1][1]
        return None
    return out.args[1] if out.args[0] is p else None


def _strip_repeat(n: fx.Node) -> tuple[fx.Node, int] | None:
    """If n materialises repeated K/V heads of a (B, Hkv, S, D) tensor, return (that tensor, repeat)."""
    v = val(n)
    if v is None or v.dim() != 4 or n.op != "call_function":
        return None
    if n.target is aten.repeat_interleave.self_int and (n.args[2] if len(n.args) > 2 else n.kwargs.get("dim")) in (1, -3):
        return n.args[0], int(n.args[1])
    if n.target in (aten.reshape.default, aten.view.default, aten._unsafe_view.default):
        e = n.args[0]
        if isinstance(e, fx.Node) and e.op == "call_function" and e.target is aten.expand.default:
            ve = val(e)
            src = e.args[0]
            while isinstance(src, fx.Node) and src.op == "call_function" and src.target in (aten.slice.Tensor, aten.unsqueeze.default, aten.alias.default):
                if src.target is aten.unsqueeze.default and val(src.args[0]) is not None and val(src.args[0]).dim() == 4:
                    src = src.args[0]
                    break
                src = src.args[0]
            vs = val(src)
            if ve is not None and ve.dim() == 5 and vs is not None and vs.dim() == 4 and _int(ve.shape[2]):
                if _int(vs.shape[1]) == _int(ve.shape[1]):
                    return src, _int(ve.shape[2])
    return None


def _layout(q, k_seq_first, v):
    vq, vk, vv = val(q), val(k_seq_first), val(v)
    if vq is None or vk is None or vv is None:
        return "?", None, None, None, None
    if vq.dim() == 4:
        return "BHSD", _int(vq.shape[1]), _int(vk.shape[1]) if vk.dim() == 4 else None, _int(vq.shape[-1]), _int(vv.shape[-1])
    if vq.dim() == 3:
        return "(BH)SD", None, None, _int(vq.shape[-1]), _int(vv.shape[-1])
    return "?", None, None, _int(vq.shape[-1]), _int(vv.shape[-1])


def _same_len(a, b) -> bool:
    try:
        return str(a) == str(b)
    except Exception:  # noqa: BLE001
        return False


def _classify(sm: fx.Node) -> SoftmaxReport:
    mod = module_path(sm)
    dim, v = _softmax_dim(sm), val(sm)
    if v is None or dim is None:
        return SoftmaxReport(sm, mod, None, "softmax without shape information")
    if dim != v.dim() - 1:
        return SoftmaxReport(sm, mod, None, f"softmax over axis {dim}, not the last (key) axis")
    if v.dim() < 3:
        return SoftmaxReport(sm, mod, None, f"softmax of a rank-{v.dim()} tensor, not of (batch…, query, key) scores")
    prod, chain, miss = _find_scores(sm.args[0], v.shape)
    if prod is None:
        return SoftmaxReport(sm, mod, None, f"softmax input is not a product of Q and Kᵀ (closest: reached {miss})")
    qk = _qk_from_product(prod)
    if isinstance(qk, str):
        return SoftmaxReport(sm, mod, None, qk)
    q, k, k_transposed = qk
    cur, after = sm, []
    while True:
        users = real_users(cur)
        if len(users) != 1:
            return SoftmaxReport(sm, mod, None, f"attention probabilities are used {len(users)} times "
                                 "(returned or reused), so fusing would lose them")
        u = users[0]
        if u.op == "call_function" and u.target in CASTS | DROPOUT | RESHAPES:
            after.append(u)
            cur = u
            continue
        break
    if u.op != "call_function" or u.target not in MATMUL_OPS:
        return SoftmaxReport(sm, mod, None, "probabilities do not multiply V (closest: Q·Kᵀ -> softmax found, "
                             f"then {_opname(u) if u.op == 'call_function' else u.op})")
    v_node = _v_from_product(u, cur)
    if v_node is None:
        return SoftmaxReport(sm, mod, None, "probabilities are not the left operand of the product with V")
    k_rep, v_rep = _strip_repeat(k if not k_transposed else untranspose(k) or k), _strip_repeat(v_node)
    kv_repeat = None
    if k_rep and v_rep and k_rep[1] == v_rep[1]:
        kv_repeat = (k_rep[0], v_rep[0], k_rep[1])
    layout, heads, kvh, hd, vhd = _layout(q, v_node, v_node)
    if kv_repeat is not None:
        kvh = _int(val(kv_repeat[1]).shape[1])
    if layout == "(BH)SD":  # heads split off the scores on the way (DeBERTa, Bloom): (B·H, S, S) -> (B, H, S, S)
        split = [n for n in chain if n.target in RESHAPES and val(n) is not None and val(n).dim() == 4]
        if split:
            heads = kvh = _int(val(split[0]).shape[1])
    vq, vv = val(q), val(v_node)
    cross = vq is not None and vv is not None and not _same_len(vq.shape[-2], vv.shape[-2])
    site = AttentionSite(sm, prod, u, q, k, v_node, mod, layout, heads, kvh, hd, vhd, chain, after,
                         k_transposed, kv_repeat, cross=cross)
    return SoftmaxReport(sm, mod, site)


def untranspose(kT: fx.Node) -> fx.Node | None:
    """K (…, S, D) if kT is a transpose of its last two axes, else None."""
    if not isinstance(kT, fx.Node) or kT.op != "call_function":
        return None
    vk = val(kT)
    if kT.target is aten.transpose.int and vk is not None:
        d0, d1 = sorted(a % vk.dim() for a in kT.args[1:3])
        if (d0, d1) == (vk.dim() - 2, vk.dim() - 1):
            return kT.args[0]
    if kT.target is aten.permute.default and vk is not None:
        perm = [p % vk.dim() for p in kT.args[1]]
        if perm[:-2] == list(range(vk.dim() - 2)) and perm[-2:] == [vk.dim() - 1, vk.dim() - 2]:
            return kT.args[0]
    return None


def _fused_site(n: fx.Node) -> SoftmaxReport:
    q, k, v = n.args[:3]
    layout, heads, kvh, hd, vhd = _layout(q, k, v)
    site = AttentionSite(None, None, n, q, k, v, module_path(n), layout, heads, kvh, hd, vhd,
                         k_transposed=False, fused=True)
    site.cross = val(q) is not None and val(k) is not None and not _same_len(val(q).shape[-2], val(k).shape[-2])
    return SoftmaxReport(n, site.module, site)


def find_attention(gm: fx.GraphModule) -> list[SoftmaxReport]:
    """Classify every softmax (and every fused attention call) in the graph, in graph order."""
    out = []
    for n in gm.graph.nodes:
        if n.op != "call_function":
            continue
        if n.target in SOFTMAX_OPS:
            out.append(_classify(n))
        elif n.target in SDPA_OPS:
            out.append(_fused_site(n))
    return out


def attention_sites(gm: fx.GraphModule) -> list[AttentionSite]:
    return [r.site for r in find_attention(gm) if r.site is not None]
