"""Projection analysis: trace an attention site's q, k, v back to the linear layers that make them.

From a per-head tensor (B, H, S, D) the walk goes back through head transposes, the head-split
reshape (B, S, H·D) -> (B, S, H, D), rotary embedding (``x·cos + rotate(x)·sin``), scalar scales,
casts and the split of a fused qkv output, to a linear-like op whose weight is a ``get_attr``:
``aten.linear`` (weight (out, in)) or ``aten.addmm``/``aten.mm``/``aten.matmul`` (weight (in, out),
GPT-2's Conv1D). Forward from the attention output it finds the output projection the same way.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.fx as fx

from .attention import CASTS, RESHAPES, AttentionSite, strip_repeat, val

__all__ = ["Projection", "HeadPath", "trace_projection", "output_projection"]

aten = torch.ops.aten
_TRANSPOSES = {aten.transpose.int, aten.permute.default, aten.mT.default}
_SPLITS = {aten.split.Tensor, aten.split_with_sizes.default, aten.chunk.default, aten.unbind.int}


@dataclasses.dataclass
class Projection:
    node: fx.Node  # the linear-like op
    weight: str  # get_attr target
    bias: str | None
    layout: str  # "out_in" (nn.Linear) or "in_out" (Conv1D / x @ W)
    out_features: int
    start: int = 0  # this tensor's slice of the projection's output features
    stop: int | None = None


@dataclasses.dataclass
class HeadPath:
    """How one of q/k/v is made: the projection, its slice, the head-split reshape, rotary."""

    projection: Projection
    head_split: fx.Node | None  # the reshape (B, S, H·D) -> (B, S, H, D), or unflatten(-1, (H, D))
    heads_dim: int | None  # index of the heads entry in head_split's shape argument
    split: tuple[fx.Node, int] | None  # (split node, output index) of a fused projection
    rotary: bool
    cache: fx.Node | None = None  # the past K/V input concatenated before it (a decoder program's cache)
    # K/V head repeats between the head split and attention: (node, heads axis of its output, repeat)
    repeats: list[tuple[fx.Node, int, int]] = dataclasses.field(default_factory=list)

    @property
    def shape_arg(self) -> int:
        """The argument of ``head_split`` that holds the list with the heads entry."""
        return 2 if self.head_split is not None and self.head_split.target is aten.unflatten.int else 1

    @property
    def heads(self) -> int | None:
        """The head count the head split makes (its output is (B, S, H, D))."""
        v = val(self.head_split) if self.head_split is not None else None
        return int(v.shape[2]) if v is not None and v.dim() == 4 and isinstance(v.shape[2], int) else None


def _get_attr_target(n) -> tuple[str | None, bool]:
    """(target, transposed) of a weight operand, through t()/permute/transpose."""
    transposed = False
    while isinstance(n, fx.Node) and n.op == "call_function" and n.target in (aten.t.default, aten.transpose.int, aten.permute.default, *CASTS):
        if n.target is not aten._to_copy.default and n.target in CASTS:
            n = n.args[0]
            continue
        transposed = not transposed
        n = n.args[0]
    if isinstance(n, fx.Node) and n.op == "get_attr":
        return n.target, transposed
    return None, False


def _as_projection(n: fx.Node) -> Projection | None:
    if n.op != "call_function":
        return None
    if n.target is aten.linear.default:
        w, t = _get_attr_target(n.args[1])
        b = _get_attr_target(n.args[2])[0] if len(n.args) > 2 and n.args[2] is not None else None
        if w and not t:
            return Projection(n, w, b, "out_in", int(val(n).shape[-1]))
    if n.target is aten.addmm.default:
        w, t = _get_attr_target(n.args[2])
        b = _get_attr_target(n.args[0])[0]
        if w:
            return Projection(n, w, b, "out_in" if t else "in_out", int(val(n).shape[-1]))
    if n.target in (aten.mm.default, aten.matmul.default):
        w, t = _get_attr_target(n.args[1])
        if w:
            return Projection(n, w, None, "out_in" if t else "in_out", int(val(n).shape[-1]))
    return None


def _rotary_operand(add: fx.Node, shape) -> fx.Node | None:
    """For add(mul(x, cos), mul(rot(x), sin)) return x (the first product's same-shape operand)."""
    a = add.args[0]
    if not (isinstance(a, fx.Node) and a.op == "call_function" and a.target is aten.mul.Tensor):
        return None
    b = add.args[1]
    if not (isinstance(b, fx.Node) and b.op == "call_function" and b.target is aten.mul.Tensor):
        return None
    for x in a.args:
        vx = val(x)
        if vx is not None and tuple(map(str, vx.shape)) == tuple(map(str, shape)):
            return x
    return None


def trace_projection(t: fx.Node, max_depth: int = 24) -> HeadPath | str:
    """Walk back from a per-head tensor to its projection; a reason string when the walk fails."""
    head_split, heads_dim, split, rotary, repeats, cache = None, None, None, False, [], None
    cur = t
    for _ in range(max_depth):
        if not isinstance(cur, fx.Node):
            return "reached a non-tensor"
        proj = _as_projection(cur)
        if proj is not None:
            if split is not None:
                start, stop = split[1:] if split[0].target is aten.slice.Tensor else _split_range(*split)
                if start is None:
                    return "cannot tell the slice of a fused projection"
                proj.start, proj.stop = start, stop
            else:
                proj.stop = proj.out_features
            return HeadPath(proj, head_split, heads_dim, split, rotary, cache=cache, repeats=repeats)
        if cur.op != "call_function":
            return f"reached {cur.op} {cur.target} before a projection"
        tgt = cur.target
        v = val(cur)
        rep = next(((r, a) for a in (1, 2) if head_split is None and (r := strip_repeat(cur, a))), None)
        if rep is not None:  # K/V heads repeated for grouped attention (repeat_interleave, expand, indexing)
            (src, r), axis = rep
            repeats.append((cur, axis, r))
            cur = src
        elif tgt in _TRANSPOSES or tgt in CASTS or tgt in (aten.contiguous.default, aten.clone.default):
            cur = cur.args[0]
        elif tgt is aten.unflatten.int and head_split is None and v is not None and v.dim() == 4 \
                and cur.args[1] % 3 == 2:
            head_split, heads_dim = cur, 0  # (B, S, H·D).unflatten(-1, (H, D))
            cur = cur.args[0]
        elif tgt in RESHAPES:
            src = val(cur.args[0])
            if head_split is None and v is not None and src is not None and v.dim() == 4 and src.dim() == 3:
                head_split = cur
                heads_dim = 2  # (B, S, H, D)
            cur = cur.args[0]
        elif tgt in (aten.mul.Tensor, aten.div.Tensor, aten.mul.Scalar, aten.div.Scalar) and _is_scalar(cur.args[1]):
            cur = cur.args[0]
        elif tgt is aten.slice.Tensor:
            src = val(cur.args[0])
            dim = cur.args[1] if len(cur.args) > 1 else 0
            if src is None or v is None:
                return "slice without shape information"
            dim %= src.dim()
            if tuple(map(str, src.shape)) == tuple(map(str, v.shape)):
                pass  # a full slice: x[:, :]
            elif dim == src.dim() - 1 and src.dim() == 3 and split is None:
                start = int(cur.args[2]) if len(cur.args) > 2 and cur.args[2] is not None else 0
                split = (cur, start, start + int(v.shape[-1]))  # a feature range of a fused projection (Phi-3)
            elif dim == src.dim() - 1 and src.dim() == 4:
                rotary = True  # part of the head dim: partial rotary (GPT-NeoX, GPT-J, Phi)
            else:
                return "reached a slice over heads or sequence"
            cur = cur.args[0]
        elif tgt is aten.cat.default and val(cur) is not None and val(cur).dim() == 4:
            parts = cur.args[0]
            dim = cur.args[1] if len(cur.args) > 1 else 0
            if (dim % 4 == 2 and cache is None and len(parts) == 2 and isinstance(parts[0], fx.Node)
                    and parts[0].op == "placeholder"):
                cache = parts[0]  # cat(past K/V input, new K/V) over the sequence: a decoder's cache
                cur = parts[1]
                continue
            if dim % 4 != 3:
                return "reached a concatenation over heads or sequence"
            rotary = True  # cat(rotated part, passed-through part) of the head dim
            cur = parts[-1]
        elif tgt is aten.add.Tensor and v is not None and _rotary_operand(cur, v.shape) is not None:
            rotary = True
            cur = _rotary_operand(cur, v.shape)
        elif tgt.__name__ == "getitem" if hasattr(tgt, "__name__") else False:
            src = cur.args[0]
            if isinstance(src, fx.Node) and src.op == "call_function" and src.target in _SPLITS:
                split = (src, cur.args[1])
                cur = src.args[0]
            else:
                return f"reached getitem of {getattr(src, 'target', src)}"
        else:
            return f"reached {getattr(tgt, '__name__', tgt)} before a projection"
    return "no projection within reach"


def _is_scalar(x) -> bool:
    if isinstance(x, (int, float)):
        return True
    v = val(x)
    return v is not None and v.numel() == 1 if isinstance(x, fx.Node) else False


def _split_range(split: fx.Node, idx: int) -> tuple[int | None, int | None]:
    dim = split.args[2] if len(split.args) > 2 else split.kwargs.get("dim", 0)
    total = val(split.args[0])
    if total is None or total.dim() != 3 or (dim % total.dim()) != 2:
        return None, None  # only a split of the (B, S, features) projection output names a feature range
    n = int(total.shape[-1])
    if split.target is aten.split_with_sizes.default:
        sizes = list(split.args[1])
    elif split.target is aten.split.Tensor:
        size = int(split.args[1])
        sizes = [size] * (n // size) + ([n % size] if n % size else [])
    elif split.target is aten.chunk.default:
        c = int(split.args[1])
        size = -(-n // c)
        sizes = [size] * (n // size) + ([n % size] if n % size else [])
    else:
        return None, None
    start = sum(sizes[:idx])
    return start, start + sizes[idx]


def output_projection(site: AttentionSite, max_depth: int = 12) -> Projection | None:
    """The linear layer that consumes the attention output after the heads are merged."""
    cur = site.output
    for _ in range(max_depth):
        users = [u for u in cur.users if not (u.op == "call_function" and u.target is aten._assert_tensor_metadata.default)]
        if len(users) != 1:
            return None
        u = users[0]
        if u.op != "call_function":
            return None
        if u.target in (aten.linear.default,) and u.args[0] is cur or u.target in (aten.addmm.default,) and u.args[1] is cur \
                or u.target in (aten.mm.default, aten.matmul.default) and u.args[0] is cur:
            return _as_projection(u)
        if u.target in _TRANSPOSES | RESHAPES | CASTS or u.target in (aten.contiguous.default, aten.clone.default, aten.flatten.using_ints):
            cur = u
            continue
        return None
    return None
