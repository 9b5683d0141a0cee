"""Attention analysis: find every attention site in a captured graph by what attention *is*.

An attention site is a softmax over the last (key) axis whose input is, after optional score
modifiers (scale by mul/div, additive bias or mask, masked_fill/where, dtype casts, tanh capping),
a product of Q and Kᵀ (matmul, bmm, baddbmm or einsum), and whose output, after optional dropout and
casts, is multiplied with V over the key axis. A call of ``scaled_dot_product_attention`` is a site
that is already fused.

Layouts are read, not assumed: each axis of the score product gets a role (a batch axis, the query
positions, the key positions) from the product itself — an einsum's letters in any order and any
operand order, or matmul's (…, Sq, D) × (…, D, Sk) — and the product with V is read against those
roles. The site records, for q, k, v, the scores and the output, the permutation to SDPA's
(batch…, S, D) order, so (B, S, H, D) einsum attention and (B·H, S, D) bmm attention are the same
site to every pass. Each site also records the score chain, head counts and head dims, any
materialised K/V head repeat (along whichever axis holds the heads) and the module path; every
softmax that is not a site gets the reason, naming the op that blocked it. Passes consume these
records instead of re-deriving them.
"""

from __future__ import annotations

import dataclasses
import re

import torch
import torch.fx as fx

from .pass_infra import module_path
from .sdpa import sdpa_causal_if_unpadded

__all__ = ["AttentionSite", "SoftmaxReport", "find_attention", "attention_sites", "untranspose", "strip_repeat", "INPLACE", "RESHAPES", "val", "real_users", "data_dependent", "SOFTMAX_OPS", "MATMUL_OPS", "SDPA_OPS"]

aten = torch.ops.aten
SOFTMAX_OPS = {aten.softmax.int, aten._softmax.default, aten._safe_softmax.default}
MATMUL_OPS = {aten.matmul.default, aten.bmm.default, aten.einsum.default}
SCORE_OPS = MATMUL_OPS | {aten.baddbmm.default}  # baddbmm(bias, q, kᵀ, beta, alpha): ALiBi in Bloom
SDPA_OPS = {aten.scaled_dot_product_attention.default, aten._scaled_dot_product_cudnn_attention.default,
            aten._scaled_dot_product_flash_attention.default, aten._scaled_dot_product_efficient_attention.default,
            sdpa_causal_if_unpadded}  # the last: a run-time causal/masked choice (evo_rewrite.sdpa)
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


def data_dependent(node) -> bool:
    """Whether a value depends on the data inputs; one made only from weights, buffers, constants and sizes
    (``sym_size``: shapes, positions) is constant in the data — a mask, a bias, a norm's weight."""
    seen, stack = set(), [node]
    while stack:
        n = stack.pop()
        if not isinstance(n, fx.Node) or n in seen:
            continue
        seen.add(n)
        if n.op == "placeholder":
            return True
        if n.op == "call_function" and n.target is aten.sym_size.int:
            continue
        stack.extend(n.all_input_nodes)
    return False


def real_users(n: fx.Node) -> list[fx.Node]:
    """Users other than export's metadata asserts."""
    return [u for u in n.users if not (u.op == "call_function" and u.target is _ASSERT)]


@dataclasses.dataclass
class AttentionSite:
    softmax: fx.Node | None  # None for an already fused site
    scores: fx.Node | None  # the Q·Kᵀ product
    output: fx.Node  # the P·V product (or the fused call)
    q: fx.Node  # (…, Sq, D)
    k: fx.Node  # as it enters the Q·Kᵀ product: (…, D, Sk) for matmul/bmm, any axis order for einsum
    v: fx.Node  # (…, Sk, Dv) for matmul/bmm, any axis order for einsum
    module: str
    layout: str  # "BHSD" (as SDPA takes it), "BSHD" (4-D in another axis order: einsum), "(BH)SD" or "?"
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
    # the layout, normalised: permute(q, q_perm) is (batch…, Sq, D), permute(k, k_perm) (batch…, Sk, D),
    # permute(v, v_perm) (batch…, Sk, Dv); permute(scores, scores_perm) is (batch…, Sq, Sk); the product
    # with V is permute(canonical output (batch…, Sq, Dv), out_perm). None: unknown (a fused site).
    q_perm: tuple[int, ...] | None = None
    k_perm: tuple[int, ...] | None = None
    v_perm: tuple[int, ...] | None = None
    scores_perm: tuple[int, ...] | None = None
    out_perm: tuple[int, ...] | None = None

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


_EINSUM_TERM = re.compile(r"^[a-zA-Z]+$")
Perm = tuple[int, ...]


def _identity(rank: int) -> Perm:
    return tuple(range(rank))


def _swap_last(rank: int) -> Perm:
    return tuple(range(rank - 2)) + (rank - 1, rank - 2)


def _einsum_terms(eq: str):
    """('bhqd', 'bhkd', 'bhqk') for 'bhqd,bhkd->bhqk'; None for ellipses, repeated letters or not two operands."""
    eq = eq.replace(" ", "")
    if "->" not in eq:
        return None
    ins, out = eq.split("->")
    parts = ins.split(",")
    if len(parts) != 2 or not all(_EINSUM_TERM.match(t) for t in (*parts, out)):
        return None
    if any(len(set(t)) != len(t) for t in (*parts, out)):
        return None
    return parts[0], parts[1], out


@dataclasses.dataclass
class _Operands:
    """Q and K of the score product, each with the permutation to (batch…, S, D), and the product's axis roles.

    Roles name the score product's axes: ``"Q"`` and ``"K"`` (the query and key positions) and the
    batch axes by the letter (or position) they carry; the canonical score layout is the batch axes in
    Q's order, then Q, then K. ``scores_perm`` takes the product to it.
    """

    q: fx.Node
    k: fx.Node
    q_perm: Perm
    k_perm: Perm
    roles: list[str]  # one per axis of the product
    batch: list[str]  # batch roles in canonical order

    @property
    def scores_perm(self) -> Perm:
        return tuple(self.roles.index(r) for r in self.batch + ["Q", "K"])


def _qk_operands(prod: fx.Node) -> _Operands | str:
    """Q and K (with their layouts) from the Q·Kᵀ product, or the reason it is not one."""
    if prod.target is aten.einsum.default:
        eq = prod.args[0]
        terms = _einsum_terms(eq)
        if terms is None:
            return f"einsum '{eq}' is not a product of two operands with named axes"
        a, b, out = terms
        contracted = [c for c in a if c in b and c not in out]
        key = out[-1]  # softmax runs over the product's last axis
        if len(contracted) != 1 or key in contracted:
            return f"einsum '{eq}' does not contract exactly one head-dim axis into (…, query, key) scores"
        if key in a and key in b or key not in a + b:
            return f"einsum '{eq}': the last (key) axis is not an axis of one operand only"
        (qt, qn), (kt, kn) = ((b, 1), (a, 0)) if key in a else ((a, 0), (b, 1))
        query = [c for c in qt if c not in kt]
        if len(query) != 1 or query[0] not in out or [c for c in kt if c not in qt] != [key]:
            return f"einsum '{eq}' is not a batched Q·Kᵀ (query and key axes unclear)"
        d = contracted[0]
        batch = [c for c in qt if c not in (query[0], d)]
        if set(batch) != set(out) - {query[0], key} or not set(batch) <= set(kt):
            return f"einsum '{eq}' broadcasts a batch axis over one operand"
        roles = ["Q" if c == query[0] else "K" if c == key else c for c in out]
        q_perm = tuple(qt.index(c) for c in batch + [query[0], d])
        k_perm = tuple(kt.index(c) for c in batch + [key, d])
        return _Operands(prod.args[1][qn], prod.args[1][kn], q_perm, k_perm, roles, batch)
    q, kT = (prod.args[1], prod.args[2]) if prod.target is aten.baddbmm.default else (prod.args[0], prod.args[1])
    vq, vs = val(q), val(prod)
    rank = vs.dim() if vs is not None else (vq.dim() if vq is not None else 4)
    batch = [str(i) for i in range(rank - 2)]
    vk = val(kT)
    q_perm = _identity(vq.dim()) if vq is not None else _identity(rank)
    k_perm = _swap_last(vk.dim()) if vk is not None else _swap_last(rank)
    if vq is not None and vk is not None and (vq.dim() != rank or vk.dim() != rank):
        return f"{_opname(prod)} broadcasts operands of rank {vq.dim()} and {vk.dim()}"
    return _Operands(q, kT, q_perm, k_perm, batch + ["Q", "K"], batch)


def _pv_operands(out: fx.Node, p: fx.Node, ops: _Operands, p_rank_matches: bool):
    """(v, v_perm, out_perm) of the product with V, or the reason it is not one.

    ``out_perm`` takes the canonical output (batch…, Sq, Dv) to the product's own layout.
    """
    if out.target is aten.einsum.default:
        eq = out.args[0]
        terms = _einsum_terms(eq)
        if terms is None:
            return f"einsum '{eq}' (the product with V) is not a product of two operands with named axes"
        a, b, o = terms
        if out.args[1][0] is p:
            pt, vt, vn = a, b, out.args[1][1]
        elif out.args[1][1] is p:
            pt, vt, vn = b, a, out.args[1][0]
        else:
            return "probabilities are not an operand of the product with V"
        if not p_rank_matches or len(pt) != len(ops.roles):
            return f"einsum '{eq}': the probabilities' axes cannot be matched to the scores' axes"
        role = dict(zip(pt, ops.roles))
        kl = next(c for c, r in role.items() if r == "K")
        ql = next(c for c, r in role.items() if r == "Q")
        extra = [c for c in vt if c not in role]
        if kl not in vt or kl in o or len(extra) != 1 or ql in vt or set(o) != (set(pt) - {kl}) | set(extra):
            return f"einsum '{eq}' is not probabilities × V over the key axis"
        role[extra[0]] = "E"
        letter = {r: c for c, r in role.items()}
        if not all(letter[r] in vt for r in ops.batch):
            return f"einsum '{eq}' broadcasts V over a batch axis"
        v_perm = tuple(vt.index(letter[r]) for r in ops.batch + ["K", "E"])
        canon = ops.batch + ["Q", "E"]
        out_perm = tuple(canon.index(role[c]) for c in o)
        return vn, v_perm, out_perm
    if out.args[0] is not p:
        return "probabilities are not the left operand of the product with V"
    if ops.scores_perm != _identity(len(ops.roles)):
        return f"{_opname(out)} multiplies probabilities of a permuted score layout"
    v = out.args[1]
    vv = val(v)
    rank = vv.dim() if vv is not None else len(ops.roles)
    return v, _identity(rank), _identity(rank)


def _arange_floordiv(n) -> int | None:
    """r when n is ``arange(H) // r`` (the head index of a K/V repeat by indexing), else None."""
    if not isinstance(n, fx.Node) or n.op != "call_function":
        return None
    if n.target is aten.floor_divide.default or (n.target is aten.div.Tensor_mode and n.kwargs.get("rounding_mode") == "floor"):
        src, r = n.args[0], n.args[1]
        if isinstance(src, fx.Node) and src.target in (aten.arange.default, aten.arange.start) and isinstance(r, int):
            return r
    return None


def strip_repeat(n: fx.Node, axis: int = 1) -> tuple[fx.Node, int] | None:
    """If n materialises repeated K/V heads along ``axis`` of a 4-D tensor, return (the unrepeated tensor, repeat).

    The spellings: ``repeat_interleave(r, dim=axis)``; HF's ``x.unsqueeze(axis+1).expand(…, r, …).reshape``;
    indexing the heads with ``arange(H) // r``.
    """
    v = val(n)
    if v is None or v.dim() != 4 or n.op != "call_function":
        return None
    axis %= 4
    if n.target is aten.repeat_interleave.self_int:
        dim = n.args[2] if len(n.args) > 2 else n.kwargs.get("dim")
        if dim is not None and dim % 4 == axis and isinstance(n.args[1], int):
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
            if ve is not None and ve.dim() == 5 and vs is not None and vs.dim() == 4 and _int(ve.shape[axis + 1]):
                es, ss, rep = [str(d) for d in ve.shape], [str(d) for d in vs.shape], _int(ve.shape[axis + 1])
                if es[:axis + 1] + es[axis + 2:] == ss and _int(v.shape[axis]) == _int(vs.shape[axis]) * rep:
                    return src, rep
    if n.target is aten.index.Tensor:
        src, idx = n.args[0], list(n.args[1])
        if len(idx) == axis + 1 and all(i is None for i in idx[:-1]):
            r = _arange_floordiv(idx[-1])
            vs = val(src)
            if r and vs is not None and _int(vs.shape[axis]) and _int(vs.shape[axis]) * r == _int(v.shape[axis]):
                return src, r
    return None


def _permuted_dim(t: fx.Node, perm: Perm, axis: int):
    v = val(t)
    return _int(v.shape[perm[axis]]) if v is not None and len(perm) == v.dim() else None


def _layout(q, k_seq_first, v):
    """Layout, heads, K/V heads, head dims of SDPA-ordered (…, S, D) operands."""
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
    ops = _qk_operands(prod)
    if isinstance(ops, str):
        return SoftmaxReport(sm, mod, None, ops)
    cur, after = sm, []
    while True:
        users = real_users(cur)
        if len(users) != 1:
            return SoftmaxReport(sm, mod, None, f"attention probabilities are used {len(users)} times "
                                 f"({', '.join(_opname(u) if u.op == 'call_function' else u.op for u in users)}: "
                                 "returned or reused), so fusing would lose them")
        u = users[0]
        if u.op == "call_function" and u.target in CASTS | DROPOUT | RESHAPES:
            after.append(u)
            cur = u
            continue
        break
    if u.op != "call_function" or u.target not in MATMUL_OPS:
        return SoftmaxReport(sm, mod, None, "probabilities do not multiply V (closest: Q·Kᵀ -> softmax found, "
                             f"then {_opname(u) if u.op == 'call_function' else u.op})")
    vp, vprod = val(cur), val(prod)
    same_rank = vp is not None and vprod is not None and vp.dim() == vprod.dim()
    pv = _pv_operands(u, cur, ops, same_rank)
    if isinstance(pv, str):
        return SoftmaxReport(sm, mod, None, pv)
    v_node, v_perm, out_perm = pv
    q, k = ops.q, ops.k
    k_transposed = prod.target is not aten.einsum.default
    vq = val(q)
    four = vq is not None and vq.dim() == 4
    kv_repeat = None
    if four:
        k_seq = (untranspose(k) if k_transposed else None)
        k_rep = strip_repeat(k_seq, 1) if k_seq is not None else strip_repeat(k, ops.k_perm[1])
        v_rep = strip_repeat(v_node, v_perm[1])
        if k_rep and v_rep and k_rep[1] == v_rep[1]:
            kv_repeat = (k_rep[0], v_rep[0], k_rep[1])
    identity = ops.q_perm == _identity(len(ops.q_perm)) and ops.scores_perm == _identity(len(ops.roles)) \
        and out_perm == _identity(len(out_perm)) and v_perm == _identity(len(v_perm))
    layout = "?" if vq is None else "BHSD" if four and identity else "BSHD" if four else "(BH)SD" if vq.dim() == 3 else "?"
    heads = _permuted_dim(q, ops.q_perm, 1) if four else None
    kvh = _permuted_dim(v_node, v_perm, 1) if four else None
    if kv_repeat is not None:
        kvh = _permuted_dim(kv_repeat[1], v_perm, 1)
    hd = _permuted_dim(q, ops.q_perm, -1)
    vhd = _permuted_dim(v_node, v_perm, -1)
    if layout == "(BH)SD":  # heads split off the scores on the way (DeBERTa, Bloom): (B·H, S, S) -> (B, H, S, S)
        split = [n for n in chain if n.target in RESHAPES and val(n) is not None and val(n).dim() == 4]
        if split:
            heads = kvh = _int(val(split[0]).shape[1])
    vv = val(v_node)
    cross = vq is not None and vv is not None and not _same_len(vq.shape[ops.q_perm[-2]], vv.shape[v_perm[-2]])
    site = AttentionSite(sm, prod, u, q, k, v_node, mod, layout, heads, kvh, hd, vhd, chain, after,
                         k_transposed, kv_repeat, cross=cross, q_perm=ops.q_perm, k_perm=ops.k_perm, v_perm=v_perm,
                         scores_perm=ops.scores_perm, out_perm=out_perm)
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
    if kT.target is aten.mT.default:
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
