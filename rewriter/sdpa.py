"""Pinned fused-attention kernels: the graph form of a backend choice, and the portable form outputs carry.

The ``flash`` pass may replace a ``scaled_dot_product_attention`` call by one backend's own ATen op
(cuDNN, FlashAttention-2, memory-efficient), measured fastest for that site on the device. Those ops
cannot be serialised by torch.export (2.11-2.13: they return SymInts), so every output carries
portable SDPA calls plus the program's ``AttentionBackends`` annotation, and a program loaded on
CUDA is pinned again from it. This module is that mechanism; the choice itself is the pass's.
"""

from __future__ import annotations

import operator
import weakref

import torch
import torch.fx as fx
import torch.nn.functional as F

from .annotations import AttentionBackends
from .pass_infra import module_path

__all__ = ["PINNED", "SDPA", "MASK_FLOOR", "CAUSAL_IF_UNPADDED", "call_pinned", "pin", "pinned_backend", "unpin", "repin",
           "portable", "restore_pins", "is_causal_mask", "sdpa_causal_if_unpadded"]

aten = torch.ops.aten
SDPA = aten.scaled_dot_product_attention.default

# backend -> (ATen op, takes a mask)
PINNED = {
    "cudnn": (aten._scaled_dot_product_cudnn_attention.default, True),
    "flash": (aten._scaled_dot_product_flash_attention.default, False),
    "efficient": (aten._scaled_dot_product_efficient_attention.default, True),
}
MASK_FLOOR = -1e4  # an additive mask value at or below this masks the key out
CAUSAL_IF_UNPADDED = "causal-if-unpadded"


# ---- a run-time choice: is_causal when the mask of this call is exactly causal ---------------------------

def is_causal_mask(mask: torch.Tensor) -> bool:
    """True when ``mask`` (bool: True = attend; additive: 0 = attend, <= MASK_FLOOR = masked) is exactly the
    square causal mask (every batch row, every head), i.e. SDPA with ``is_causal=True`` computes the same."""
    if mask.dim() < 2 or mask.shape[-1] != mask.shape[-2]:
        return False
    s = mask.shape[-1]
    lower = torch.ones(s, s, dtype=torch.bool, device=mask.device).tril()
    if mask.dtype == torch.bool:
        return bool(torch.equal(mask, lower.expand_as(mask)))
    return bool(torch.where(lower, mask == 0, mask <= MASK_FLOOR).all())


_LAST: list = [None, -1, False]  # (weakref to the last mask, its version, the answer): one check per forward


def _causal_cached(mask: torch.Tensor) -> bool:
    ref, version, answer = _LAST
    if ref is not None and ref() is mask and mask._version == version:
        return answer
    answer = is_causal_mask(mask)
    _LAST[:] = [weakref.ref(mask), mask._version, answer]
    return answer


def sdpa_causal_if_unpadded(q, k, v, mask, dropout_p: float = 0.0, scale: float | None = None,
                            enable_gqa: bool = False):
    """SDPA of a site whose mask is causal AND a padding mask made from an input: with ``is_causal=True`` (the
    causal kernels skip the upper triangle) when this call's mask is exactly causal — no padding in the batch,
    the common case — else with the mask. The same arithmetic either way: masked scores add exact zeros.
    One check per distinct mask tensor (all layers of a forward share one, so one device sync per forward);
    under torch.compile the masked form is traced (no data-dependent branch)."""
    if mask is not None and not torch.compiler.is_compiling() and _causal_cached(mask):
        return F.scaled_dot_product_attention(q, k, v, None, dropout_p, True, scale=scale, enable_gqa=enable_gqa)
    return F.scaled_dot_product_attention(q, k, v, mask, dropout_p, False, scale=scale, enable_gqa=enable_gqa)


def call_pinned(backend: str, q, k, v, mask, dropout_p: float, is_causal: bool, scale: float):
    """Run one backend exactly as a pinned graph node does (output only)."""
    if backend == CAUSAL_IF_UNPADDED:
        return sdpa_causal_if_unpadded(q, k, v, mask, dropout_p, scale)
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
    q, k, v = node.args[:3]
    mask = node.args[3] if len(node.args) > 3 else None
    dropout_p = node.args[4] if len(node.args) > 4 else 0.0
    is_causal = node.args[5] if len(node.args) > 5 else False
    scale = node.kwargs.get("scale")
    if backend == CAUSAL_IF_UNPADDED:  # a Python-level choice per call: one node, SDPA's output
        with graph.inserting_before(node):
            call = graph.call_function(sdpa_causal_if_unpadded, (q, k, v, mask, dropout_p),
                                       {"scale": scale, "enable_gqa": bool(node.kwargs.get("enable_gqa"))})
        call.meta.update({k2: node.meta[k2] for k2 in ("nn_module_stack", "stack_trace", "val") if k2 in node.meta})
        node.replace_all_uses_with(call)
        graph.erase_node(node)
        return call
    op, _ = PINNED[backend]
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
    if node.op == "call_function" and node.target is sdpa_causal_if_unpadded:
        return CAUSAL_IF_UNPADDED
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
        if backend == CAUSAL_IF_UNPADDED:
            q, k, v, mask, dropout_p = call.args[:5]
            with graph.inserting_before(call):
                sdpa = graph.call_function(SDPA, (q, k, v, mask, dropout_p, False), dict(call.kwargs))
            if not sdpa.kwargs.get("enable_gqa"):
                sdpa.kwargs = {"scale": call.kwargs.get("scale")}
            sdpa.meta.update({k2: call.meta[k2] for k2 in ("nn_module_stack", "stack_trace", "val") if k2 in call.meta})
            call.replace_all_uses_with(sdpa)
            graph.erase_node(call)
            chosen[module_path(sdpa)] = backend
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
        if node.op == "call_function" and node.target is SDPA and (chosen.get(module_path(node)) in PINNED
                                                                   or chosen.get(module_path(node)) == CAUSAL_IF_UNPADDED):
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
