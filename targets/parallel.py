"""Run a rewritten model with tensor parallelism over N processes (torchrun; NCCL on GPUs, gloo on CPUs).

    evo-rewrite model/ --passes "flash,tensor-parallel(degree=2)" -o model.pt2
    torchrun --nproc-per-node 2 -m evo_rewrite.targets.parallel model.pt2 [more.pt2 ...] [--inputs SPEC] [--device cuda]
             [--check] [--repeat K]

The ``.pt2`` carries the plan the ``tensor-parallel`` pass derived and checked: the program's
``TensorParallelPlan`` annotation, restored when the file is loaded. On every rank this module
applies that plan to the loaded graph (``evo_rewrite.tensor_parallel.rank_graph``) and refuses to run
if it does not fit (a pass ran after ``tensor-parallel``, or the degree is not the number of
processes), places every tensor with
DTensor — ``distribute_tensor(weight, mesh, [Shard(0)])`` for column-parallel and
vocabulary-parallel weights, ``[Shard(1)]`` for row-parallel ones, ``[Replicate()]`` for the rest,
scattered from rank 0 — and runs the rank's graph on the
local shards (``DTensor.to_local()``), with ``torch.ops._c10d_functional`` collectives on the
mesh's process group. ``--check`` also runs the unsharded program on each rank and compares.

Why local graphs and not DTensor activations: the captured graph names concrete head counts in
its reshapes and has no ``nn.Linear`` modules for ``parallelize_module`` to wrap, and dispatching
every op of a forward pass through DTensor costs tens of microseconds of CPU per op. The rank's
graph is plain ATen plus functional collectives, so eager runs at single-GPU speed per op and
``torch.compile`` traces it; DTensor still owns the weights' placement (``ShardedProgram.dtensors``
are ordinary DTensors, e.g. for ``torch.distributed.checkpoint``).

Python::

    mesh = evo_rewrite.targets.parallel.init_mesh("cuda")
    sharded = evo_rewrite.targets.parallel.shard(program, mesh, plan=program.annotations.tensor_parallel)
    logits = sharded.module(input_ids=ids)["logits"]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

import torch
import torch.distributed as dist
import torch.fx as fx
import torch.utils._pytree as pytree
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

from evo_rewrite.annotations import TensorParallelPlan
from evo_rewrite.errors import RewriteError, UsageError
from evo_rewrite.inputs import Inputs
from evo_rewrite.program import Program
from evo_rewrite.tensor_parallel import bind, rank_graph, shard_dim_tensor

__all__ = ["ShardedProgram", "init_mesh", "shard", "read_plan", "broadcast_inputs", "retarget", "main"]


@dataclasses.dataclass
class ShardedProgram:
    module: fx.GraphModule  # this rank's program: call it like the original model
    plan: dict
    dtensors: dict[str, DTensor]  # every tensor the program reads, with its placement on the mesh

    def __call__(self, inputs: Inputs):
        with torch.no_grad():
            return self.module(*inputs.args, **inputs.kwargs)

    def local_bytes(self) -> int:
        return sum(t.to_local().numel() * t.element_size() for t in self.dtensors.values())


def init_mesh(device: str = "cuda") -> DeviceMesh:
    """A 1-D DeviceMesh over torchrun's processes (NCCL for cuda, gloo for cpu)."""
    if device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    world = int(os.environ.get("WORLD_SIZE", 1))
    return init_device_mesh(device, (world,), mesh_dim_names=("tp",))


def read_plan(program: Program) -> dict | None:
    """The tensor-parallel plan a program carries (restored from its .pt2), or None."""
    ann = program.annotations.tensor_parallel
    return ann.plan if ann is not None else None


def retarget(graph: fx.Graph, device: torch.device) -> None:
    """Point every device the graph names (``arange(..., device=cpu)``, ``to(device)``) at ``device``.

    A program captured or saved on one device creates tensors there; on another it must create them
    where its weights are.
    """
    def swap(a):
        return device if isinstance(a, torch.device) else a

    for n in graph.nodes:
        if n.op == "call_function":
            n.args, n.kwargs = fx.node.map_aggregate(n.args, swap), fx.node.map_aggregate(n.kwargs, swap)


def mesh_device(mesh: DeviceMesh) -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if mesh.device_type == "cuda" else torch.device("cpu")


def shard(program: Program, mesh: DeviceMesh, plan: dict | TensorParallelPlan | None = None) -> ShardedProgram:
    """This rank's program and its tensors placed on ``mesh`` (degree = mesh size).

    ``plan``: default the program's own ``TensorParallelPlan`` annotation (the ``tensor-parallel`` pass's);
    applied to the graph as it is, and an error when it does not fit.
    """
    degree, rank = mesh.size(), mesh.get_local_rank()
    plan = plan if plan is not None else program.annotations.tensor_parallel
    if plan is None:
        raise UsageError("the program holds no tensor-parallel plan: rewrite it with tensor-parallel(degree=N) last "
                         "in --passes and save it as .pt2")
    plan = plan.plan if isinstance(plan, TensorParallelPlan) else plan
    if plan["degree"] != degree:
        raise UsageError(f"the plan is for tensor-parallel degree {plan['degree']}, but {degree} processes run; "
                         f"launch with torchrun --nproc-per-node {plan['degree']}")
    gm = rank_graph(program, plan, rank, mesh.get_group().group_name)
    retarget(gm.graph, mesh_device(mesh))
    tensors, dtensors = {}, {}
    for n in gm.graph.nodes:
        if n.op != "get_attr" or n.target in tensors:
            continue
        full = program.get_tensor(n.target)
        if isinstance(full, torch.nn.Module):  # a higher-order op's body (autocast region): runs as it is
            if isinstance(full, fx.GraphModule):
                retarget(full.graph, mesh_device(mesh))
                full.recompile()
            tensors[n.target] = full
            continue
        full = full.detach()
        entry = plan["tensors"].get(n.target)
        placement = Shard(entry["dim"]) if entry else Replicate()
        src = shard_dim_tensor(full, entry, degree) if entry else full
        # weights come from rank 0 (every rank read the same file; this makes it so regardless)
        dt = distribute_tensor(src, mesh, [placement], src_data_rank=0 if full.is_floating_point() else None)
        dtensors[n.target], tensors[n.target] = dt, dt.to_local()
    return ShardedProgram(bind(gm.graph, tensors, program.module), plan, dtensors)


def broadcast_inputs(inputs: Inputs, device) -> Inputs:
    """Rank 0's inputs on every rank (on ``device``)."""
    flat, spec = pytree.tree_flatten((inputs.args, inputs.kwargs))
    out = []
    for t in flat:
        if isinstance(t, torch.Tensor):
            t = t.to(device).contiguous()
            dist.broadcast(t, src=0)
        out.append(t)
    args, kwargs = pytree.tree_unflatten(out, spec)
    return Inputs(tuple(args), dict(kwargs))


def _first_tensor(out) -> torch.Tensor:
    return next(t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor))


def run_one(path: str, mesh: DeviceMesh, args) -> tuple[list[str], int]:
    """Load, shard and run one .pt2 on this rank; the lines to print and the exit code."""
    from evo_rewrite.sources import load
    from evo_rewrite.verify import compare_outputs, tolerance

    rank = mesh.get_local_rank()
    program = load(path, inputs=args.inputs).program
    plan = read_plan(program) if program is not None else None
    if plan is None:
        raise UsageError(f"{path} holds no tensor-parallel plan: rewrite it with tensor-parallel(degree=N) last in "
                         "--passes and save it as .pt2")
    device = mesh_device(mesh)
    sharded = shard(program, mesh, plan)
    inputs = broadcast_inputs(program.inputs, device)
    out = sharded(inputs)
    lines = [f"{path} rank {rank}/{mesh.size()}: {sharded.local_bytes():,} weight bytes here "
             f"(unsharded {plan['weight_bytes']:,}); output {tuple(_first_tensor(out).shape)}"]
    if args.repeat:
        sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
        sharded(inputs)
        sync()
        t0 = time.perf_counter()
        for _ in range(args.repeat):
            sharded(inputs)
        sync()
        lines.append(f"{path} rank {rank}: {(time.perf_counter() - t0) / args.repeat * 1e3:.2f} ms per forward")
    if not args.check:
        return lines, 0
    program.module.to(device)
    retarget(program.graph, device)
    program.module.recompile()
    metrics, problem, dtype = compare_outputs(program(inputs), out)
    tol = tolerance(dtype)
    rel = metrics.get("max_rel_error", 0.0)
    ok = not problem and rel <= tol
    lines.append(f"{path} rank {rank}: sharded vs unsharded on {inputs.describe()}: "
                 f"{problem or f'max rel error {rel:.3g}'} (tolerance {tol:g}) {'ok' if ok else 'FAILED'}")
    return lines, 0 if ok else 4


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="torchrun --nproc-per-node N -m evo_rewrite.targets.parallel",
                                 description="Run .pt2 files rewritten with tensor-parallel(degree=N) on N processes.")
    ap.add_argument("models", nargs="+", help=".pt2 files written by evo-rewrite with tensor-parallel(degree=N) last "
                    "in their pipeline (run one after another)")
    ap.add_argument("--inputs", help="input spec as for evo-rewrite --inputs (default: each .pt2's example inputs)")
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--check", action="store_true", help="also run the unsharded program and compare outputs")
    ap.add_argument("--repeat", type=int, default=0, help="time this many forward passes after one warm-up")
    args = ap.parse_args(argv)
    mesh = init_mesh(args.device)
    code = 0
    try:
        for path in args.models:
            lines, rc = run_one(path, mesh, args)
            sys.stdout.write("\n".join(lines) + "\n")  # one write: ranks share the terminal
            sys.stdout.flush()
            code = code or rc
    except RewriteError as exc:
        if dist.get_rank() == 0:
            print(f"error: {exc}", file=sys.stderr, flush=True)
        code = exc.exit_code
    dist.destroy_process_group()
    return code


if __name__ == "__main__":
    sys.exit(main())
