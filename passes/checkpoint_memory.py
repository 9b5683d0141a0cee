"""Saved activations: the bytes a program keeps for backward, by node, at a given input size.

The program runs once on fake tensors (``FakeTensorMode``: shapes and dtypes, no data, no memory)
with autograd on, through an ``fx.Interpreter``, under ``torch.autograd.graph.saved_tensors_hooks``:
every tensor autograd saves for backward is recorded with the node that saved it and its storage
(views of one storage count once). Weights are left out (they are held anyway); outputs are counted
(the caller holds them until backward). It is the same autograd on the same ops as a real training
step, so the record is what a real step saves, tensor for tensor.

With a set of checkpoint regions, what the members of a region save is replaced by the activations
the region reads, which non-reentrant checkpointing keeps to recompute it::

    prof = profile(program, inputs_at(program, batch=4, seq=2048))
    prof.bytes()                         # nothing checkpointed
    prof.bytes(find_regions(g, ["h.0"]))  # h.0 recomputed in backward
    prof.bytes(regions, selective={"h.0"})  # h.0 keeps its matmul and attention outputs

A ``selective`` region holds, besides its inputs, the outputs of the members the policy keeps
(``regions.keeps_output``: matmuls, attention, the fused loss).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.multiprocessing.reductions import StorageWeakRef

from evo_rewrite.inputs import Inputs, like
from evo_rewrite.program import Program

from evo_rewrite.regions import Region, keeps_output

__all__ = ["ActivationProfile", "profile", "inputs_at", "format_bytes", "parse_bytes"]


@dataclasses.dataclass
class ActivationProfile:
    at: str  # the inputs it was measured for, e.g. "input_ids:int64[4, 2048]"
    sizes: dict[StorageWeakRef, int]  # storage -> bytes
    saved: dict[fx.Node, set[StorageWeakRef]]  # node -> storages autograd saved while it ran
    values: dict[fx.Node, set[StorageWeakRef]]  # node -> storages of the activations it produced
    outputs: set[StorageWeakRef]

    def bytes(self, regions: list[Region] | tuple[Region, ...] = (), selective=frozenset()) -> int:
        """Activation bytes held for backward when ``regions`` run under checkpointing (the paths in
        ``selective`` with the selective policy, the others recomputed whole)."""
        inside = {m for r in regions for m in r.members}
        keep = set(self.outputs)
        for n, keys in self.saved.items():
            if n not in inside:
                keep |= keys
        for r in regions:
            for a in r.inputs:
                keep |= self.values.get(a, set())
            if r.path in selective:
                for m in r.members:
                    if keeps_output(m):
                        keep |= self.values.get(m, set())
        return sum(self.sizes[k] for k in keep)


def _key(t: torch.Tensor) -> StorageWeakRef:
    return StorageWeakRef(t.untyped_storage())


def profile(program: Program, inputs: Inputs | None = None) -> ActivationProfile:
    """Record what every node of ``program`` saves for backward on ``inputs`` (default: its example inputs)."""
    inputs = inputs or program.inputs
    mode = FakeTensorMode()
    fakes: dict[int, torch.Tensor] = {}
    weights: set[StorageWeakRef] = set()

    def fake(t: torch.Tensor) -> torch.Tensor:
        if id(t) not in fakes:
            f = mode.from_tensor(t).detach()
            if isinstance(t, torch.nn.Parameter) and t.requires_grad and t.is_floating_point():
                f.requires_grad_(True)
            fakes[id(t)] = f
        return fakes[id(t)]

    class Recorder(fx.Interpreter):
        node: fx.Node | None = None

        def fetch_attr(self, target):
            t = super().fetch_attr(target)
            if isinstance(t, torch.Tensor):
                t = fake(t)
                weights.add(_key(t))
            return t

        def run_node(self, n):
            self.node = n
            out = super().run_node(n)
            if n.op != "get_attr":
                values[n] = {_key(t) for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)}
                for t in pytree.tree_leaves(out):
                    if isinstance(t, torch.Tensor):
                        sizes.setdefault(_key(t), t.untyped_storage().nbytes())
            return out

    sizes: dict[StorageWeakRef, int] = {}
    saved: dict[fx.Node, set[StorageWeakRef]] = {}
    values: dict[fx.Node, set[StorageWeakRef]] = {}
    held = []  # keeps every saved tensor alive, so no storage is freed and its key reused

    rec = Recorder(program.module, garbage_collect_values=False)

    def pack(t: torch.Tensor):
        held.append(t)
        k = _key(t)
        sizes.setdefault(k, t.untyped_storage().nbytes())
        saved.setdefault(rec.node, set()).add(k)
        return t

    flat = [fake(t) if isinstance(t, torch.Tensor) else t for t in inputs.flat()]
    with mode, torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = rec.run(*flat, enable_io_processing=False)
    outputs = {_key(t) for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)} - weights
    saved = {n: keys - weights for n, keys in saved.items()}
    return ActivationProfile(inputs.describe(), sizes, saved, values, outputs)


def inputs_at(program: Program, batch: int | None = None, seq: int | None = None) -> Inputs:
    """The example inputs with the batch and/or sequence size changed (every input that shares the symbol).

    The batch symbol is dimension 0 of the first input whose batch is symbolic; the sequence symbol
    is dimension 1 of the first rank-2/3 input whose dimension 1 is symbolic. Raises ValueError
    when the asked-for dimension is static.
    """
    flat, spec = pytree.tree_flatten((program.inputs.args, program.inputs.kwargs))
    dims = program.dynamic_dims + [{}] * (len(flat) - len(program.dynamic_dims))
    want: dict[str, int] = {}
    for size, d, what in ((batch, 0, "batch (dimension 0)"), (seq, 1, "sequence (dimension 1)")):
        if size is None:
            continue
        sym = next((dd[d] for t, dd in zip(flat, dims) if isinstance(t, torch.Tensor) and d in dd), None)
        if sym is None:
            raise ValueError(f"the program's {what} is static ({program.inputs.describe()}); it cannot be resized")
        lo, hi = program.symbol_ranges.get(sym, (0, None))
        if size < lo or (hi is not None and size > hi):
            raise ValueError(f"{what} {size} is outside the range the program was captured for: [{lo}, {hi}]")
        want[sym] = size
    new = []
    for i, (t, dd) in enumerate(zip(flat, dims)):
        if isinstance(t, torch.Tensor) and any(s in want for s in dd.values()):
            shape = tuple(want.get(dd.get(d), s) for d, s in enumerate(t.shape))
            t = like(t, shape, seed=i)
        new.append(t)
    args, kwargs = pytree.tree_unflatten(new, spec)
    return Inputs(tuple(args), dict(kwargs))


_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(text: str) -> int:
    """``3e9``, ``512MB``, ``2GB``, ``1.5GiB`` -> bytes (KB/MB/GB are powers of 1000). Raises ValueError."""
    s = str(text).strip().lower().replace(" ", "").replace("_", "")
    num = s.rstrip("kmgtib")
    unit = s[len(num):]
    if unit not in _UNITS:
        raise ValueError(f"unknown unit {unit!r}")
    value = float(num) * _UNITS[unit]
    if not 0 < value < float("inf"):
        raise ValueError("must be a positive, finite size")
    return int(value)


def format_bytes(n: float) -> str:
    for unit, scale in (("GB", 10**9), ("MB", 10**6), ("KB", 10**3)):
        if abs(n) >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{int(n)} B"
