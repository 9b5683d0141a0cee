"""What ``fuse`` looks for, stated as what each subgraph computes (the pass is ``passes/fuse.py``).

Each matcher takes one anchor node of the ATen graph and returns a site (the operands of the fused
operator and the nodes it replaces), None when the anchor is not that kind of subgraph at all, or
raises :class:`Miss` with the reason when it nearly is (the report lists those).

norm       x · rsqrt(mean(x²) + eps) [· w] — anchor: the inverse RMS (rsqrt, or sqrt as a divisor);
           casts around it decide the casting mode (Llama: fp32 then back before w; Gemma: w in fp32
           as (1 + w), back at the end); (x − mean x) in place of x is a LayerNorm (+ optional bias)
mlp        act(a) · b, act ∈ {silu, gelu, gelu tanh} — anchor: the product
rotary     x · cos + rot(x) · sin, rot = cat(−x[…, h:], x[…, :h]) or interleaved stack(−x[…, 1::2],
           x[…, ::2]).flatten(−2) — anchor: the sum
loss       cross_entropy(linear(h, W, b) [cast, flatten], target) — anchor: the loss
"""

from __future__ import annotations

import dataclasses

import torch
import torch.fx as fx

from evo_rewrite.attention import RESHAPES, data_dependent, real_users, val
from evo_rewrite.pass_infra import module_path

aten = torch.ops.aten
DTYPE_CASTS = {aten.to.dtype, aten.to.dtype_layout, aten._to_copy.default, aten.type_as.default}
COPIES = {aten.contiguous.default, aten.clone.default, aten.alias.default}
ACTIVATIONS = {aten.silu.default: "silu", aten.gelu.default: "gelu"}
_END = 2**62  # a slice end at or beyond this is "to the end"


class Miss(Exception):
    """A near miss: the subgraph is almost the kind looked for; the message says why it is not."""


def _call(n, *targets) -> bool:
    return isinstance(n, fx.Node) and n.op == "call_function" and n.target in targets


def _const(x):
    """A Python number for a scalar argument, else None."""
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else None


def _other(n: fx.Node, x):
    """The operand of a binary node that is not ``x``."""
    a, b = n.args[0], n.args[1]
    return b if a is x else a


def strip_casts(n):
    """(base, casts): follow dtype casts and copies back to the value they start from."""
    casts = []
    while _call(n, *DTYPE_CASTS, *COPIES):
        casts.append(n)
        n = n.args[0]
    return n, casts


def _single_next(n: fx.Node, *targets):
    """The only user of ``n`` when it is one of ``targets``, else None."""
    users = real_users(n)
    return users[0] if len(users) == 1 and _call(users[0], *targets) else None


def _last_dim(n, dim) -> bool:
    v = val(n)
    return v is not None and isinstance(dim, int) and dim in (-1, v.dim() - 1)


def _dim_list_last(n, dims) -> bool:
    return isinstance(dims, (list, tuple)) and len(dims) == 1 and _last_dim(n, dims[0])


def _check_private(inner, out, kind: str) -> None:
    """Every node of a subgraph but its output is used only inside it (else fusing would recompute it)."""
    own = set(inner)
    for n in inner:
        if n is not out and any(u not in own for u in real_users(n)):
            raise Miss(f"an intermediate of the {kind} ({n.name}) is used elsewhere")


def _uniform_dtype(nodes) -> bool:
    return len({val(n).dtype for n in nodes if val(n) is not None}) <= 1


# --------------------------------------------------------------------------------------------
# norms
# --------------------------------------------------------------------------------------------

@dataclasses.dataclass
class NormSite:
    kind: str  # "rms" or "layer"
    x: fx.Node  # the input, before any upcast
    weight: fx.Node | None  # the 1-D weight tensor (before its casts and offset)
    bias: fx.Node | None  # LayerNorm only
    eps: float
    offset: float  # Gemma: 1.0 (the weight is 1 + w)
    casting: str  # llama | gemma | none
    output: fx.Node  # the node the fused operator replaces
    inner: list[fx.Node]  # every node of the subgraph (erased when unused)
    module: str


def _weight_expr(w, width):
    """(base weight, offset) when ``w`` is a 1-D weight of ``width`` elements, maybe cast and offset by a constant."""
    base, _ = strip_casts(w)
    offset = 0.0
    if _call(base, aten.add.Tensor, aten.add.Scalar) and _const(base.args[1]) is not None:
        offset, base = _const(base.args[1]), strip_casts(base.args[0])[0]
    elif _call(base, aten.add.Tensor) and _const(base.args[0]) is not None:
        offset, base = _const(base.args[0]), strip_casts(base.args[1])[0]
    v = val(base)
    if v is None or v.dim() != 1 or str(v.shape[0]) != str(width):
        return None, 0.0
    if data_dependent(base):
        raise Miss("weight is data-dependent")
    return base, offset


def match_norm(anchor: fx.Node) -> NormSite | None:
    """Anchor: ``rsqrt(stat + eps)`` consumed by a product, or ``sqrt(stat + eps)`` consumed as a divisor."""
    if _call(anchor, aten.rsqrt.default):
        scale_op = _single_next(anchor, aten.mul.Tensor)
    elif _call(anchor, aten.sqrt.default):
        scale_op = _single_next(anchor, aten.div.Tensor)
        scale_op = scale_op if scale_op is not None and scale_op.args[1] is anchor else None
    else:
        return None
    ve = anchor.args[0]
    if scale_op is None or not _call(ve, aten.add.Tensor, aten.add.Scalar):
        return None
    stat, eps = ve.args[0], ve.args[1]
    if not isinstance(stat, fx.Node):
        stat, eps = ve.args[1], ve.args[0]
    centred_in = _other(scale_op, anchor)  # what is normalised: x, x upcast, or x - mean(x)
    sq_in = None
    if _call(stat, aten.mean.dim) and _dim_list_last(stat, stat.args[1]) and (stat.args[2] if len(stat.args) > 2 else stat.kwargs.get("keepdim")):
        sq = stat.args[0]
        if _call(sq, aten.pow.Tensor_Scalar) and sq.args[1] == 2:
            sq_in = sq.args[0]
        elif _call(sq, aten.mul.Tensor) and sq.args[0] is sq.args[1]:
            sq_in = sq.args[0]
        elif _call(sq, aten.square.default):
            sq_in = sq.args[0]
        inner_stat = [stat, sq]
    elif _call(stat, aten.var.correction) and stat.kwargs.get("correction", 1) == 0 and stat.kwargs.get("keepdim"):
        sq_in, inner_stat = "var", [stat]
    else:
        return None
    if sq_in is None:
        return None
    if _const(eps) is None:
        raise Miss("eps is not a constant")
    v_out = val(scale_op)
    if v_out is None or v_out.dim() == 0:
        return None
    width = v_out.shape[-1]
    module = module_path(scale_op)

    # LayerNorm: the normalised value is x - mean(x)
    if _call(centred_in, aten.sub.Tensor) and _call(centred_in.args[1], aten.mean.dim):
        x, mu = centred_in.args[0], centred_in.args[1]
        if mu.args[0] is not x or not _dim_list_last(mu, mu.args[1]):
            return None
        same = sq_in is centred_in or (_call(sq_in, aten.sub.Tensor) and sq_in.args[:2] == centred_in.args[:2]
                                       and not sq_in.kwargs and not centred_in.kwargs)  # (x - mu) written twice
        if sq_in != "var" and not same:
            raise Miss("the variance is not of the centred input")
        if sq_in == "var" and stat.args[0] not in (x, centred_in):
            raise Miss("the variance is not of the normalised input")
        kind, inner = "layer", [mu, centred_in, *inner_stat, ve, anchor, scale_op]
        if sq_in != "var" and sq_in is not centred_in:
            inner.insert(0, sq_in)
        upcast = False
    else:
        kind = "rms"
        if sq_in == "var":
            return None
        x, casts_a = strip_casts(sq_in)
        x_b, casts_b = strip_casts(centred_in)
        if x_b is not x:
            return None
        upcast = bool(casts_a or casts_b)
        if casts_a and not casts_b or casts_b and not casts_a:
            if not _uniform_dtype([x, sq_in, centred_in]):
                raise Miss("the norm multiplies the input in another dtype than it averages (T5 style)")
        inner = [*inner_stat, ve, anchor, scale_op]

    # after the scale: [cast] [· w] [cast] (+ b for LayerNorm); each step only where it is the sole user
    out, down_before, down_after, weight, bias, offset = scale_op, None, None, None, None, 0.0
    nxt = _single_next(out, *DTYPE_CASTS)
    if nxt is not None and kind == "rms":
        down_before, out = nxt, nxt
        inner.append(out)
    nxt = _single_next(out, aten.mul.Tensor)
    if nxt is not None:
        weight, offset = _weight_expr(_other(nxt, out), width)
        if weight is not None:
            out = nxt
            inner.append(out)
            nxt = _single_next(out, *DTYPE_CASTS)
            if nxt is not None and kind == "rms":
                down_after, out = nxt, nxt
                inner.append(out)
    if kind == "layer":
        nxt = _single_next(out, aten.add.Tensor)
        if nxt is not None:
            b, _ = _weight_expr(_other(nxt, out), width)
            if b is not None:
                bias, out = b, nxt
                inner.append(out)
        if offset:
            raise Miss("LayerNorm weight has an offset")
        casting = "none"
    elif upcast and down_before is not None and down_after is None:
        casting = "llama"
    elif upcast and down_before is None and down_after is not None:
        casting = "gemma"
    elif not upcast and down_before is None and down_after is None:
        casting = "none"
    elif _uniform_dtype([x, out]):
        casting = "none"  # every cast is a no-op here: any mode computes the same
    else:
        raise Miss("casts around the norm in an order the fused operator does not model")
    _check_private(inner, out, "norm")
    return NormSite(kind, x, weight, bias, float(_const(eps)), offset, casting, out, inner, module)


def residual_of(site: NormSite):
    """(a, b, outside users) when the norm's input is a residual sum ``a + b`` of equal shapes."""
    add = site.x
    if not _call(add, aten.add.Tensor) or add.kwargs.get("alpha", 1) != 1:
        return None
    a, b = add.args[0], add.args[1]
    if not (isinstance(a, fx.Node) and isinstance(b, fx.Node)):
        return None
    va, vb, vs = val(a), val(b), val(add)
    if va is None or vb is None or tuple(map(str, va.shape)) != tuple(map(str, vb.shape)) or va.dtype != vb.dtype:
        return None
    if vs is None or tuple(map(str, vs.shape)) != tuple(map(str, va.shape)):
        return None
    inner = set(site.inner)
    outside = [u for u in real_users(add) if u not in inner]
    for u in list(outside):  # a no-op cast of the sum (fp32 graphs) stands for the sum
        if _call(u, *DTYPE_CASTS, *COPIES) and val(u) is not None and val(u).dtype == vs.dtype:
            outside.remove(u)
            outside += [w for w in real_users(u) if w not in inner]
    return a, b, outside


# --------------------------------------------------------------------------------------------
# gated MLP activations
# --------------------------------------------------------------------------------------------

@dataclasses.dataclass
class GatedSite:
    a: fx.Node  # the gate (activated)
    b: fx.Node  # the up projection
    act: str  # silu | gelu | gelu_tanh
    output: fx.Node
    inner: list[fx.Node]
    split: bool  # a and b are the two halves of one fused gate/up projection
    module: str


def _split_source(n):
    """The tensor ``n`` is a chunk / split / slice of, else None."""
    if n.op == "call_function" and n.target.__name__ == "getitem" and _call(n.args[0], aten.chunk.default,
                                                                              aten.split.Tensor, aten.split_with_sizes.default):
        return n.args[0].args[0]
    if _call(n, aten.slice.Tensor):
        return n.args[0]
    return None


def match_gated(anchor: fx.Node) -> GatedSite | None:
    if not _call(anchor, aten.mul.Tensor):
        return None
    for act_node in anchor.args[:2]:
        if not _call(act_node, *ACTIVATIONS):
            continue
        b = _other(anchor, act_node)
        if not isinstance(b, fx.Node) or b is act_node:
            continue
        a = act_node.args[0]
        name = ACTIVATIONS[act_node.target]
        if name == "gelu":
            approx = act_node.kwargs.get("approximate", act_node.args[1] if len(act_node.args) > 1 else "none")
            name = "gelu_tanh" if approx == "tanh" else "gelu"
        if len(real_users(act_node)) > 1:
            raise Miss("the activation's output is used elsewhere")
        va, vb = val(a), val(b)
        if va is None or vb is None or tuple(map(str, va.shape)) != tuple(map(str, vb.shape)):
            raise Miss("gate and up operands differ in shape (a broadcast product)")
        if va.dtype != vb.dtype:
            raise Miss("gate and up operands differ in dtype")
        sa, sb = _split_source(a), _split_source(b)
        split = sa is not None and sa is sb
        return GatedSite(a, b, name, anchor, [act_node, anchor], split, module_path(anchor))
    return None


# --------------------------------------------------------------------------------------------
# rotary embeddings
# --------------------------------------------------------------------------------------------

@dataclasses.dataclass
class RotarySite:
    x: fx.Node
    cos: fx.Node
    sin: fx.Node
    interleaved: bool
    output: fx.Node
    inner: list[fx.Node]
    module: str


def _slice_parts(n):
    """(source, start, end, step) of a slice on the last axis, else None."""
    if not _call(n, aten.slice.Tensor) or not _last_dim(n.args[0], n.args[1] if len(n.args) > 1 else 0):
        return None
    start = n.args[2] if len(n.args) > 2 else 0
    end = n.args[3] if len(n.args) > 3 else _END
    step = n.args[4] if len(n.args) > 4 else 1
    return _whole(n.args[0]), start, end, step


def _whole(n):
    """``n`` without the slices that keep a whole axis (``x[:, :, :, ::2]`` exports as two of those first)."""
    while (_call(n, aten.slice.Tensor) and (n.args[2] if len(n.args) > 2 else 0) == 0
           and (n.args[3] if len(n.args) > 3 else _END) >= _END and (n.args[4] if len(n.args) > 4 else 1) == 1):
        n = n.args[0]
    return n


def _is_end(end, width) -> bool:
    return isinstance(end, int) and (end >= _END or str(end) == str(width))


def parse_rotate(r: fx.Node):
    """(x, interleaved, inner nodes) when ``r`` is rotate_half(x) or its interleaved form, None when it is
    not shaped like one; Miss when it is a rotation of another layout."""
    if _call(r, aten.cat.default) and len(r.args[0]) == 2 and _last_dim(r, r.args[1] if len(r.args) > 1 else 0):
        first, second = r.args[0]
        if not _call(first, aten.neg.default):
            if _call(second, aten.neg.default) and _slice_parts(first) and _slice_parts(second.args[0]):
                raise Miss("halves are rotated the other way (x₂, −x₁)")
            return None
        hi, lo = _slice_parts(first.args[0]), _slice_parts(second)
        if hi is None or lo is None:
            return None
        x = hi[0]
        if lo[0] is not x:
            raise Miss("the two halves are slices of different tensors")
        width = val(x).shape[-1] if val(x) is not None else None
        if not isinstance(width, int) or width % 2:
            raise Miss("the rotated width is not a known even size")
        h = width // 2
        if not (hi[1] == h and _is_end(hi[2], width) and hi[3] == 1 and lo[1] == 0 and lo[2] == h and lo[3] == 1):
            raise Miss("the halves are not the two halves of the last axis")
        return x, False, [r, first, first.args[0], second]
    if _call(r, *RESHAPES, aten.flatten.using_ints) and _call(r.args[0], aten.stack.default):
        st = r.args[0]
        if len(st.args[0]) != 2 or not _call(st.args[0][0], aten.neg.default):
            return None
        odd, even = _slice_parts(st.args[0][0].args[0]), _slice_parts(st.args[0][1])
        if odd is None or even is None:
            return None
        x = odd[0]
        vx, vr = val(x), val(r)
        if even[0] is not x or vx is None or vr is None or tuple(map(str, vx.shape)) != tuple(map(str, vr.shape)):
            raise Miss("the interleaved pairs are not of one tensor")
        if not (odd[1] == 1 and odd[3] == 2 and even[1] == 0 and even[3] == 2):
            raise Miss("the interleaved pairs are not (odd, even) of the last axis")
        dim = st.args[1] if len(st.args) > 1 else 0
        if dim not in (-1, vx.dim()):
            return None
        return x, True, [r, st, st.args[0][0], st.args[0][0].args[0], st.args[0][1]]
    return None


def match_rotary(anchor: fx.Node) -> RotarySite | None:
    if not _call(anchor, aten.add.Tensor) or anchor.kwargs.get("alpha", 1) != 1:
        return None
    m1, m2 = anchor.args[0], anchor.args[1]
    if not (_call(m1, aten.mul.Tensor) and _call(m2, aten.mul.Tensor)):
        return None
    for mx, mr in ((m1, m2), (m2, m1)):
        for r in mr.args[:2]:
            parsed = parse_rotate(r) if isinstance(r, fx.Node) else None
            if parsed is None:
                continue
            x, interleaved, inner = parsed
            xs = [a for a in mx.args[:2] if isinstance(a, fx.Node) and _whole(a) is x]
            if not xs:
                raise Miss("the rotated tensor is not the one multiplied by cos")
            cos, sin = _other(mx, xs[0]), _other(mr, r)
            if not isinstance(cos, fx.Node) or not isinstance(sin, fx.Node):
                raise Miss("cos or sin is a constant number")
            _check_private([anchor, mx, mr, *inner], anchor, "rotary")
            vx, vo = val(x), val(anchor)
            if vx is None or vo is None or tuple(map(str, vx.shape)) != tuple(map(str, vo.shape)):
                raise Miss("cos/sin broadcast the rotated tensor to another shape")
            return RotarySite(x, cos, sin, interleaved, anchor, [anchor, mx, mr, *inner], module_path(anchor))
    return None


# --------------------------------------------------------------------------------------------
# LM head + cross entropy
# --------------------------------------------------------------------------------------------

@dataclasses.dataclass
class LossSite:
    hidden: fx.Node
    weight: fx.Node
    bias: fx.Node | None
    target: fx.Node
    ignore_index: int
    reduction: str
    upcast: bool
    output: fx.Node
    inner: list[fx.Node]
    module: str


_REDUCTIONS = {0: "none", 1: "mean", 2: "sum"}


def match_loss(anchor: fx.Node) -> LossSite | None:
    """Anchor: ``aten.cross_entropy_loss`` whose input is a linear layer's output, flattened and maybe cast."""
    if not _call(anchor, aten.cross_entropy_loss.default):
        return None
    names = ("input", "target", "weight", "reduction", "ignore_index", "label_smoothing")
    defaults = dict(weight=None, reduction=1, ignore_index=-100, label_smoothing=0.0)
    args = {**defaults, **dict(zip(names, anchor.args)), **anchor.kwargs}
    if args["weight"] is not None:
        raise Miss("cross entropy has class weights")
    if args["label_smoothing"]:
        raise Miss("cross entropy has label smoothing")
    if args["reduction"] not in (1, 2):
        raise Miss("cross entropy is not reduced (reduction='none')")
    logits, chain, upcast = args["input"], [], False
    while _call(logits, *DTYPE_CASTS, *COPIES, *RESHAPES):
        if len(real_users(logits)) > 1:
            raise Miss("the logits are used elsewhere (e.g. also returned)")
        if _call(logits, *DTYPE_CASTS) and val(logits) is not None and val(logits).dtype == torch.float32:
            upcast = True
        chain.append(logits)
        logits = logits.args[0]
    if not _call(logits, aten.linear.default):
        raise Miss("the cross entropy's input is not a linear layer's output")
    if len(real_users(logits)) > 1:
        raise Miss("the logits are used elsewhere (e.g. also returned)")
    vi, vl = val(args["input"]), val(logits)
    if vi is None or vl is None or vi.dim() != 2 or str(vi.shape[-1]) != str(vl.shape[-1]):
        raise Miss("the logits are not flattened to (tokens, vocabulary)")
    hidden, weight = logits.args[0], logits.args[1]
    bias = logits.args[2] if len(logits.args) > 2 else None
    return LossSite(hidden, weight, bias, args["target"], int(args["ignore_index"]), _REDUCTIONS[args["reduction"]],
                    upcast, anchor, [anchor, *chain, logits], module_path(logits))
