"""What each tensor-parallel rank holds, and the N ranks run in one process.

``shard_dim_tensor`` / ``local_shard`` cut a tensor as the plan says (``targets/parallel.py`` does the
same with DTensor placements); ``bind`` makes a runnable module of a rank's graph and tensors;
``simulate`` runs all N ranks' graphs in one process — a thread per rank, collectives exchanged in
memory — so the ``tensor-parallel`` pass checks its plan against the unsharded program before
anything is launched.
"""

from __future__ import annotations

import threading

import torch
import torch.fx as fx

from evo_rewrite.program import Program

__all__ = ["shard_dim_tensor", "local_shard", "bind", "simulate"]


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


# -- single-process simulation of the N ranks --------------------------------------------------------

class _SimGroup:
    """N threads, one per rank, exchanging tensors at each collective."""

    def __init__(self, n: int):
        self.n, self.slots = n, [None] * n
        self.barrier = threading.Barrier(n, timeout=600)

    def exchange(self, x: torch.Tensor) -> list[torch.Tensor]:
        self.slots[_local.rank] = x
        self.barrier.wait()
        xs = list(self.slots)
        self.barrier.wait()
        return xs


_local = threading.local()
_GROUPS: dict[str, _SimGroup] = {}


def _sim_all_reduce(x, op, group):
    return torch.stack(_GROUPS[group].exchange(x)).sum(0)


def _sim_all_gather(x, size, group):
    return torch.cat(_GROUPS[group].exchange(x), 0)


def _sim_reduce_scatter(x, op, size, group):
    return torch.stack(_GROUPS[group].exchange(x)).sum(0).chunk(size, 0)[_local.rank].clone()


def _sim_wait(x):
    return x


_SIM = {torch.ops._c10d_functional.all_reduce.default: _sim_all_reduce,
        torch.ops._c10d_functional.all_gather_into_tensor.default: _sim_all_gather,
        torch.ops._c10d_functional.reduce_scatter_tensor.default: _sim_reduce_scatter,
        torch.ops._c10d_functional.wait_tensor.default: _sim_wait}


def simulate(program: Program, degree: int, sequence_parallel: bool, inputs) -> list:
    """Run the N ranks' graphs in one process (one thread each, collectives in memory); their outputs."""
    group = f"tp-sim-{id(program)}"
    _GROUPS[group] = _SimGroup(degree)
    modules = []
    from .tensor_parallel import plan_rank

    for r in range(degree):
        plan, gm = plan_rank(program, degree, sequence_parallel, r, group)
        for n in gm.graph.nodes:
            if n.op == "call_function" and n.target in _SIM:
                n.target = _SIM[n.target]
        tensors = {n.target: local_shard(program.get_tensor(n.target), plan["tensors"].get(n.target), degree, r)
                   for n in gm.graph.nodes if n.op == "get_attr"}
        modules.append(bind(gm.graph, tensors, program.module))
    outs, errors = [None] * degree, []

    def work(r):
        _local.rank = r
        try:
            with torch.no_grad():
                outs[r] = modules[r](*inputs.args, **inputs.kwargs)
        except threading.BrokenBarrierError:
            pass
        except Exception as exc:  # noqa: BLE001 - re-raised in the caller
            errors.append(exc)
            _GROUPS[group].barrier.abort()

    threads = [threading.Thread(target=work, args=(r,)) for r in range(degree)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        del _GROUPS[group]
    if errors:
        raise errors[0]
    return outs
