"""What each tensor-parallel rank holds, and the N ranks run in one process.

``simulate`` runs all N ranks' graphs in one process — a thread per rank, collectives exchanged in
memory — so the ``tensor-parallel`` pass checks its plan against the unsharded program before
anything is launched.
"""

from __future__ import annotations

import threading

import torch

from evo_rewrite.program import Program
from evo_rewrite.tensor_parallel import bind, local_shard

__all__ = ["simulate"]


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
