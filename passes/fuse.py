"""`fuse`: norms, gated MLP activations, rotary embeddings and the LM head + loss as single fused operators.

pattern  by what the subgraph computes, not by module class (``passes/fuse_match.py``): RMSNorm with
         its casts (Llama, Gemma's 1 + w), LayerNorm written out by hand, act(a) · b, x · cos +
         rotate(x) · sin (rotate-half and interleaved), cross_entropy(linear(h)) when the loss is
         the program's output
check    constant eps, a 1-D weight that depends on no input, intermediates used only inside the
         subgraph, casts the operator models; a residual add joins its norm when the sum is used
         only by the norm and at most one other node (the next residual)
rewrite  one ``evo_rewrite::`` operator per site (``rewriter/fused_ops.py``), q and k rotated by one
         ``rotary_pair`` where they share cos/sin; hand-written LayerNorm becomes ``aten.layer_norm``
"""

from __future__ import annotations

import collections
import dataclasses
import operator
from typing import ClassVar

import torch
import torch.fx as fx

from evo_rewrite import fused_ops as ops
from evo_rewrite.attention import val
from evo_rewrite.pass_infra import Pass, PassResult, Skip, module_path, register_pass
from evo_rewrite.program import Program

from .fuse_match import Miss, match_gated, match_loss, match_norm, match_rotary, residual_of

aten = torch.ops.aten
KINDS = ("norm", "mlp", "rotary", "loss")
_META_KEYS = ("nn_module_stack", "stack_trace", "source_fn_stack")


@register_pass
@dataclasses.dataclass(frozen=True)
class Fuse(Pass):
    """Replace norm, gated-MLP, rotary and LM-head + loss subgraphs by one fused operator each."""

    name: ClassVar[str] = "fuse"
    exact: ClassVar[bool] = True
    summary: ClassVar[str] = "RMSNorm (+ residual add), gated MLP, rotary, LM head + cross entropy as fused kernels"
    norm: bool = True
    mlp: bool = True
    rotary: bool = True
    loss: bool = True
    residual: bool = True  # fold the residual add before a norm into the norm's operator

    def run(self, program: Program) -> PassResult:
        g = program.graph
        sites, skipped = self._find(g)
        counts, already = collections.Counter(), self._already(g)
        rotary_sites = []
        for kind, site in sites:
            if kind == "rotary":
                rotary_sites.append(site)
                continue
            counts[kind] += 1
            if kind == "norm":
                counts[self._rewrite_norm(g, site, skipped)] += 1
            elif kind == "mlp":
                self._replace(g, site, ops.GATED_ACT, (site.a, site.b, site.act))
                counts["mlp (fused gate/up projection)"] += site.split
            elif kind == "loss":
                self._replace(g, site, ops.LINEAR_CROSS_ENTROPY, (site.hidden, site.weight, site.bias, site.target,
                                                                   site.ignore_index, site.reduction, site.upcast))
        counts["rotary"] = len(rotary_sites)
        counts["rotary q/k pairs"] = self._rewrite_rotary(g, rotary_sites)
        _toposort(g)
        _eliminate_dead_code(g)
        program.module.recompile()
        total = sum(counts[k] for k in KINDS)
        notes = {k: v for k, v in counts.items() if v}
        if already:
            notes["already fused"] = dict(already)
        if not total:
            msg = ("no site can be fused" if skipped else
                   "every site is already fused" if already else "no norm, gated MLP, rotary or loss site in the model")
            return PassResult(program, 0, skipped, notes, message=msg)
        return PassResult(program, total, skipped, notes)

    # ---- finding -----------------------------------------------------------------------------

    def _find(self, g: fx.Graph):
        matchers = [(k, m) for k, m, on in (("norm", match_norm, self.norm), ("mlp", match_gated, self.mlp),
                                            ("rotary", match_rotary, self.rotary), ("loss", match_loss, self.loss)) if on]
        sites, skipped, claimed = [], [], set()
        for node in list(g.nodes):
            if node.op != "call_function" or node in claimed:
                continue
            for kind, matcher in matchers:
                try:
                    site = matcher(node)
                except Miss as miss:
                    skipped.append(Skip(f"{kind}: {miss}", _module(node), node.name))
                    break
                if site is None:
                    continue
                if claimed.intersection(site.inner):
                    skipped.append(Skip(f"{kind}: overlaps a site already matched", site.module, node.name))
                    break
                claimed.update(site.inner)
                sites.append((kind, site))
                break
        return sites, skipped

    @staticmethod
    def _already(g: fx.Graph) -> collections.Counter:
        names = {ops.RMS_NORM: "rms_norm", ops.ADD_RMS_NORM: "add_rms_norm", ops.GATED_ACT: "gated_act",
                 ops.ROTARY: "rotary", ops.ROTARY_PAIR: "rotary_pair", ops.LINEAR_CROSS_ENTROPY: "linear_cross_entropy",
                 aten.layer_norm.default: "layer_norm", aten.rms_norm.default: "rms_norm (aten)"}
        return collections.Counter(names[n.target] for n in g.nodes if n.op == "call_function" and n.target in names)

    # ---- rewriting ---------------------------------------------------------------------------

    def _replace(self, g: fx.Graph, site, target, args) -> fx.Node:
        with g.inserting_before(site.output):
            node = g.call_function(target, tuple(args))
        _copy_meta(site.output, node)
        site.output.replace_all_uses_with(node)
        return node

    def _rewrite_norm(self, g: fx.Graph, site, skipped) -> str:
        if site.kind == "layer":
            width = val(site.output).shape[-1]
            self._replace(g, site, aten.layer_norm.default, (site.x, [width], site.weight, site.bias, site.eps))
            return "hand-written LayerNorm"
        res = residual_of(site) if self.residual else None
        if res is not None and len(res[2]) > 1:
            skipped.append(Skip(f"norm: the residual sum has {len(res[2])} other uses; fused the norm without the add",
                                site.module, site.x.name))
            res = None
        if res is None:
            self._replace(g, site, ops.RMS_NORM, (site.x, site.weight, site.eps, site.offset, site.casting))
            return "rms_norm"
        a, b, _ = res
        with g.inserting_before(site.output):
            node = g.call_function(ops.ADD_RMS_NORM, (a, b, site.weight, site.eps, site.offset, site.casting))
            y = g.call_function(operator.getitem, (node, 0))
            total = g.call_function(operator.getitem, (node, 1))
        _copy_meta(site.output, node, value=False)
        _copy_meta(site.output, y)
        # the sum is made by the norm's operator now: it belongs to the norm's module (a residual add at the
        # end of block i fused into block i+1's norm must not leave a node of block i after block i+1 began)
        _copy_meta(site.output, total, value=False)
        total.meta["val"] = site.x.meta.get("val")
        site.output.replace_all_uses_with(y)
        site.x.replace_all_uses_with(total)  # the next residual (and the norm's upcast, where it is a real cast)
        return "rms_norm with residual add"

    def _rewrite_rotary(self, g: fx.Graph, sites) -> int:
        """q and k rotated with the same cos/sin in one module: one rotary_pair; any other site: rotary."""
        groups = collections.defaultdict(list)
        for s in sites:
            groups[(s.cos, s.sin, s.interleaved, s.module)].append(s)
        pairs = 0
        for group in groups.values():
            while len(group) >= 2:
                q, k = group.pop(0), group.pop(0)
                with g.inserting_before(q.output):
                    node = g.call_function(ops.ROTARY_PAIR, (q.x, k.x, q.cos, q.sin, q.interleaved))
                    outs = [g.call_function(operator.getitem, (node, i)) for i in (0, 1)]
                for s, out in zip((q, k), outs):
                    _copy_meta(s.output, out)
                    s.output.replace_all_uses_with(out)
                _copy_meta(q.output, node, value=False)
                pairs += 1
            for s in group:
                self._replace(g, s, ops.ROTARY, (s.x, s.cos, s.sin, s.interleaved))
        return pairs


def _module(node: fx.Node) -> str:
    return module_path(node)


def _copy_meta(src: fx.Node, dst: fx.Node, value: bool = True) -> None:
    """Provenance (and, for a node that takes ``src``'s place, its value metadata) from ``src`` to ``dst``."""
    for key in _META_KEYS:
        if key in src.meta:
            dst.meta[key] = src.meta[key]
    if value and "val" in src.meta:
        dst.meta["val"] = src.meta["val"]


def _eliminate_dead_code(g: fx.Graph) -> None:
    """Dead-code elimination that also drops export's metadata asserts on values nothing else reads
    (the asserts are side effects to FX, so they would keep the replaced subgraphs alive)."""
    assert_op = aten._assert_tensor_metadata.default
    while True:
        g.eliminate_dead_code()
        dead_asserts = [u for n in g.nodes if n.users and all(u.target is assert_op for u in n.users)
                        for u in n.users]
        if not dead_asserts:
            return
        for u in dead_asserts:
            g.erase_node(u)


def _toposort(g: fx.Graph) -> None:
    """Reorder the graph so every node follows its inputs, keeping the original order where it is valid.

    Fused operators are inserted where their output was; a value they also produce (a residual sum)
    may have a user earlier in the graph, which this moves after the operator.
    """
    order, state = [], {}
    for root in list(g.nodes):
        stack = [(root, False)]
        while stack:
            n, done = stack.pop()
            if done:
                state[n] = 2
                order.append(n)
                continue
            if state.get(n):
                if state[n] == 1:
                    raise RuntimeError(f"fuse made a cycle through {n.name}")
                continue
            state[n] = 1
            stack.append((n, True))
            for m in reversed(n.all_input_nodes):
                if not state.get(m):
                    stack.append((m, False))
                elif state[m] == 1:
                    raise RuntimeError(f"fuse made a cycle through {m.name}")
    if order == list(g.nodes):
        return
    prev = order[0]
    for n in order[1:]:
        if n.prev is not prev:
            prev.append(n)
        prev = n
