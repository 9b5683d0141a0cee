"""Pinned fused-attention kernels: the graph form of a backend choice, and the portable form outputs carry.

The ``flash`` pass may replace a ``scaled_dot_product_attention`` call by one backend's own ATen op
(cuDNN, FlashAttention-2, memory-efficient), measured fastest for that site on the device. Those ops
cannot be serialised by torch.export (2.11-2.13: they return SymInts), so every output carries
portable SDPA calls plus the program's ``AttentionBackends`` annotation, and a program loaded on
CUDA is pinned again from it. This module is that mechanism; the choice itself is the pass's.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

from .annotations import AttentionBackends
from .pass_infra import module_path

__all__ = ["PINNED", "SDPA", "call_pinned", "pin", "pinned_backend", "unpin", "repin", "portable", "restore_pins"]

aten = torch.ops.aten
SDPA = aten.scaled_dot_product_attention.default

# backend -> (ATen op, takes a mask)
PINNED = {
    "cudnn": (aten._scaled_dot_product_cudnn_attention.default, True),
    "flash": (aten._scaled_dot_product_flash_attention.default, False),
    "efficient": (aten._scaled_dot_product_efficient_attention.default, True),
}
def call_pinned(backend: str, q, k, v, mask, dropout_p: float, is_causal: bool, scale: float):
    """Run one backend exactly as a pinned graph node does (output only)."""
    op, takes_mask = PINNED[backend]
    if backend == "flash":
        return op(q, k, v, dropout_p, is_causal, False, scale=scale)[0]
    if backend == "cudnn":
        return op(q, k, v, mask, True, dropout_p, is_causal, False, scale=scale)[0]
    return op(q, k, v, mask, True, dropout_p, is_causal, scale=scale)[0]


def pin(graph: fx.Graph, node: fx.Node, backend: str) -> fx.Node:
    """Replace an SDPA node by the backend's own op (+ getitem of its output)."""
    if backend == "default":
        return node
    op, _ = PINNED[backend]
    q, k, v = node.args[:3]
    mask = node.args[3] if len(node.args) > 3 else None
    dropout_p = node.args[4] if len(node.args) > 4 else 0.0
    is_causal = node.args[5] if len(node.args) > 5 else False
    scale = node.kwargs.get("scale")
    with graph.inserting_before(node):
        if backend == "flash":
            call = graph.call_function(op, (q, k, v, dropout_p, is_causal, False), {"scale": scale})
        elif backend == "cudnn":
            call = graph.call_function(op, (q, k, v, mask, True, dropout_p, is_causal, False), {"scale": scale})
        else:
            call = graph.call_function(op, (q, k, v, mask, True, dropout_p, is_causal), {"scale": scale})
        out = graph.call_function(operator.getitem, (call, 0))
    for key in ("nn_module_stack", "stack_trace"):
        if key in node.meta:
            call.meta[key] = out.meta[key] = node.meta[key]
    out.meta["val"] = node.meta.get("val")
    node.replace_all_uses_with(out)
    graph.erase_node(node)
    return out


def pinned_backend(node: fx.Node) -> str | None:
    for name, (op, _) in PINNED.items():
        if node.op == "call_function" and node.target is op:
            return name
    return None


def unpin(graph: fx.Graph) -> dict[str, str]:
    """Turn pinned backend calls back into portable SDPA calls; return {module path: backend}.

    torch.export's serializer (2.11-2.13) cannot write the flash/cuDNN ops, which return SymInts,
    so a .pt2 carries portable SDPA and records the choice; ``repin`` restores it on load.
    """
    chosen = {}
    for call in list(graph.nodes):
        backend = pinned_backend(call)
        if backend is None:
            continue
        if backend == "flash":
            q, k, v, dropout_p, is_causal = call.args[:5]
            mask = None
        elif backend == "cudnn":
            q, k, v, mask, _, dropout_p, is_causal = call.args[:7]
        else:
            q, k, v, mask, _, dropout_p, is_causal = call.args[:7]
        with graph.inserting_before(call):
            sdpa = graph.call_function(SDPA, (q, k, v, mask, dropout_p, is_causal), {"scale": call.kwargs.get("scale")})
        for key in ("nn_module_stack", "stack_trace"):
            if key in call.meta:
                sdpa.meta[key] = call.meta[key]
        getters = [u for u in call.users if u.target is operator.getitem]
        for g in getters:
            if g.args[1] == 0:
                sdpa.meta["val"] = g.meta.get("val")
                g.replace_all_uses_with(sdpa)
            graph.erase_node(g)
        graph.erase_node(call)
        chosen[module_path(sdpa)] = backend
    return chosen


def repin(graph: fx.Graph, chosen: dict[str, str]) -> int:
    """Pin the recorded backends again (programs loaded from .pt2 on CUDA)."""
    n = 0
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target is SDPA and chosen.get(module_path(node)) in PINNED:
            pin(graph, node, chosen[module_path(node)])
            n += 1
    return n


def portable(program):
    """``program`` itself when nothing is pinned, else a clone whose graph calls portable SDPA (for writing)."""
    if not any(pinned_backend(n) for n in program.graph.nodes):
        return program
    program = program.clone()
    unpin(program.graph)
    program.module.recompile()
    return program


def restore_pins(program) -> int:
    """Pin again the backends the program's annotation records (a program loaded onto a CUDA device)."""
    ann = program.annotations.attention_backends
    if ann is None or not ann.by_module:
        return 0
    n = repin(program.graph, ann.by_module)
    program.module.recompile()
    return n


def record_pins(program) -> None:
    """Keep the AttentionBackends annotation true to the graph's pinned calls."""
    chosen = {module_path(n): b for n in program.graph.nodes if (b := pinned_backend(n))}
    program.annotations.attention_backends = AttentionBackends(chosen) if chosen else None
