"""`tensor-parallel`: derive and check a Megatron-style tensor-parallel plan for N GPUs.

pattern  the attention sites (``evo_rewrite.attention``) with their q/k/v projections
         (``evo_rewrite.projections``, separate or fused qkv), the FFN pairs of every block (a linear
         whose output reaches another linear of its block through elementwise ops, feature-keeping
         reshapes and feature splits only: up/gate -> down, fused gate_up -> down), token
         embeddings (tables indexed by a model input) and the LM head (a linear onto the vocabulary)
check    before anything runs: query heads and K/V heads of every site (after any ``gqa``), FFN
         widths and fused-projection parts divisible by the degree, else an error naming the site
         and the valid degrees; then the graph of one rank is built (rewriter/tensor_parallel.py),
         which fails on any op the sharding cannot pass through, and the N ranks are simulated in
         one process (passes/tensor_parallel_ranks.py: a thread per rank, collectives in memory)
         against the unsharded program
rewrite  nothing in the single-process program: the plan — every linear layer once, as column-
         (``Shard(0)`` of an (out, in) weight), row- (``Shard(1)``, bias added after the all-reduce),
         vocabulary-parallel or replicated; every sharded tensor's DTensor placement; heads per rank
         of every site — goes into ``program.annotations.tensor_parallel``, the report and the ``.pt2``,
         and ``torchrun --nproc-per-node N -m evo_rewrite.targets.parallel MODEL.pt2`` applies it on each rank
"""

from __future__ import annotations

import copy
import dataclasses
import operator
from typing import ClassVar

import torch
import torch.fx as fx

from evo_rewrite.attention import CASTS, RESHAPES, attention_sites, untranspose, val
from evo_rewrite.annotations import TensorParallelPlan
from evo_rewrite.blocks import repeated_blocks
from evo_rewrite.errors import PassNotApplicable
from evo_rewrite.pass_infra import Pass, PassResult, Placement, Skip, module_path, register_pass
from evo_rewrite.program import Program
from evo_rewrite.projections import Projection, output_projection, trace_projection
from evo_rewrite.verify import compare_outputs, tolerance

from .tensor_parallel_ranks import simulate
from evo_rewrite.tensor_parallel import (COLLECTIVES, SPLITS, LinearRole, copy_for_rank, is_pointwise, linear_layers,
                                         localize)

__all__ = ["TensorParallel", "plan_rank"]

aten = torch.ops.aten


def _linear_input(n: fx.Node) -> fx.Node:
    return n.args[1] if n.target is aten.addmm.default else n.args[0]


def _block_of(program: Program):
    """node -> the repeated block (``model.layers.3``) it runs in, else its parent module."""
    paths = sorted((b.path for grp in repeated_blocks(program) for b in grp.blocks), key=len, reverse=True)

    def block(n: fx.Node) -> str:
        mp = module_path(n)
        return next((p for p in paths if mp == p or mp.startswith(p + ".")), mp.rpartition(".")[0])

    return block


def _last_dim_split(u: fx.Node) -> list[int] | None:
    """Boundaries [0, …, total] of a split/chunk of the last (feature) dim, else None."""
    src = val(u.args[0]) if u.target in SPLITS else None
    if src is None:
        return None
    dim = u.args[2] if len(u.args) > 2 else u.kwargs.get("dim", 0)
    total = int(src.shape[-1])
    if dim % src.dim() != src.dim() - 1:
        return None
    if u.target is aten.split_with_sizes.default:
        sizes = list(u.args[1])
    else:
        size = int(u.args[1]) if u.target is aten.split.Tensor else -(-total // int(u.args[1]))
        sizes = [size] * (total // size) + ([total % size] if total % size else [])
    return [sum(sizes[:i]) for i in range(len(sizes) + 1)]


def _ffn_reach(n: fx.Node, linears, block, depth: int = 8) -> tuple[set[fx.Node], list[int] | None]:
    """Linear layers of n's block whose input is made from n's output by elementwise ops, feature-keeping
    reshapes and splits of the features only (up/gate -> down), and the boundaries of such a split
    (a fused gate_up projection)."""
    found, bounds, frontier = set(), None, [n]
    for _ in range(depth):
        nxt = []
        for m in frontier:
            for u in m.users:
                if u in linears and _linear_input(u) is m:
                    if block(u) == block(n):
                        found.add(u)
                elif u.op != "call_function":
                    continue
                elif is_pointwise(u) or u.target is operator.getitem:
                    nxt.append(u)
                elif u.target in RESHAPES and val(u) is not None and val(m) is not None \
                        and str(val(u).shape[-1]) == str(val(m).shape[-1]):
                    nxt.append(u)
                elif _last_dim_split(u) is not None:
                    bounds = bounds or _last_dim_split(u)
                    nxt.append(u)
        frontier = nxt
    return found, bounds


def _reaches_output(n: fx.Node, depth: int = 8) -> bool:
    """Whether n's output is a model output, through elementwise ops and reshapes only (logits)."""
    frontier = [n]
    for _ in range(depth):
        nxt = []
        for m in frontier:
            for u in m.users:
                if u.op == "output":
                    return True
                if u.op == "call_function" and (is_pointwise(u) or u.target in RESHAPES):
                    nxt.append(u)
        frontier = nxt
    return False


def _model_input(n) -> bool:
    """Whether n is a model input, or one reshaped or cast (GPT-2 views its input_ids)."""
    while isinstance(n, fx.Node) and n.op == "call_function" and (n.target in RESHAPES or n.target in CASTS):
        n = n.args[0]
    return isinstance(n, fx.Node) and n.op == "placeholder"


def _only_linear_behind(t: fx.Node | None, linears, depth: int = 24) -> Projection | None:
    """The one linear layer t is computed from (per-head norms, interleaved fused qkv), else None.

    The whole projection is then sharded by output features; the propagation checks that its
    heads are its outermost output dimension (a split across a sharded dim that is not a part
    boundary is refused) and the simulation checks the numbers.
    """
    found, seen, frontier = set(), set(), [t] if t is not None else []
    for _ in range(depth):
        nxt = []
        for n in frontier:
            if n in seen or n.op != "call_function":
                continue
            seen.add(n)
            if n in linears:
                found.add(n)
            else:
                nxt.extend(n.all_input_nodes)
        frontier = nxt
    if len(found) != 1:
        return None
    p = copy.copy(linears[found.pop()])
    p.start, p.stop = 0, p.out_features
    return p


def _kv_paths(site):
    k = site.kv_repeat[0] if site.kv_repeat else (site.k if site.fused or not site.k_transposed else untranspose(site.k))
    v = site.kv_repeat[1] if site.kv_repeat else site.v
    return k, v


def _valid_degrees(sizes: list[int]) -> list[int]:
    top = min(sizes) if sizes else 1
    return [d for d in range(1, top + 1) if all(s % d == 0 for s in sizes)]


@dataclasses.dataclass
class _Analysis:
    roles: dict[fx.Node, LinearRole]  # column- and vocabulary-parallel layers (row-parallel ones are found by propagation)
    linears: dict[fx.Node, Projection]
    embeddings: dict[fx.Node, str]  # embedding op -> "vocab" | "replicate"
    attention: list[dict]
    out_projections: set[fx.Node]
    sizes: list[tuple[str, int]]  # (what, size) every degree must divide


def _analyse(gm: fx.GraphModule, degree: int, block) -> _Analysis:
    g = gm.graph
    linears = linear_layers(g)
    roles: dict[fx.Node, LinearRole] = {}
    attention, sizes, outs = [], [], set()
    parts: dict[fx.Node, list] = {}
    sites = attention_sites(gm)
    for s in sites:
        if s.layout != "BHSD" or s.heads is None or s.kv_heads is None:
            raise PassNotApplicable(f"tensor-parallel: attention site {s.module} has a {s.layout} layout whose head "
                                    "count is unknown; tensor-parallel shards (batch, heads, seq, dim) attention")
        attention.append({"module": s.module, "heads": s.heads, "kv_heads": s.kv_heads,
                          "heads_per_rank": s.heads // degree if s.heads % degree == 0 else None,
                          "kv_heads_per_rank": s.kv_heads // degree if s.kv_heads % degree == 0 else None,
                          "fused": s.fused})
        sizes += [(f"attention site {s.module}: {s.heads} query heads", s.heads),
                  (f"attention site {s.module}: {s.kv_heads} K/V heads", s.kv_heads)]
    _check_sizes(sizes, degree)  # head counts first: the trap users hit, and the clearest message
    for s in sites:
        k, v = _kv_paths(s)
        for role, t in (("q", s.q), ("k", k), ("v", v)):
            path = trace_projection(t) if t is not None else "no K before its transpose"
            p = path.projection if not isinstance(path, str) else _only_linear_behind(t, linears)
            if p is None:
                raise PassNotApplicable(f"tensor-parallel: attention site {s.module or '(top level)'}: the {role} "
                                        f"projection was not found ({path})")
            parts.setdefault(p.node, []).append((role, p.start, p.stop, p, s.module))
        o = output_projection(s)
        if o is not None:
            outs.add(o.node)
    for node, ps in parts.items():
        proj = ps[0][3]
        segs = sorted({(a, b) for _, a, b, _, _ in ps})
        role = "".join(r for r, *_ in sorted(ps, key=lambda x: x[1]))
        if len(segs) > 1 or segs[0] != (0, proj.out_features):
            bounds = [0] + [b for _, b in segs]
            if [a for a, _ in segs] != bounds[:-1] or bounds[-1] != proj.out_features:
                raise PassNotApplicable(f"tensor-parallel: fused projection {module_path(node)} has output features "
                                        "that are not q, k or v of one site")
            sizes += [(f"part {a}:{b} of fused projection {module_path(node)}", b - a) for a, b in segs]
        else:
            segs = None
        roles[node] = LinearRole(proj, role, "colwise", segs, ps[0][4])
    attn_linears = set(roles) | outs
    free = {n: p for n, p in linears.items() if n not in attn_linears}
    reach = {n: _ffn_reach(n, free, block) for n in free}
    downs = set().union(*(hit for hit, _ in reach.values())) if reach else set()
    for n, (hit, bounds) in reach.items():
        if hit and n not in downs:
            segs = list(zip(bounds[:-1], bounds[1:])) if bounds and len(bounds) > 2 else None
            roles[n] = LinearRole(linears[n], "ffn-in", "colwise", segs, site=module_path(n))
            for a, b in segs or [(0, linears[n].out_features)]:
                sizes.append((f"FFN projection {module_path(n)} ({b - a} features)", b - a))
    # token embeddings (indexed by a model input) and the LM head (a linear onto the vocabulary)
    embeddings, vocab_tables = {}, {}
    for n in g.nodes:
        if n.op == "call_function" and n.target is aten.embedding.default and n.args[0].op == "get_attr":
            ids = n.args[1]
            rows = int(n.args[0].meta["val"].shape[0]) if "val" in n.args[0].meta else 0
            token = _model_input(ids)
            embeddings[n] = "vocab" if token and rows % degree == 0 else "replicate"
            if token:
                vocab_tables[n.args[0].target] = rows
    for n, p in linears.items():
        if n in roles or n in outs or n in downs:
            continue
        if p.weight in vocab_tables or p.out_features in vocab_tables.values() and _reaches_output(n):
            roles[n] = LinearRole(p, "lm-head", "vocab" if p.out_features % degree == 0 else "replicate",
                                  site=module_path(n))
    return _Analysis(roles, linears, embeddings, attention, outs, sizes)


def _check_sizes(sizes: list[tuple[str, int]], degree: int) -> None:
    bad = [(what, size) for what, size in sizes if size % degree]
    if bad:
        what, size = bad[0]
        valid = _valid_degrees([s for _, s in sizes])
        trap = " (a degree above the K/V head count would leave ranks without K/V heads)" if "K/V" in what and degree > size else ""
        raise PassNotApplicable(f"tensor-parallel(degree={degree}): {what}, which {degree} does not divide{trap}; "
                                f"valid degrees for this model: {', '.join(map(str, valid))}")


def _placement(p: Projection, style: str) -> int:
    """The dim of the stored weight that is sharded: output features (column) or input features (row)."""
    out_dim = 0 if p.layout == "out_in" else 1
    return out_dim if style in ("colwise", "vocab") else 1 - out_dim


def plan_rank(program: Program, degree: int, sequence_parallel: bool = False, rank: int = 0,
              group: str = "tp") -> tuple[dict, fx.GraphModule]:
    """The plan (data) and rank ``rank``'s graph, whose collectives run on process group ``group``.

    The returned GraphModule shares the program's (full) tensors; ``plan["tensors"]`` says how each
    sharded one is cut (``local_shard``, or DTensor placements in ``targets/parallel.py``).
    """
    gm = copy_for_rank(program.module)
    a = _analyse(gm, degree, _block_of(program))
    _check_sizes(a.sizes, degree)
    sharded = {n: r for n, r in a.roles.items() if r.style != "replicate"}
    result = localize(gm, sharded, a.embeddings, degree, rank, group, sequence_parallel)
    for n in result["rowwise"]:
        if n not in a.linears:
            raise PassNotApplicable(f"tensor-parallel(degree={degree}): {module_path(n)} (node {n.name}) multiplies a "
                                    "sharded activation by a weight that is not a model tensor")
        a.roles[n] = LinearRole(a.linears[n], "o" if n in a.out_projections else "ffn-out", "rowwise", site=module_path(n))
    tensors: dict[str, dict] = {}
    users: dict[str, str] = {}

    def place(target, entry, who):
        if target in tensors and tensors[target] != entry:
            raise PassNotApplicable(f"tensor-parallel(degree={degree}): tensor {target} is sharded as "
                                    f"{tensors[target]['placement']} for {users[target]} and as {entry['placement']} for {who}")
        tensors[target], users[target] = entry, who

    linears = []
    for n, p in a.linears.items():
        r = a.roles.get(n) or LinearRole(p, "other", "replicate", site=module_path(n))
        linears.append({"module": module_path(n), "node": n.name, "weight": p.weight, "bias": p.bias, "role": r.role,
                        "style": r.style, "segments": [list(s) for s in r.segments] if r.segments else None})
        if r.style == "replicate":
            continue
        dim = _placement(p, r.style)
        place(p.weight, {"placement": f"Shard({dim})", "dim": dim, "segments": linears[-1]["segments"]}, module_path(n))
        if p.bias and r.style != "rowwise":
            place(p.bias, {"placement": "Shard(0)", "dim": 0, "segments": linears[-1]["segments"]}, module_path(n))
    embeddings = []
    for n, style in a.embeddings.items():
        embeddings.append({"module": module_path(n), "weight": n.args[0].target, "style": style})
        if style == "vocab":
            place(n.args[0].target, {"placement": "Shard(0)", "dim": 0, "segments": None}, module_path(n))
    _check_readers(gm.graph, tensors, degree)
    total = per_rank = 0
    for target, t in program.named_tensors().items():
        total += t.numel() * t.element_size()
        per_rank += t.numel() * t.element_size() // (degree if target in tensors else 1)
    plan = {"degree": degree, "sequence_parallel": sequence_parallel, "linears": linears, "tensors": tensors,
            "embeddings": embeddings, "attention": a.attention, "collectives": result["collectives"],
            "weight_bytes": total, "weight_bytes_per_rank": per_rank}
    return plan, gm


def _check_readers(graph: fx.Graph, tensors: dict, degree: int) -> None:
    """A sharded tensor must be read only by the layers the plan shards it for (through transposes and casts)."""
    planned = (aten.linear.default, aten.addmm.default, aten.mm.default, aten.matmul.default, aten.embedding.default)
    for n in graph.nodes:
        if n.op != "get_attr" or n.target not in tensors:
            continue
        stack = list(n.users)
        while stack:
            u = stack.pop()
            if u.op == "call_function" and u.target in planned or u.target in COLLECTIVES:
                continue
            if u.op == "call_function" and u.target in (aten.t.default, aten.transpose.int, aten.permute.default) \
                    or u.op == "call_function" and is_pointwise(u) and len(u.all_input_nodes) == 1:
                stack.extend(u.users)
                continue
            raise PassNotApplicable(f"tensor-parallel(degree={degree}): tensor {n.target} is sharded "
                                    f"({tensors[n.target]['placement']}) but also read by {getattr(u.target, '__name__', u.target)} "
                                    f"in {module_path(u) or 'the top level'}")


def _divisible(program: Program, inputs, degree: int) -> bool:
    """Whether every symbolic non-batch dimension of the inputs is a multiple of degree (sequence parallel)."""
    import torch.utils._pytree as pytree

    flat = pytree.tree_leaves((inputs.args, inputs.kwargs))
    return all(t.shape[d] % degree == 0 for t, dims in zip(flat, program.dynamic_dims) for d in dims if d > 0)


@register_pass
@dataclasses.dataclass(frozen=True)
class TensorParallel(Pass):
    """Plan tensor parallelism over ``degree`` GPUs; checked here, applied by ``evo_rewrite.targets.parallel`` under torchrun."""

    name: ClassVar[str] = "tensor-parallel"
    exact: ClassVar[bool] = True
    placement: ClassVar[Placement] = Placement(last=True)
    summary: ClassVar[str] = ("plan Megatron-style tensor parallelism (column/row/vocabulary-parallel, heads per rank) "
                              "for torchrun; simulated against the unsharded program")
    degree: int = 0
    sequence_parallel: bool = False

    def __post_init__(self):
        if self.degree < 1:
            raise ValueError(f"degree must be given and >= 1 (e.g. tensor-parallel(degree=2)), got {self.degree}")

    def run(self, program: Program) -> PassResult:
        if self.degree == 1:
            return PassResult(program, 0, message="degree 1: nothing to shard")
        plan, _ = plan_rank(program, self.degree, self.sequence_parallel)
        styles = [lin["style"] for lin in plan["linears"]]
        sharded = sum(s != "replicate" for s in styles)
        skipped = [Skip("replicated: not part of an attention or FFN pair, nor the LM head"
                        if lin["role"] == "other" else "replicated: the vocabulary does not divide by the degree",
                        lin["module"], lin["node"]) for lin in plan["linears"] if lin["style"] == "replicate"]
        if not sharded:
            return PassResult(program, 0, skipped, message="no linear layer to shard")
        worst, checked = 0.0, []
        for inputs in (program.inputs, program.second_inputs()):
            if inputs is None or self.sequence_parallel and not _divisible(program, inputs, self.degree):
                continue
            ref = program(inputs)
            for out in simulate(program, self.degree, self.sequence_parallel, inputs):
                metrics, problem, dtype = compare_outputs(ref, out)
                rel = metrics.get("max_rel_error", 0.0)
                if problem or rel > tolerance(dtype):
                    raise RuntimeError(f"the simulated {self.degree}-rank program differs from the unsharded one on "
                                       f"{inputs.describe()}: {problem or f'max relative error {rel:.3g}'}")
                worst = max(worst, rel)
            checked.append(inputs.describe())
        program.annotations.tensor_parallel = TensorParallelPlan(plan)
        count = {s: styles.count(s) for s in ("colwise", "rowwise", "vocab", "replicate")}
        notes = {"degree": self.degree, "sequence parallel": str(self.sequence_parallel).lower(),
                 "linear layers": f"{count['colwise']} column-, {count['rowwise']} row-, {count['vocab']} vocabulary-"
                                  f"parallel, {count['replicate']} replicated",
                 "heads per rank": ", ".join(sorted({f"{a['heads_per_rank']}/{a['kv_heads_per_rank']} (q/kv)"
                                                     for a in plan["attention"]})) or "-",
                 "collectives per forward": ", ".join(f"{k} {v}" for k, v in plan["collectives"].items() if v),
                 "weight bytes per rank": plan["weight_bytes_per_rank"],
                 "simulated ranks vs unsharded": f"max rel error {worst:.2g} on {'; '.join(checked) or 'no input'}",
                 "run": f"torchrun --nproc-per-node {self.degree} -m evo_rewrite.targets.parallel OUT.pt2",
                 "plan": plan}
        return PassResult(program, sharded, skipped, notes)
