"""Applying a tensor-parallel plan: the graph one rank runs, and the tensors it holds.

The plan is the program's ``TensorParallelPlan`` annotation, which ``passes/tensor_parallel.py``
derives and checks; :func:`rank_graph` applies a stored plan to a (reloaded) program, so the
runtime (``targets/parallel.py``) never derives it again. ``passes/tensor_parallel.py`` decides what each linear layer is (column-parallel q/k/v and FFN
up/gate projections, vocabulary-parallel LM head, the rest replicated); this module makes the
local graph of one rank from that:

* the sharded dimension is propagated forward from every column-parallel projection, op by op
  (views, transposes, rotary, Q·Kᵀ, softmax, P·V, SDPA, K/V repeats, activations), rewriting every
  shape constant of that dimension to its local size (heads → heads/N in the head reshapes);
* a linear layer that receives an activation sharded on its input features is row-parallel: its
  partial sums are all-reduced (``torch.ops._c10d_functional``) and its bias is added after;
* a token embedding whose table is sharded by rows (vocabulary-parallel) looks up the ids that fall
  in this rank's rows and all-reduces; a vocabulary-parallel LM head all-gathers the logits;
* with ``sequence_parallel`` the residual stream between row- and column-parallel layers is
  sharded along the sequence: reduce-scatter replaces all-reduce, norms and residual adds run on
  the local tokens, and the stream is all-gathered where a layer needs every token.

An op the propagation does not know, or a shape it cannot split, raises ``PassNotApplicable``
naming the op, the module and why, before anything runs. Every rank's graph has the same nodes;
only constants that depend on the rank (its vocabulary and sequence offsets) differ.
"""

from __future__ import annotations

import copy
import dataclasses
import operator
import warnings

import torch
import torch.fx as fx

from .attention import CASTS, DROPOUT, MATMUL_OPS, RESHAPES, SDPA_OPS, SOFTMAX_OPS, val
from .errors import PassNotApplicable, UsageError
from .pass_infra import module_path
from .projections import Projection, trace_projection

__all__ = ["LinearRole", "localize", "COLLECTIVES", "SPLITS", "is_pointwise", "linear_layers", "rank_graph",
           "copy_for_rank", "shard_dim_tensor", "local_shard", "bind"]

aten = torch.ops.aten
c10d = torch.ops._c10d_functional
ALL_REDUCE, ALL_GATHER = c10d.all_reduce.default, c10d.all_gather_into_tensor.default
REDUCE_SCATTER, WAIT = c10d.reduce_scatter_tensor.default, c10d.wait_tensor.default
COLLECTIVES = {ALL_REDUCE, ALL_GATHER, REDUCE_SCATTER, WAIT}
_ASSERT = aten._assert_tensor_metadata.default
_KEEP = CASTS | DROPOUT | {aten.detach.default}  # same values, same layout
_NORMS = {aten.layer_norm.default, aten.rms_norm.default}
_REDUCTIONS = {aten.mean.dim, aten.sum.dim_IntList, aten.amax.default}
SPLITS = {aten.split.Tensor, aten.split_with_sizes.default, aten.chunk.default}


@dataclasses.dataclass
class LinearRole:
    """What one linear-like op is in the plan."""

    proj: Projection
    role: str  # q, k, v, qkv, ffn-in, lm-head, other (row-parallel layers are found by propagation: o, ffn-out)
    style: str  # colwise, rowwise, vocab, replicate
    segments: list[tuple[int, int]] | None = None  # output-feature ranges sharded separately (fused qkv)
    site: str = ""


def _shape(n) -> tuple | None:
    v = val(n)
    return tuple(v.shape) if v is not None else None


def _same(a, b) -> bool:
    return str(a) == str(b)


def _int(x) -> int | None:
    try:
        return int(x)
    except (TypeError, ValueError):
        return None


def is_pointwise(n: fx.Node) -> bool:
    t = n.target
    return t in _KEEP or (hasattr(t, "tags") and torch.Tag.pointwise in t.tags)


def _map_view(src: tuple, dst: tuple, d: int) -> int | None:
    """The output dim a view maps input dim ``d`` to, when d is kept or is the leading dim of a split/merge."""
    p = 0
    while p < min(len(src), len(dst)) and _same(src[p], dst[p]):
        p += 1
    s = 0
    while s < min(len(src), len(dst)) - p and _same(src[-1 - s], dst[-1 - s]):
        s += 1
    if d < p:
        return d
    if d >= len(src) - s:
        return d - len(src) + len(dst)
    if d == p and len(dst) - s > p:
        return p  # (…, H·D) -> (…, H, D): the shard goes with H; (…, H, D) -> (…, H·D) likewise
    return None


class _Localizer:
    def __init__(self, gm: fx.GraphModule, roles: dict[fx.Node, LinearRole], embeddings: dict[fx.Node, str],
                 degree: int, rank: int, group: str, sequence_parallel: bool):
        self.g, self.roles, self.embeddings = gm.graph, roles, embeddings
        self.n, self.rank, self.group, self.sp = degree, rank, group, sequence_parallel
        self.spec: dict[fx.Node, int] = {}  # activation sharded (heads or features) along this dim
        self.segs: dict[fx.Node, list[tuple[int, int]]] = {}  # fused outputs: segment bounds of the sharded dim
        self.seq: dict[fx.Node, int] = {}  # sequence-parallel stream: sharded along this (sequence) dim
        self.gshape: dict[fx.Node, tuple] = {}  # global shapes of inserted nodes
        self.gathered: dict[fx.Node, fx.Node] = {}
        self.rowwise: list[fx.Node] = []
        self.counts = {"all_reduce": 0, "all_gather": 0, "reduce_scatter": 0}
        self.created: list[fx.Node] = []

    # -- helpers ------------------------------------------------------------------------------

    def fail(self, n: fx.Node, why: str):
        raise PassNotApplicable(f"tensor-parallel(degree={self.n}): cannot shard {module_path(n) or 'the top level'} "
                                f"(node {n.name}): {why}")

    def shape(self, n) -> tuple | None:
        return self.gshape.get(n) or _shape(n)

    def local(self, n: fx.Node, size, what: str) -> int:
        g = _int(size)
        if g is None or g % self.n:
            self.fail(n, f"{what} has size {size}, which degree {self.n} does not divide")
        return g // self.n

    def call(self, target, args, like: fx.Node | None = None, shape=None) -> fx.Node:
        node = self.g.call_function(target, args)
        self.created.append(node)
        if like is not None:
            node.meta["nn_module_stack"] = like.meta.get("nn_module_stack", {})
        if shape is not None:
            self.gshape[node] = shape
        return node

    def insert_after(self, n: fx.Node, build) -> fx.Node:
        """Insert the nodes ``build()`` makes right after n (in order); n's other users read the last one."""
        start = len(self.created)
        with self.g.inserting_before(n.next):
            out = build()
        new = set(self.created[start:])
        n.replace_all_uses_with(out, delete_user_cb=lambda u: u not in new)
        return out

    def narrow(self, operand, dim: int, length) -> fx.Node:
        """This rank's slice of a replicated operand along dim (length: an int or a SymInt node)."""
        start = self.rank * length if isinstance(length, int) else self.call(operator.mul, (length, self.rank))
        return self.call(aten.narrow.default, (operand, dim, start, length))

    def reduce(self, x: fx.Node, like: fx.Node) -> fx.Node:
        """Sum partial results over the ranks: all-reduce, or reduce-scatter along the sequence."""
        shape = self.shape(like)
        if not self.sp:
            self.counts["all_reduce"] += 1
            return self.call(WAIT, (self.call(ALL_REDUCE, (x, "sum", self.group), like),), like, shape)
        if shape is None or len(shape) != 3:
            self.fail(like, "sequence_parallel needs (batch, sequence, hidden) activations here")
        self.counts["reduce_scatter"] += 1
        t = self.call(aten.contiguous.default, (self.call(aten.movedim.int, (x, 1, 0), like),), like)
        rs = self.call(WAIT, (self.call(REDUCE_SCATTER, (t, "sum", self.n, self.group), like),), like)
        out = self.call(aten.movedim.int, (rs, 0, 1), like, shape)
        self.seq[out] = 1
        return out

    def gather_seq(self, x: fx.Node) -> fx.Node:
        """The whole sequence of a sequence-sharded stream tensor (one all-gather per tensor)."""
        if x not in self.gathered:
            d = self.seq[x]
            self.counts["all_gather"] += 1
            with self.g.inserting_before(x.next):
                t = self.call(aten.contiguous.default, (self.call(aten.movedim.int, (x, d, 0), x),), x)
                ag = self.call(WAIT, (self.call(ALL_GATHER, (t, self.n, self.group), x),), x)
                self.gathered[x] = self.call(aten.movedim.int, (ag, 0, d), x, self.shape(x))
        return self.gathered[x]

    # -- the walk ------------------------------------------------------------------------------

    def run(self) -> None:
        for n in list(self.g.nodes):
            if n.op == "call_function" and n.target is _ASSERT:
                continue
            if self.seq and any(a in self.seq for a in n.all_input_nodes) and not self.per_token(n):
                for a in [a for a in n.all_input_nodes if a in self.seq]:
                    n.replace_input_with(a, self.gather_seq(a))
            if n in self.roles:
                self.linear(n, self.roles[n])
            elif n in self.embeddings:
                self.embedding(n, self.embeddings[n])
            elif any(a in self.spec for a in n.all_input_nodes):
                self.propagate(n)
            elif self.seq and any(a in self.seq for a in n.all_input_nodes):
                self.propagate_seq(n)

    def per_token(self, n: fx.Node) -> bool:
        """Ops a sequence-sharded stream passes through on its local tokens (norms, residual adds, casts)."""
        if n.op != "call_function":
            return False
        if is_pointwise(n) or n.target is _ASSERT:
            return True
        d = next(self.seq[a] for a in n.all_input_nodes if a in self.seq)
        rank = len(self.shape(n.args[0]) or ())
        if n.target in _NORMS:
            return d < rank - len(n.args[1])
        if n.target in _REDUCTIONS:
            return d not in [x % rank for x in n.args[1]]
        return False

    def linear(self, n: fx.Node, role: LinearRole) -> None:
        x = n.args[1] if n.target is aten.addmm.default else n.args[0]
        if x in self.spec:
            self.fail(n, f"its input is already sharded (a {role.role} layer fed by a column-parallel one)")
        if role.style in ("colwise", "vocab"):
            self.spec[n] = len(self.shape(n)) - 1
            if role.segments:
                self.segs[n] = role.segments
            if role.style == "vocab":
                self.gather_last(n)
        # replicated layers: nothing to do

    def gather_last(self, n: fx.Node) -> None:
        """All-gather a vocabulary-parallel output along its last dim (the full logits on every rank)."""
        shape = self.shape(n)
        self.counts["all_gather"] += 1

        def build():
            ag = self.call(WAIT, (self.call(ALL_GATHER, (self.call(aten.contiguous.default, (n,), n), self.n, self.group), n),), n)
            parts = self.call(aten.chunk.default, (ag, self.n, 0), n)
            items = [self.call(operator.getitem, (parts, i), n) for i in range(self.n)]
            return self.call(aten.cat.default, (items, -1), n, shape)

        self.insert_after(n, build)
        del self.spec[n]

    def make_rowwise(self, n: fx.Node) -> None:
        """linear(x_local, W_local) -> reduce over ranks -> + bias."""
        role = self.roles.get(n)
        if role is not None and role.style == "vocab":
            self.fail(n, "a vocabulary-parallel layer is fed by a column-parallel one")
        bias = None
        if n.target is aten.linear.default:
            bias = n.args[2] if len(n.args) > 2 else None
            n.args = (n.args[0], n.args[1])
        elif n.target is aten.addmm.default:
            bias = n.args[0]
            n.target, n.args, n.kwargs = aten.mm.default, (n.args[1], n.args[2]), {}
        self.rowwise.append(n)

        def build():
            out = self.reduce(n, n)
            if bias is not None:
                out = self.call(aten.add.Tensor, (out, bias), n, self.shape(n))
                if out.args[0] in self.seq:
                    self.seq[out] = self.seq[out.args[0]]
            return out

        self.insert_after(n, build)

    def embedding(self, n: fx.Node, style: str) -> None:
        """Vocabulary-parallel lookup: ids outside this rank's rows read row 0 and are zeroed, then summed."""
        if style != "vocab":
            return
        w, ids = n.args[0], n.args[1]
        rows = self.local(n, _shape(w)[0], "the embedding table")
        lo = self.rank * rows
        with self.g.inserting_before(n):
            local = self.call(aten.sub.Tensor, (ids, lo), n)
            oob = self.call(aten.logical_or.default, (self.call(aten.lt.Scalar, (local, 0), n),
                                                      self.call(aten.ge.Scalar, (local, rows), n)), n)
            safe = self.call(aten.masked_fill.Scalar, (local, oob, 0), n)
        n.args = (w, safe, *n.args[2:])
        self.insert_after(n, lambda: self.reduce(
            self.call(aten.masked_fill.Scalar, (n, self.call(aten.unsqueeze.default, (oob, -1), n), 0.0), n), n))

    # -- tensor-parallel propagation ------------------------------------------------------------

    def propagate(self, n: fx.Node) -> None:
        if n.op == "output":
            self.fail(n, "a sharded activation is a model output (it must pass a row-parallel layer first)")
        if n.op != "call_function":
            self.fail(n, f"{n.op} {n.target} reads a sharded activation")
        t = n.target
        srcs = [a for a in n.all_input_nodes if a in self.spec]
        x = srcs[0]
        d = self.spec[x]
        if t in (aten.linear.default, aten.addmm.default, aten.mm.default) or t is aten.matmul.default and n.args[1] not in self.spec:
            xin = n.args[1] if t is aten.addmm.default else n.args[0]
            if xin is not x or d != len(self.shape(x)) - 1 or len(srcs) > 1:
                self.fail(n, "a linear layer reads a sharded activation other than along its input features")
            return self.make_rowwise(n)
        if t is aten.sym_size.int:
            if n.args[1] % len(self.shape(x)) == d:
                self.fail(n, "the program reads the size of a sharded dimension")
            return
        if t is operator.getitem:
            self.spec[n] = d
            return
        if t in RESHAPES:
            return self.view(n, x, d)
        if is_pointwise(n):
            return self.pointwise(n, self.spec)
        handler = {aten.expand.default: self.expand, aten.transpose.int: self.transpose, aten.permute.default: self.permute,
                   aten.t.default: self.transpose, aten.unsqueeze.default: self.unsqueeze, aten.slice.Tensor: self.slice,
                   aten.cat.default: self.cat, aten.stack.default: self.stack, aten.repeat_interleave.self_int: self.keep,
                   aten.flatten.using_ints: self.flatten}.get(t)
        if handler is not None:
            return handler(n, x, d)
        if t in SPLITS:
            return self.split(n, x, d)
        if t in SOFTMAX_OPS or t is aten.log_softmax.int:
            if n.args[1] % len(self.shape(x)) == d:
                self.fail(n, "softmax over a sharded dimension")
            self.spec[n] = d
            return
        if t in _NORMS or t in _REDUCTIONS:
            return self.reduction(n, x, d)
        if t in MATMUL_OPS:
            return self.matmul(n)
        if t in SDPA_OPS:
            return self.sdpa(n)
        self.fail(n, f"{getattr(t, '__name__', t)} is not an op tensor-parallel knows how to shard")

    def keep(self, n, x, d):
        self.spec[n] = d

    def view(self, n, x, d):
        src, dst = self.shape(x), self.shape(n)
        e = _map_view(src, dst, d)
        if e is None:
            self.fail(n, f"a reshape {tuple(map(str, src))} -> {tuple(map(str, dst))} moves the sharded dim {d} "
                      "into a merged dimension it does not lead (e.g. a (B·H, S, D) layout)")
        shape = list(n.args[1])
        if isinstance(shape[e], fx.Node):
            self.fail(n, "the sharded dimension has a symbolic size")
        if shape[e] != -1:
            shape[e] = self.local(n, shape[e], f"dimension {e} of a reshape")
        else:
            self.local(n, dst[e], f"dimension {e} of a reshape")
        n.args = (n.args[0], shape, *n.args[2:])
        self.spec[n] = e
        if x in self.segs and _same(src[d], dst[e]):
            self.segs[n] = self.segs[x]

    def expand(self, n, x, d):
        sizes = list(n.args[1])
        e = d + len(sizes) - len(self.shape(x))
        if isinstance(sizes[e], int) and sizes[e] != -1:
            sizes[e] = self.local(n, sizes[e], "an expanded dimension")
            n.args = (n.args[0], sizes, *n.args[2:])
        self.spec[n] = e

    def transpose(self, n, x, d):
        r = len(self.shape(x))
        a, b = (n.args[1] % r, n.args[2] % r) if n.target is aten.transpose.int else (0, 1)
        self.spec[n] = b if d == a else a if d == b else d

    def permute(self, n, x, d):
        perm = [p % len(self.shape(x)) for p in n.args[1]]
        self.spec[n] = perm.index(d)

    def unsqueeze(self, n, x, d):
        dim = n.args[1] % (len(self.shape(x)) + 1)
        self.spec[n] = d + 1 if dim <= d else d

    def flatten(self, n, x, d):
        r = len(self.shape(x))
        a, b = (n.args[1] if len(n.args) > 1 else 0) % r, (n.args[2] if len(n.args) > 2 else -1) % r
        if a < d <= b:
            self.fail(n, "a flatten merges the sharded dim behind another")
        self.spec[n] = d - (b - a) if d > b else d

    def _segment_bound(self, n, x, pos: int) -> int:
        bounds = {0} | {b for s in self.segs.get(x, []) for b in s}
        if pos not in bounds:
            self.fail(n, f"slices a sharded dimension at {pos}, not at a boundary of a fused projection's parts")
        return pos // self.n

    def slice(self, n, x, d):
        dim = (n.args[1] if len(n.args) > 1 else 0) % len(self.shape(x))
        self.spec[n] = d
        if dim != d:
            return
        args = list(n.args) + [None] * (4 - len(n.args))
        total = _int(self.shape(x)[d])
        args[2] = self._segment_bound(n, x, int(args[2] or 0))
        if args[3] is not None and int(args[3]) < total:
            args[3] = self._segment_bound(n, x, int(args[3]))
        n.args = tuple(args[:max(len(n.args), 4 if args[3] is not None else 3)])

    def split(self, n, x, d):
        dim = (n.args[2] if len(n.args) > 2 else n.kwargs.get("dim", 0)) % len(self.shape(x))
        self.spec[n] = d
        if dim != d or n.target is aten.chunk.default:
            if n.target is aten.chunk.default and dim == d:
                total = _int(self.shape(x)[d])
                for i in range(1, int(n.args[1])):
                    self._segment_bound(n, x, i * total // int(n.args[1]))
            return
        total = _int(self.shape(x)[d])
        sizes = [int(n.args[1])] * (total // int(n.args[1])) if n.target is aten.split.Tensor else list(n.args[1])
        pos = 0
        for s in sizes:
            pos += s
            self._segment_bound(n, x, pos)
        if n.target is aten.split.Tensor:
            n.args = (x, int(n.args[1]) // self.n, *n.args[2:])
        else:
            n.args = (x, [s // self.n for s in sizes], *n.args[2:])

    def cat(self, n, x, d):
        parts, dim = n.args[0], (n.args[1] if len(n.args) > 1 else 0) % len(self.shape(x))
        if dim == d or any(p not in self.spec or self.spec[p] != d for p in parts):
            self.fail(n, "concatenates along a sharded dimension or joins sharded and unsharded tensors")
        self.spec[n] = d

    def stack(self, n, x, d):
        parts, dim = n.args[0], (n.args[1] if len(n.args) > 1 else 0) % (len(self.shape(x)) + 1)
        if any(p not in self.spec or self.spec[p] != d for p in parts):
            self.fail(n, "stacks sharded and unsharded tensors")
        self.spec[n] = d + 1 if dim <= d else d

    def reduction(self, n, x, d):
        r = len(self.shape(x))
        if n.target in _NORMS:
            if d >= r - len(n.args[1]):
                self.fail(n, "normalises over a sharded dimension (e.g. a norm over all heads' features)")
            self.spec[n] = d
            return
        dims = [a % r for a in n.args[1]]
        keep = n.args[2] if len(n.args) > 2 else n.kwargs.get("keepdim", False)
        if d in dims:
            self.fail(n, "reduces over a sharded dimension")
        self.spec[n] = d if keep else d - sum(1 for a in dims if a < d)

    def pointwise(self, n: fx.Node, spec: dict) -> int:
        """Elementwise op: sharded operands agree on the dim; replicated ones broadcast or are narrowed."""
        out = self.shape(n)
        if out is None:
            self.fail(n, "no shape information")
        ro = len(out)
        dims = {spec[a] + ro - len(self.shape(a)) for a in n.all_input_nodes if a in spec}
        if len(dims) != 1:
            self.fail(n, "combines activations sharded along different dimensions")
        e = dims.pop()
        if n.target is not aten.type_as.default:
            for a in n.all_input_nodes:
                if a in spec or not self.shape(a):
                    continue
                j = e - (ro - len(self.shape(a)))
                if j < 0 or _same(self.shape(a)[j], 1):
                    continue
                if not _same(self.shape(a)[j], out[e]):
                    self.fail(n, f"a replicated operand of shape {tuple(map(str, self.shape(a)))} does not broadcast "
                              "over the sharded dimension")
                with self.g.inserting_before(n):
                    length = self.local(n, out[e], "a per-head operand") if spec is self.spec else self.seq_length(n, a, j)
                    n.replace_input_with(a, self.narrow(a, j, length))
        spec[n] = e
        return e

    def seq_length(self, n, a, j):
        size = self.call(aten.sym_size.int, (a, j), n)
        return self.call(operator.floordiv, (size, self.n), n)

    def matmul(self, n):
        if n.target is aten.einsum.default:
            return self.einsum(n)
        a, b = n.args[0], n.args[1]
        ra, rb, ro = len(self.shape(a)), len(self.shape(b)), len(self.shape(n))
        dims = set()
        for t, r in ((a, ra), (b, rb)):
            if t in self.spec:
                if self.spec[t] >= r - 2:
                    self.fail(n, "a matrix product over a sharded row or column dimension")
                dims.add(self.spec[t] + ro - r)
            else:
                self.fail(n, "a product of a sharded and a replicated activation")
        if len(dims) != 1:
            self.fail(n, "a product of activations sharded along different dimensions")
        self.spec[n] = dims.pop()

    def einsum(self, n):
        eq = n.args[0].replace(" ", "")
        ins, out = eq.split("->")
        letters = set()
        for term, t in zip(ins.split(","), n.args[1]):
            if t not in self.spec:
                self.fail(n, "an einsum of a sharded and a replicated activation")
            letters.add(term[self.spec[t]])
        if len(letters) != 1 or next(iter(letters)) not in out:
            self.fail(n, f"einsum '{eq}' contracts or mixes sharded dimensions")
        self.spec[n] = out.index(letters.pop())

    def sdpa(self, n):
        q, k, v = n.args[:3]
        if not all(self.spec.get(t) == 1 for t in (q, k, v)):
            self.fail(n, "fused attention with q, k, v not all sharded along heads")
        for a in n.all_input_nodes:
            s = self.shape(a)
            if a not in (q, k, v) and s is not None and len(s) == 4 and not _same(s[1], 1):
                heads = self.local(n, s[1], "an attention bias with a heads dimension")
                with self.g.inserting_before(n):
                    n.replace_input_with(a, self.narrow(a, 1, heads))
        self.spec[n] = 1

    # -- sequence-parallel stream ------------------------------------------------------------

    def propagate_seq(self, n: fx.Node) -> None:
        x = next(a for a in n.all_input_nodes if a in self.seq)
        d = self.seq[x]
        if is_pointwise(n):
            self.pointwise(n, self.seq)
        elif n.target in _NORMS:
            self.seq[n] = d
        elif n.target in _REDUCTIONS:
            keep = n.args[2] if len(n.args) > 2 else n.kwargs.get("keepdim", False)
            dims = [a % len(self.shape(x)) for a in n.args[1]]
            self.seq[n] = d if keep else d - sum(1 for a in dims if a < d)


def localize(gm: fx.GraphModule, roles: dict[fx.Node, LinearRole], embeddings: dict[fx.Node, str], degree: int,
             rank: int, group: str, sequence_parallel: bool = False) -> dict:
    """Rewrite ``gm.graph`` in place into rank ``rank``'s graph; return the row-parallel nodes and collective counts.

    ``roles`` and ``embeddings`` are keyed by nodes of ``gm.graph``; ``group`` is the process group
    name the collectives run on.
    """
    loc = _Localizer(gm, roles, embeddings, degree, rank, group, sequence_parallel)
    loc.run()
    gm.graph.eliminate_dead_code()
    return {"rowwise": loc.rowwise, "collectives": loc.counts}



# -- tensors --------------------------------------------------------------------------------------

def shard_dim_tensor(full: torch.Tensor, entry: dict, degree: int) -> torch.Tensor:
    """The tensor whose equal chunks along ``entry["dim"]`` are the ranks' shards.

    A fused projection (qkv) is sharded part by part: its segments are interleaved so that chunk r
    holds rank r's rows of q, then of k, then of v; a plain ``Shard(dim)`` of the result gives each
    rank its heads of every part.
    """
    segs = entry.get("segments")
    if not segs:
        return full
    dim = entry["dim"]
    pieces = [full.narrow(dim, a, b - a).chunk(degree, dim) for a, b in segs]
    return torch.cat([p[r] for r in range(degree) for p in pieces], dim)


def local_shard(full: torch.Tensor, entry: dict | None, degree: int, rank: int) -> torch.Tensor:
    """Rank ``rank``'s piece of a tensor under the plan's entry (None: replicated)."""
    if entry is None:
        return full
    return shard_dim_tensor(full, entry, degree).chunk(degree, entry["dim"])[rank]


def bind(graph: fx.Graph, tensors: dict[str, torch.Tensor], like: fx.GraphModule) -> fx.GraphModule:
    """A GraphModule running ``graph`` on ``tensors`` (by get_attr target), called like ``like``."""
    root = torch.nn.Module()
    for target, t in tensors.items():
        *parents, leaf = target.split(".")
        mod = root
        for p in parents:
            if not hasattr(mod, p):
                mod.add_module(p, torch.nn.Module())
            mod = getattr(mod, p)
        if isinstance(t, torch.nn.Module):  # a higher-order op's body (torch 2.11 exports autocast regions so)
            mod.add_module(leaf, t)
        else:
            mod.register_buffer(leaf, t)
    gm = fx.GraphModule(root, graph, class_name="TensorParallelRank")
    for k in ("_in_spec", "_out_spec"):
        if hasattr(like, k):
            setattr(gm, k, getattr(like, k))
    return gm


def linear_layers(graph: fx.Graph) -> dict[fx.Node, Projection]:
    """Every linear-like op whose weight is a model tensor, in graph order."""
    out = {}
    for n in graph.nodes:
        if n.op == "call_function" and n.target in (aten.linear.default, aten.addmm.default, aten.mm.default,
                                                    aten.matmul.default):
            p = trace_projection(n, max_depth=1)
            if not isinstance(p, str) and p.projection.node is n:
                out[n] = p.projection
    return out


def copy_for_rank(module: fx.GraphModule) -> fx.GraphModule:
    """A GraphModule with a copy of ``module``'s graph (to localise) and the same tensors."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # deepcopy of pytree specs warns in torch 2.13
        gm = fx.GraphModule(module, copy.deepcopy(module.graph))
    for k in ("_in_spec", "_out_spec"):
        if hasattr(module, k):
            setattr(gm, k, getattr(module, k))
    return gm


def rank_graph(program, plan: dict, rank: int, group: str) -> fx.GraphModule:
    """Rank ``rank``'s graph of ``program`` under a stored ``plan``, collectives on process group ``group``.

    Raises UsageError when the plan does not describe the program (a pass ran after ``tensor-parallel``).
    """
    gm = copy_for_rank(program.module)
    linears = linear_layers(gm.graph)
    by_weight = {p.weight: (n, p) for n, p in linears.items()}
    stale = UsageError("the stored tensor-parallel plan does not match the program's graph (did a pass run after "
                       "tensor-parallel?); put tensor-parallel last in the pipeline and rewrite again")
    roles = {}
    for lin in plan["linears"]:
        if lin["style"] not in ("colwise", "vocab"):
            continue
        if lin["weight"] not in by_weight:
            raise stale
        n, proj = by_weight[lin["weight"]]
        segs = [tuple(s) for s in lin["segments"]] if lin["segments"] else None
        roles[n] = LinearRole(proj, lin["role"], lin["style"], segs, lin["module"])
    styles = {e["weight"]: e["style"] for e in plan["embeddings"]}
    embeddings = {n: styles[n.args[0].target] for n in gm.graph.nodes
                  if n.op == "call_function" and n.target is aten.embedding.default
                  and getattr(n.args[0], "target", None) in styles}
    result = localize(gm, roles, embeddings, int(plan["degree"]), rank, group, bool(plan["sequence_parallel"]))
    rows = {linears[n].weight for n in result["rowwise"] if n in linears}
    if rows != {lin["weight"] for lin in plan["linears"] if lin["style"] == "rowwise"}:
        raise stale
    return gm
