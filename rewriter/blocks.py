"""Repeated-block analysis: which blocks of a program repeat (same structure, same parameter shapes).

A block is the module at ``<container>.<i>`` (``h.3``, ``model.layers.7``, ``bert.encoder.layer.0``): its
tensors are the ``get_attr`` targets under that path, its operations the graph nodes whose
``nn_module_stack`` passes through it. Two blocks of one container repeat when

* their tensors have the same names relative to the block, with the same shapes and dtypes, and
* their operation graphs have the same Weisfeiler-Lehman hash (networkx), each node labelled by its
  ATen op and each weight by its relative name, so the blocks compute the same function of their
  weights.

Containers are looked for at every integer path component, outermost first; a block that repeats
claims its tensors, so nested lists (``stages.0.blocks.1``) are searched only where the outer level
does not repeat. ``repeated_blocks`` returns the groups in execution order::

    for g in repeated_blocks(program):
        g.container, g.indices, g.names          # "h", (0, 1, 2, 3), ("ln_1.weight", "attn.c_attn.weight", ...)
        g.blocks[0].target("attn.c_attn.weight")  # "h.0.attn.c_attn.weight"
"""

from __future__ import annotations

import dataclasses
import warnings

import networkx as nx
import torch
import torch.fx as fx

from .pass_infra import module_paths
from .program import Program

__all__ = ["Block", "BlockGroup", "repeated_blocks"]


@dataclasses.dataclass(frozen=True)
class Block:
    path: str  # "h.0"
    index: int  # 0
    names: tuple[str, ...]  # tensors relative to the block, graph order: ("ln_1.weight", "attn.c_attn.weight", ...)

    def target(self, name: str) -> str:
        """The get_attr target of a relative tensor name: ``h.0`` + ``attn.c_attn.weight``."""
        return f"{self.path}.{name}"


@dataclasses.dataclass(frozen=True)
class BlockGroup:
    container: str  # "h", "model.layers"
    blocks: tuple[Block, ...]  # in execution order
    structure: str  # Weisfeiler-Lehman hash of one block's operation graph

    @property
    def indices(self) -> tuple[int, ...]:
        return tuple(b.index for b in self.blocks)

    @property
    def names(self) -> tuple[str, ...]:
        return self.blocks[0].names

    def describe(self) -> str:
        return f"{self.container}.[{','.join(map(str, self.indices))}]"


def _split_block(target: str, depth: int) -> tuple[str, int, str] | None:
    """(container, index, relative name) when the component at ``depth`` of ``target`` is an integer."""
    parts = target.split(".")
    if depth < 1 or depth >= len(parts) - 1 or not parts[depth].isdigit():
        return None
    return ".".join(parts[:depth]), int(parts[depth]), ".".join(parts[depth + 1:])


def _op_label(n: fx.Node) -> str:
    return getattr(n.target, "__name__", str(n.target)) if n.op == "call_function" else n.op


def _structure_hash(graph: fx.Graph, path: str, tensors: dict[str, str]) -> str:
    """WL hash of the operation graph of the block at ``path`` (tensors labelled by relative name)."""
    g = nx.DiGraph()
    inside = [n for n in graph.nodes if n.op == "call_function" and path in module_paths(n)]
    members = set(inside)
    for n in inside:
        g.add_node(n.name, label=_op_label(n))
        for pos, a in enumerate(n.all_input_nodes):
            if a in members:
                src = a.name
            elif a.op == "get_attr" and a.target in tensors:
                src = f"w:{tensors[a.target]}"
                g.add_node(src, label=f"weight {tensors[a.target]}")
            else:
                src = f"in:{n.name}:{pos}"
                g.add_node(src, label="input")
            g.add_edge(src, n.name, label=str(pos))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # networkx 3.5 notes that directed-graph hashes changed
        return nx.weisfeiler_lehman_graph_hash(g, node_attr="label", edge_attr="label", iterations=4)


def _signature(program: Program, block_path: str, names: tuple[str, ...]) -> tuple:
    out = []
    for name in sorted(names):
        t = program.get_tensor(f"{block_path}.{name}")
        out.append((name, tuple(t.shape), t.dtype, isinstance(t, torch.nn.Parameter)))
    return tuple(out)


def repeated_blocks(program: Program) -> list[BlockGroup]:
    """The groups of blocks that repeat (at least two members each), in execution order."""
    targets = [n.target for n in program.graph.nodes if n.op == "get_attr"
               and isinstance(program.get_tensor(n.target), torch.Tensor)]
    targets = list(dict.fromkeys(targets))
    max_depth = max((t.count(".") for t in targets), default=0)
    claimed: set[str] = set()  # block paths already in a group: nothing inside them is searched again
    groups: list[BlockGroup] = []
    for depth in range(1, max_depth):
        # container -> index -> relative names
        found: dict[str, dict[int, list[str]]] = {}
        for t in targets:
            split = _split_block(t, depth)
            if split is None or any(t.startswith(c + ".") for c in claimed):
                continue
            container, index, rel = split
            found.setdefault(container, {}).setdefault(index, []).append(rel)
        for container, blocks in found.items():
            if len(blocks) < 2:
                continue
            by_key: dict[tuple, list[Block]] = {}
            for index, names in blocks.items():
                path = f"{container}.{index}"
                block = Block(path, index, tuple(names))
                tensors = {block.target(n): n for n in names}
                key = (_signature(program, path, block.names), _structure_hash(program.graph, path, tensors))
                by_key.setdefault(key, []).append(block)
            for (_, structure), members in by_key.items():
                if len(members) < 2:
                    continue
                groups.append(BlockGroup(container, tuple(sorted(members, key=lambda b: b.index)), structure))
                claimed.update(b.path for b in members)
    order = {}
    for i, n in enumerate(program.graph.nodes):
        for p in module_paths(n) if n.op == "call_function" else ():
            order.setdefault(p, i)
    groups.sort(key=lambda g: order.get(g.blocks[0].path, len(order)))
    return groups
