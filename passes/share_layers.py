"""`share-layers`: ALBERT cross-layer parameter sharing, applied to a trained model.

pattern  the repeated blocks of rewriter.blocks (same structure, same parameter shapes), partitioned
         by ``strategy``: ``all`` (one set for the whole group), ``every`` (runs of k consecutive
         blocks), ``cycle`` (block i uses set i mod k; Takase & Kiyono 2021)
check    a partition needs two blocks; ``what=attention`` needs an attention site in the block
rewrite  the get_attr nodes of the partition's blocks read one shared tensor per name
         (``shared_layers.<container>.<set>.<name>``), the group mean (``init=mean``) or the first
         block's tensor (``init=first``); the per-block tensors are dropped. ``rank=r`` keeps a
         per-block residual U·V (rank r, truncated SVD of W_block − W_shared; Bae et al. 2024):
         ``linear(x, W)`` becomes ``linear(x, W_shared) + linear(linear(x, V), U)``, any other use
         reads ``W_shared + U @ V``; exact when r reaches the matrix's smaller dimension.

What is shared: matrices (tensors of two or more dimensions). Vectors (norm weights, biases) stay
per block unless ``vectors=share``: they cost ~0.2% of a block's parameters and keep each block's
scale and offset, which plain sharing would otherwise average away. Buffers are never shared.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar, Literal

import torch
import torch.fx as fx

from rewriter.attention import attention_sites
from rewriter.blocks import Block, BlockGroup, repeated_blocks
from rewriter.pass_infra import Pass, PassResult, Skip, register_pass
from rewriter.program import Program

aten = torch.ops.aten

SHARED_ROOT = "shared_layers"


def partition(n: int, strategy: str, k: int) -> list[list[int]]:
    """Positions 0..n-1 of a group's blocks, split into the sets that share weights."""
    if strategy == "all":
        return [list(range(n))]
    if strategy == "every":
        return [list(range(s, min(s + k, n))) for s in range(0, n, k)]
    return [[p for p in range(n) if p % k == j] for j in range(min(k, n))]  # cycle


def drop_attr(gm: torch.nn.Module, target: str) -> None:
    """Remove the tensor at a module path (a parameter or buffer) from the module tree."""
    *parents, leaf = target.split(".")
    mod = gm
    for p in parents:
        mod = getattr(mod, p)
    mod._parameters.pop(leaf, None)
    mod._buffers.pop(leaf, None)
    if hasattr(mod, leaf):
        delattr(mod, leaf)


def low_rank(diff: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(U (out, r), V (r, in)) with U @ V the best rank-r approximation of diff (out, in)."""
    u, s, vh = torch.linalg.svd(diff.double(), full_matrices=False)
    return (u[:, :rank] * s[:rank]).to(diff.dtype).contiguous(), vh[:rank].to(diff.dtype).contiguous()


def _attention_children(program: Program, block: Block) -> set[str]:
    """The block's direct children that hold an attention site ("attn", "attention", "self_attn")."""
    out = set()
    for s in attention_sites(program.module):
        if s.module.startswith(block.path + "."):
            out.add(s.module[len(block.path) + 1:].split(".")[0])
    return out


@register_pass
@dataclasses.dataclass(frozen=True)
class ShareLayers(Pass):
    """Make repeated blocks use one set of weights (ALBERT); optionally keep a low-rank residual per block."""

    name: ClassVar[str] = "share-layers"
    exact: ClassVar[bool] = False
    summary: ClassVar[str] = "tie the weights of repeated blocks (all, every-k, cycle), optional low-rank residual per block"
    strategy: Literal["all", "every", "cycle"] = "all"
    k: int = 2
    what: Literal["block", "attention", "ffn"] = "block"
    init: Literal["mean", "first"] = "mean"
    rank: int = 0
    vectors: Literal["keep", "share"] = "keep"

    def __post_init__(self):
        if self.strategy in ("every", "cycle") and self.k < (2 if self.strategy == "every" else 1):
            raise ValueError(f"k must be >= {2 if self.strategy == 'every' else 1} for strategy={self.strategy}, got {self.k}")
        if self.rank < 0:
            raise ValueError(f"rank must be >= 0 (0: no per-layer residual), got {self.rank}")

    def run(self, program: Program) -> PassResult:
        groups = repeated_blocks(program)
        if not groups:
            return PassResult(program, 0, message="no repeated blocks (no two blocks with the same structure and parameter shapes)")
        skipped: list[Skip] = []
        tied, shared_tensors, residual_params = 0, 0, 0
        described = []
        for gi, group in enumerate(groups):
            names = self._names(program, group)
            if isinstance(names, str):
                skipped.append(Skip(names, group.describe()))
                continue
            for j, positions in enumerate(partition(len(group.blocks), self.strategy, self.k)):
                blocks = [group.blocks[p] for p in positions]
                if len(blocks) < 2:
                    skipped.append(Skip(f"no other block to share with (strategy={self.strategy}, k={self.k})",
                                        blocks[0].path))
                    continue
                residual_params += self._tie(program, group.container, j, blocks, names)
                tied += len(blocks)
                shared_tensors += len(names)
                described.append(f"{group.container}.[{','.join(str(b.index) for b in blocks)}]")
        if not tied:
            return PassResult(program, 0, skipped, message="no set of two or more blocks to share")
        program.graph.eliminate_dead_code()
        program.graph.lint()
        program.module.recompile()
        notes = {"shared sets": ", ".join(described), "shared tensors": shared_tensors,
                 "what": self.what, "init": self.init}
        if self.rank:
            notes["residual rank"] = self.rank
            notes["residual parameters"] = residual_params
        return PassResult(program, tied, skipped, notes)

    # -- what is shared -----------------------------------------------------------------------

    def _names(self, program: Program, group: BlockGroup) -> list[str] | str:
        first = group.blocks[0]
        names = []
        for n in group.names:
            t = program.get_tensor(first.target(n))
            if isinstance(t, torch.nn.Parameter) and t.is_floating_point() and (t.dim() >= 2 or self.vectors == "share"):
                names.append(n)
        if self.what != "block":
            attn = _attention_children(program, first)
            if not attn:
                return f"no attention found in {first.path}, so what={self.what} has nothing to separate"
            in_attn = [n for n in names if n.split(".")[0] in attn]
            names = in_attn if self.what == "attention" else [n for n in names if n not in in_attn]
        return names or f"no {'matrices' if self.vectors == 'keep' else 'parameters'} to share for what={self.what}"

    # -- rewrite --------------------------------------------------------------------------------

    def _tie(self, program: Program, container: str, j: int, blocks: list[Block], names: list[str]) -> int:
        """Point every block's get_attr nodes at one shared tensor per name; return residual parameters added."""
        gm, graph = program.module, program.graph
        attr_nodes: dict[str, list[fx.Node]] = {}
        for n in graph.nodes:
            if n.op == "get_attr":
                attr_nodes.setdefault(n.target, []).append(n)
        added = 0
        for name in names:
            olds = [program.get_tensor(b.target(name)).detach() for b in blocks]
            shared = torch.stack(olds).mean(0) if self.init == "mean" else olds[0]
            target = f"{SHARED_ROOT}.{container}.{j}.{name}"
            program.set_tensor(target, shared, parameter=True)
            first_use = attr_nodes[blocks[0].target(name)][0]
            with graph.inserting_before(first_use):
                shared_node = graph.get_attr(target)
            for b, old in zip(blocks, olds):
                residual = None
                if self.rank and old.dim() == 2:
                    r = min(self.rank, *old.shape)
                    diff = old - shared
                    if diff.abs().max() > 0:
                        residual = low_rank(diff, r)
                if residual is not None:
                    added += self._add_residual(program, b.target(name), attr_nodes[b.target(name)], shared_node, residual)
                for node in attr_nodes[b.target(name)]:
                    node.replace_all_uses_with(shared_node)
                    graph.erase_node(node)
                drop_attr(gm, b.target(name))
        return added

    def _add_residual(self, program: Program, old_target: str, nodes: list[fx.Node], shared_node: fx.Node,
                      residual: tuple[torch.Tensor, torch.Tensor]) -> int:
        """Make every use of ``nodes`` (the block's old weight) see W_shared + U @ V."""
        graph = program.graph
        u_t, v_t = f"{old_target}_res_u", f"{old_target}_res_v"
        program.set_tensor(u_t, residual[0], parameter=True)  # (out, r)
        program.set_tensor(v_t, residual[1], parameter=True)  # (r, in)
        for node, user in [(node, user) for node in nodes for user in list(node.users)]:
            with graph.inserting_before(user):
                u, v = graph.get_attr(u_t), graph.get_attr(v_t)
            if user.target is aten.linear.default and user.args[1] is node and node not in (user.args[:1] + user.args[2:]):
                x = user.args[0]
                with graph.inserting_after(user):
                    xv = graph.call_function(aten.linear.default, (x, v))  # (…, r)
                with graph.inserting_after(xv):
                    xvu = graph.call_function(aten.linear.default, (xv, u))  # (…, out)
                with graph.inserting_after(xvu):
                    out = graph.call_function(aten.add.Tensor, (user, xvu))
                user.replace_all_uses_with(out, delete_user_cb=lambda n: n is not out)
                new_nodes = (xv, xvu, out)
            else:
                with graph.inserting_before(user):
                    uv = graph.call_function(aten.mm.default, (u, v))  # (out, in)
                    w = graph.call_function(aten.add.Tensor, (shared_node, uv))
                user.replace_input_with(node, w)
                new_nodes = (uv, w)
            for n in new_nodes + (u, v):
                if "nn_module_stack" in user.meta:
                    n.meta["nn_module_stack"] = dict(user.meta["nn_module_stack"])
        return residual[0].numel() + residual[1].numel()
