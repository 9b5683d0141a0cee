"""`factorize-embeddings`: ALBERT's factorized embedding, applied to a trained model by truncated SVD.

pattern  every token embedding: ``aten.embedding`` of a table (V, H) indexed directly by an input, with
         a vocabulary larger than the width (V > H; type and position tables are left alone)
check    the table is a parameter the graph reads by get_attr
rewrite  W ≈ A @ B with A = U_E·S_E (V, E) and B = V_Eᵀ (E, H) from the truncated SVD of W, stored as
         ``<table>_a`` and ``<table>_b``. Every use of W, through any get_attr that reads the same
         storage (a tied output head), is rewritten consistently:
           embedding(W, ids)  ->  embedding(A, ids) @ B                    # (…, E) @ (E, H)
           linear(h, W, bias) ->  linear(linear(h, B), A, bias)            # h Bᵀ Aᵀ = h Wᵀ
           anything else      ->  mm(A, B)
         Exact when E reaches min(V, H) (then the parameters grow: say so in the notes).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch
import torch.fx as fx

from evo_rewrite.figures import _storage_key
from evo_rewrite.pass_infra import Pass, PassResult, Skip, module_path, register_pass
from evo_rewrite.program import Program

from .share_layers import drop_attr

aten = torch.ops.aten


def _copy_stack(new: fx.Node, like: fx.Node) -> None:
    if "nn_module_stack" in like.meta:
        new.meta["nn_module_stack"] = dict(like.meta["nn_module_stack"])


@register_pass
@dataclasses.dataclass(frozen=True)
class FactorizeEmbeddings(Pass):
    """Factorize the token embedding V×H into V×E · E×H (and a tied output head alike) by truncated SVD."""

    name: ClassVar[str] = "factorize-embeddings"
    exact: ClassVar[bool] = False
    summary: ClassVar[str] = "token embedding V×H -> V×E · E×H by truncated SVD (tied head too); exact at full rank"
    rank: int = 0

    def __post_init__(self):
        if self.rank < 1:
            raise ValueError(f"rank must be given and >= 1 (the inner size E, e.g. factorize-embeddings(rank=128)), got {self.rank}")

    def run(self, program: Program) -> PassResult:
        graph = program.graph
        tables: dict[str, fx.Node] = {}  # target -> the embedding node indexing it
        skipped: list[Skip] = []
        for n in graph.nodes:
            if n.op != "call_function" or n.target is not aten.embedding.default:
                continue
            w, idx = n.args[0], n.args[1]
            if not (isinstance(idx, fx.Node) and idx.op == "placeholder"):
                continue
            if not (isinstance(w, fx.Node) and w.op == "get_attr"):
                skipped.append(Skip("the table is not a weight of the model", "", n.name))
                continue
            t = program.get_tensor(w.target)
            if t.dim() != 2 or t.shape[0] <= t.shape[1]:
                skipped.append(Skip(f"table {tuple(t.shape)} is not a vocabulary larger than its width", w.target, n.name))
                continue
            tables.setdefault(w.target, n)
        if not tables:
            return PassResult(program, 0, skipped, message="no token embedding (an embedding table indexed by an input)")
        notes: dict = {}
        for target, emb in tables.items():
            name = self._table_name(program, target, emb)
            notes[name] = self._factorize(program, target, name)
        graph.eliminate_dead_code()
        graph.lint()
        program.module.recompile()
        return PassResult(program, len(tables), skipped, notes)

    @staticmethod
    def _table_name(program: Program, target: str, emb: fx.Node) -> str:
        """The table's name under the embedding module (``wte.weight``), where export read it under a tied
        head's name (``lm_head.weight``)."""
        own = f"{module_path(emb)}.weight"
        key = _storage_key(program.get_tensor(target))
        tied = {n.target for n in program.graph.nodes if n.op == "get_attr"
                and _storage_key(program.get_tensor(n.target)) == key}
        return own if own in tied else target

    def _factorize(self, program: Program, target: str, name: str) -> str:
        graph, gm = program.graph, program.module
        w = program.get_tensor(target).detach()
        vocab, hidden = w.shape
        e = min(self.rank, vocab, hidden)
        u, s, vh = torch.linalg.svd(w.double(), full_matrices=False)
        a = (u[:, :e] * s[:e]).to(w.dtype).contiguous()  # (V, E)
        b = vh[:e].to(w.dtype).contiguous()  # (E, H)
        a_t, b_t = f"{name}_a", f"{name}_b"
        program.set_tensor(a_t, a, parameter=True)
        program.set_tensor(b_t, b, parameter=True)
        key = _storage_key(program.get_tensor(target))
        readers = [n for n in graph.nodes if n.op == "get_attr" and _storage_key(program.get_tensor(n.target)) == key]
        with graph.inserting_before(readers[0]):
            a_n, b_n = graph.get_attr(a_t), graph.get_attr(b_t)
        heads, others = 0, 0
        for node in readers:
            for user in list(node.users):
                if user.target is aten.embedding.default and user.args[0] is node:
                    with graph.inserting_after(user):
                        small = graph.call_function(aten.embedding.default, (a_n, *user.args[1:]), dict(user.kwargs))
                    with graph.inserting_after(small):
                        out = graph.call_function(aten.matmul.default, (small, b_n))  # (…, E) @ (E, H)
                    user.replace_all_uses_with(out)
                    new = (small, out)
                elif user.target is aten.linear.default and user.args[1] is node and node not in user.args[2:]:
                    with graph.inserting_after(user):
                        hb = graph.call_function(aten.linear.default, (user.args[0], b_n))  # (…, E)
                    with graph.inserting_after(hb):
                        out = graph.call_function(aten.linear.default, (hb, a_n, *user.args[2:]))  # (…, V)
                    user.replace_all_uses_with(out)
                    new = (hb, out)
                    heads += 1
                else:
                    with graph.inserting_before(user):
                        full = graph.call_function(aten.mm.default, (a_n, b_n))  # (V, H)
                    user.replace_input_with(node, full)
                    new = (full,)
                    others += 1
                for n in new:
                    _copy_stack(n, user)
        for node in readers:
            if not node.users:
                graph.erase_node(node)
                if not any(n.op == "get_attr" and n.target == node.target for n in graph.nodes):
                    drop_attr(gm, node.target)
        parts = [f"{vocab}x{hidden} -> {vocab}x{e} · {e}x{hidden}"]
        if heads:
            parts.append(f"tied output head{'s' if heads > 1 else ''}: {heads}")
        if others:
            parts.append(f"other uses reading A·B: {others}")
        if e * (vocab + hidden) >= vocab * hidden:
            parts.append("rank too high to save parameters")
        return "; ".join(parts)
