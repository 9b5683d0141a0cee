"""Checkpoint regions: run chosen blocks of a flat program under non-reentrant activation checkpointing.

The program's graph stays flat, so every pass after ``checkpoint`` still sees every ATen node with its
``nn_module_stack``; the regions live in the graph's code generator. A region is a module path (a
block: ``h.3``, ``model.layers.7``). Its members are the graph nodes from the first to the last one
traced inside that module, in graph order, including anything a later pass inserted between them
(casts, a fused attention call); weights (``get_attr``) are never members, they are passed in.

When the graph module is recompiled, :class:`CheckpointCodeGen` outlines each region into a small
pure GraphModule (inputs: the activations, sizes and weights it reads; outputs: the values used after
it) and the generated ``forward`` calls it through ``torch.utils.checkpoint.checkpoint(...,
use_reentrant=False)``::

    checkpoint_h_3 = checkpoint_h_3(add_11, sym_size_int_4, h_3_ln_1_weight, ...)
    getitem_3 = checkpoint_h_3[0]

so the module trains with recomputation. A region's policy says what the recomputation keeps:
``full`` (the default) keeps nothing of the region; ``selective`` (Korthikanti et al. 2022) keeps the
outputs of its matmuls, attention and fused loss (:data:`SELECTIVE`: PyTorch's selective activation
checkpointing, ``create_selective_checkpoint_contexts``) and recomputes only the cheap element-wise
and norm ops, so backward repeats no matmul. ``torch.export`` interprets a GraphModule's flat graph node
by node, so export (``.pt2``, ONNX) sees the program without regions, as it would inline any
non-reentrant checkpoint. ``targets/source.py`` writes the outlined form as Python source.
"""

from __future__ import annotations

import dataclasses
import functools
import operator
from typing import Callable

import torch
import torch.fx as fx
from torch.fx.graph import _PyTreeCodeGen

from .pass_infra import module_paths

__all__ = ["Region", "find_regions", "outline", "region_graph", "CheckpointCodeGen", "install", "slug",
           "regions_of", "region_modules", "set_regions", "keep_regions", "POLICIES", "SELECTIVE", "keeps_output",
           "selective_policy", "policies_of"]

_OUTSIDE = ("placeholder", "get_attr", "output")
POLICIES = ("full", "selective")

aten = torch.ops.aten
# What ``selective`` keeps: ops whose output costs a matmul to remake. Graph-level targets (what the program's
# nodes call) and the dispatcher-level ops they become (what the selective-checkpoint policy sees).
_KEPT_IN_GRAPH = ("linear", "mm", "addmm", "bmm", "baddbmm", "matmul", "scaled_dot_product_attention",
                  "_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
                  "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention_for_cpu",
                  "convolution", "conv2d")
_KEPT_AT_DISPATCH = ("mm", "addmm", "bmm", "baddbmm", "_scaled_dot_product_flash_attention",
                     "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention",
                     "_scaled_dot_product_flash_attention_for_cpu", "_flash_attention_forward",
                     "_efficient_attention_forward", "convolution")
_KEPT_CUSTOM = ("evo_rewrite::linear_cross_entropy", "evo_rewrite::softcap_attention")


def _op_name(target) -> str:
    """``aten::mm`` / ``evo_rewrite::rms_norm`` for an OpOverload or OpOverloadPacket, else ''."""
    schema = getattr(target, "_schema", None)
    if schema is None and hasattr(target, "default"):
        schema = getattr(target.default, "_schema", None)
    return schema.name if schema is not None else ""


@functools.lru_cache(maxsize=None)
def _kept(name: str, names: tuple[str, ...]) -> bool:
    return name in _KEPT_CUSTOM or (name.startswith("aten::") and name[6:] in names)


def keeps_output(n: fx.Node) -> bool:
    """Whether a ``selective`` region keeps this node's output (a matmul, attention, fused loss) for backward."""
    return n.op == "call_function" and _kept(_op_name(n.target), _KEPT_IN_GRAPH)


def SELECTIVE(ctx, op, *args, **kwargs):  # noqa: N802 - the policy, named as the option that chooses it
    """Selective-checkpoint policy: keep matmul, attention and fused-loss outputs; recompute everything else."""
    from torch.utils.checkpoint import CheckpointPolicy

    return CheckpointPolicy.MUST_SAVE if _kept(_op_name(op), _KEPT_AT_DISPATCH) else CheckpointPolicy.PREFER_RECOMPUTE


def selective_policy():
    """Context functions for ``torch.utils.checkpoint.checkpoint(context_fn=...)`` with :func:`SELECTIVE`."""
    from torch.utils.checkpoint import create_selective_checkpoint_contexts

    return create_selective_checkpoint_contexts(SELECTIVE)


@dataclasses.dataclass
class Region:
    path: str  # "h.3"
    members: list[fx.Node]  # graph order
    inputs: list[fx.Node]  # non-members read by members, first use first (weights included)
    outputs: list[fx.Node]  # members read after the region

    @property
    def random(self) -> bool:
        """Whether a member draws random numbers (dropout in training): then checkpoint replays the RNG state."""
        return any(_draws_random(n) for n in self.members)


def _draws_random(n: fx.Node) -> bool:
    if n.op != "call_function" or torch.Tag.nondeterministic_seeded not in getattr(n.target, "tags", ()):
        return False
    if "dropout" in getattr(n.target, "__name__", ""):  # dropout(x, p, train): p = 0 or eval mode draws nothing
        p = n.args[1] if len(n.args) > 1 else n.kwargs.get("p", 0.5)
        train = n.args[2] if len(n.args) > 2 else n.kwargs.get("train", True)
        return train is not False and p != 0
    return True


def _traced_in(n: fx.Node, path: str) -> bool:
    return n.op not in _OUTSIDE and path in module_paths(n)


def find_regions(graph: fx.Graph, paths: list[str] | tuple[str, ...]) -> list[Region]:
    """The regions of ``paths`` in graph order. Raises ValueError for a path with no node or overlapping regions."""
    nodes = list(graph.nodes)
    pos = {n: i for i, n in enumerate(nodes)}
    spans = []
    for path in paths:
        idx = [i for i, n in enumerate(nodes) if _traced_in(n, path)]
        if not idx:
            raise ValueError(f"no graph node was traced in module '{path}'")
        spans.append((idx[0], idx[-1], path))
    spans.sort()
    for (_, hi, a), (lo, _, b) in zip(spans, spans[1:]):
        if lo <= hi:
            raise ValueError(f"regions '{a}' and '{b}' overlap: their nodes interleave in the graph")
    regions = []
    for lo, hi, path in spans:
        members = [n for n in nodes[lo:hi + 1] if n.op not in _OUTSIDE]
        inside = set(members)
        inputs: list[fx.Node] = []
        for m in members:
            for a in m.all_input_nodes:
                if a not in inside and a not in inputs:
                    if a.op != "get_attr" and pos[a] > lo:
                        raise ValueError(f"region '{path}' reads {a.name}, which is defined inside its span")
                    inputs.append(a)
        outputs = [m for m in members if any(u not in inside for u in m.users)]
        regions.append(Region(path, members, inputs, outputs))
    return regions


def outline(graph: fx.Graph, regions: list[Region],
            make_call: Callable[[fx.Graph, Region, list[fx.Node]], fx.Node]) -> fx.Graph:
    """A new graph with each region's members replaced by one call returning the tuple of its outputs.

    ``make_call(new_graph, region, inputs_in_new_graph)`` creates that call. Weights a region reads
    are emitted before its call (a ``get_attr`` has no inputs, so it may move up).
    """
    first = {r.members[0]: r for r in regions}
    member_of = {m: r for r in regions for m in r.members}
    new = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}

    def copy(n: fx.Node) -> None:
        env[n] = new.node_copy(n, lambda a: env[a])

    for n in graph.nodes:
        region = first.get(n)
        if region is not None:
            for a in region.inputs:
                if a not in env:  # a get_attr that sits inside the span
                    copy(a)
            call = make_call(new, region, [env[a] for a in region.inputs])
            for i, out in enumerate(region.outputs):
                env[out] = new.call_function(operator.getitem, (call, i))
                env[out].meta = dict(out.meta)
        elif n in member_of or n in env:
            continue
        else:
            copy(n)
    return new


def region_graph(region: Region, *, weights_under: str | None = None) -> fx.Graph:
    """The region as a graph of its own: placeholders for its inputs, its members, a tuple output.

    With ``weights_under`` (the region's path), weights below that path become ``get_attr`` nodes
    relative to it (``attn.c_attn.weight``), for a region module that holds its block's weights;
    otherwise every input, weights included, is a placeholder (a pure function).
    """
    g = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    prefix = f"{weights_under}." if weights_under else None
    for a in region.inputs:
        if prefix and a.op == "get_attr" and a.target.startswith(prefix):
            env[a] = g.get_attr(a.target[len(prefix):])
        else:
            env[a] = g.placeholder(a.name)
        env[a].meta = dict(a.meta)
    for m in region.members:
        env[m] = g.node_copy(m, lambda a: env[a])
    g.output(tuple(env[o] for o in region.outputs))
    return g


def slug(path: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in path)


def _runner(region: Region, policy: str = "full") -> Callable:
    """A function that runs the region's pure GraphModule under non-reentrant checkpointing (``policy``)."""
    gm = fx.GraphModule(torch.nn.Module(), region_graph(region), class_name=f"Region_{slug(region.path)}")
    options = dict(use_reentrant=False, preserve_rng_state=region.random)
    if policy == "selective":
        options["context_fn"] = selective_policy

    def run(*args):
        return torch.utils.checkpoint.checkpoint(gm, *args, **options)

    run.__name__ = run.__qualname__ = f"checkpoint_{slug(region.path)}"
    run.__module__ = __name__
    run.region = gm  # type: ignore[attr-defined]
    run.path = region.path  # type: ignore[attr-defined]
    run.policy = policy  # type: ignore[attr-defined]
    return run


class CheckpointCodeGen(_PyTreeCodeGen):
    """The program's code generator with checkpoint regions: ``forward`` calls each region through checkpoint."""

    def __init__(self, pytree_info, regions: tuple[str, ...], policies: dict[str, str] | None = None):
        super().__init__(pytree_info)
        self.regions = tuple(regions)
        self.policies = dict(policies or {})  # path -> "selective"; a path not listed: "full"
        self.runners: dict[str, Callable] = {}  # path -> runner, rebuilt at every code generation

    def __getstate__(self):  # copies of the graph rebuild the runners when they recompile
        state = dict(self.__dict__)
        state["runners"] = {}
        return state

    def _gen_python_code(self, nodes, root_module, namespace, **kwargs):
        graph = getattr(nodes, "graph", None) or next(iter(nodes)).graph  # Graph.nodes (a _node_list) knows its graph
        regions = find_regions(graph, self.regions)
        runners = {r.path: _runner(r, self.policies.get(r.path, "full")) for r in regions}

        def call(new: fx.Graph, region: Region, inputs: list[fx.Node]) -> fx.Node:
            return new.call_function(runners[region.path], tuple(inputs))  # named after the runner

        outlined = outline(graph, regions, call)
        for n in outlined.nodes:  # name locals in the caller's namespace, as Graph.python_code does
            n._repr_fn = lambda n, ns=namespace: ns.create_name(n.name, n)
        self.runners = runners
        return super()._gen_python_code(outlined.nodes, root_module, namespace, **kwargs)


def install(gm: fx.GraphModule, paths: tuple[str, ...], policies: dict[str, str] | None = None) -> None:
    """Run ``paths`` as checkpoint regions (replacing any regions the module had). Validates them first.

    ``policies``: path -> ``"selective"`` or ``"full"`` (the default for a path not listed).
    """
    find_regions(gm.graph, paths)
    policies = {p: v for p, v in (policies or {}).items() if v != "full"}
    for p, v in policies.items():
        if v not in POLICIES or p not in paths:
            raise ValueError(f"checkpoint policy {v!r} for {p!r}: a policy is one of {', '.join(POLICIES)}, "
                             "for one of the regions")
    info = getattr(gm.graph._codegen, "pytree_info", None)
    gm.graph.set_codegen(CheckpointCodeGen(info, paths, policies) if paths else _PyTreeCodeGen(info))
    gm.recompile()


def regions_of(gm: fx.GraphModule) -> tuple[str, ...]:
    """The regions the module's code generator runs (the mechanism; the program's annotation is the record)."""
    cg = gm.graph._codegen
    return cg.regions if isinstance(cg, CheckpointCodeGen) else ()


def set_regions(program, paths: tuple[str, ...], estimate: dict | None = None,
                policies: dict[str, str] | None = None) -> None:
    """Record ``paths`` (with their ``policies``) as the program's checkpoint regions and make its module run them so."""
    from .annotations import CheckpointRegions

    policies = {p: v for p, v in (policies or {}).items() if v != "full"}
    install(program.module, tuple(paths), policies)
    program.annotations.checkpoint = CheckpointRegions(tuple(paths), dict(estimate or {}), policies) if paths else None


def keep_regions(program) -> None:
    """After a pass: the module runs the regions the annotation records (a pass may have rebuilt the module)."""
    ann = program.annotations.checkpoint
    if ann is not None and (regions_of(program.module) != ann.paths or policies_of(program.module) != ann.policies):
        install(program.module, ann.paths, ann.policies)


def policies_of(gm: fx.GraphModule) -> dict[str, str]:
    """The regions' policies the module's code generator runs (path -> "selective"; full ones not listed)."""
    cg = gm.graph._codegen
    return dict(cg.policies) if isinstance(cg, CheckpointCodeGen) else {}


def region_modules(gm: fx.GraphModule) -> dict[str, fx.GraphModule]:
    """The pure GraphModule each region runs (as of the last recompile), by path: hook them to watch recomputation."""
    cg = gm.graph._codegen
    return {p: r.region for p, r in cg.runners.items()} if isinstance(cg, CheckpointCodeGen) else {}
