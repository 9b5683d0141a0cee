"""Program: the one IR every pass sees.

A Program is an unlifted ``torch.export`` graph module (weights are ``get_attr`` nodes named by
module path, every node carries ``nn_module_stack`` provenance, batch and sequence dimensions are
symbolic) together with the example inputs it was captured with and where it came from.
"""

from __future__ import annotations

import copy
import dataclasses
import warnings

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from .annotations import Annotations
from .inputs import InputGuard, Inputs, like

__all__ = ["Program", "SourceInfo", "StaticDim", "guard_calls"]


@dataclasses.dataclass
class SourceInfo:
    kind: str  # "pt2", "hf", "factory", "pickle", "module", "generated"
    path: str | None = None
    model_class: str | None = None
    hf_config: dict | None = None  # config.to_dict() of a Hugging Face source
    hf_class: str | None = None  # transformers class to rebuild an HF checkpoint with


@dataclasses.dataclass(frozen=True)
class StaticDim:
    """A dimension capture was asked to keep symbolic (batch, sequence) that torch.export fixed: which input,
    which dimension, the size it is fixed at, and why (the model code that fixed it, or the export failure)."""

    input: str
    dim: int
    size: int
    reason: str

    def describe(self) -> str:
        return f"{self.input} dimension {self.dim} is static at {self.size}: {self.reason}"


@dataclasses.dataclass
class Program:
    module: fx.GraphModule
    inputs: Inputs
    source: SourceInfo
    # per flattened input: {dim index: symbol name} of the dimensions that stayed symbolic
    dynamic_dims: list[dict[int, str]] = dataclasses.field(default_factory=list)
    # (lo, hi) value range of each symbol, from torch.export's range constraints (hi None = unbounded)
    symbol_ranges: dict[str, tuple[int, int | None]] = dataclasses.field(default_factory=dict)
    applied: list[str] = dataclasses.field(default_factory=list)  # pipeline text of applied passes
    # what passes leave for later stages (checkpoint regions, attention backends, tensor-parallel plan,
    # KV-cache layout, calibration, heal's data and teacher): see annotations.py
    annotations: Annotations = dataclasses.field(default_factory=Annotations)
    # torch.export's guard texts on the inputs (e.g. "L['x'].size()[1] <= 64"): data that InputGuard reads,
    # never executed
    guards: tuple[str, ...] = ()
    # dimensions capture was asked to keep symbolic that torch.export fixed, and why (the report lists them)
    static_dims: tuple[StaticDim, ...] = ()

    @property
    def graph(self) -> fx.Graph:
        return self.module.graph

    def __call__(self, *args, **kwargs):
        """Run the program without gradients: on an ``Inputs`` (default: its example inputs), or called like
        the original model, ``program(ids, mask)`` / ``program(**tokenizer(texts, return_tensors="pt"))``,
        with the call checked by :meth:`input_guard` (an InputError names a wrong input)."""
        if not kwargs and len(args) <= 1 and (not args or args[0] is None or isinstance(args[0], Inputs)):
            inputs = self.inputs if not args or args[0] is None else args[0]
        else:
            inputs = self.input_guard().bind(args, kwargs)
        with torch.no_grad():
            return self.module(*inputs.args, **inputs.kwargs)

    def input_guard(self) -> InputGuard:
        """What the program accepts when called: input names in the original's order, dtypes, ranks, sizes."""
        return InputGuard.from_program(self)

    def clone(self) -> "Program":
        """A copy with its own graph and module attributes; tensors are shared, not copied.

        Passes build new tensors rather than changing weights in place, so the program before a
        pass stays intact for verification and rollback without doubling memory. Annotations are
        copied shallowly (they are frozen; a pass replaces one rather than changing it).
        """
        new_gm = copy_graph_module(self.module)
        return dataclasses.replace(
            self, module=new_gm, applied=list(self.applied), annotations=self.annotations.copy(),
            dynamic_dims=[dict(d) for d in self.dynamic_dims],
        )

    def refresh_meta(self) -> bool:
        """Recompute every node's ``meta["val"]`` (shapes and dtypes) with the captured symbolic sizes.

        Passes that change shapes (fewer K/V heads) or insert nodes leave stale or missing metadata;
        the pass manager refreshes it after each pass so the next pass sees true shapes.
        """
        from torch._guards import detect_fake_mode
        from torch.fx.passes.fake_tensor_prop import FakeTensorProp

        vals = [n.meta.get("val") for n in self.placeholders()]
        mode = detect_fake_mode([v for v in vals if v is not None])
        if mode is None or any(v is None for v in vals):
            return False
        try:
            FakeTensorProp(self.module, mode).propagate_dont_convert_inputs(*vals)
        except Exception:  # noqa: BLE001 - some meta kernels reject symbolic sizes (Bloom's baddbmm): keep old meta
            return False
        return True

    def placeholders(self) -> list[fx.Node]:
        return [n for n in self.graph.nodes if n.op == "placeholder"]

    def second_inputs(self, seed: int = 1) -> Inputs | None:
        """Inputs of another batch and sequence size (every symbolic dimension changed).

        Returns None where the program has no symbolic dimension (nothing to vary).
        """
        if self.annotations.kv_cache is not None:  # a decoder: a decode step with a longer, padded past
            from .decoder import second_decoder_inputs

            return second_decoder_inputs(self)
        flat, spec = pytree.tree_flatten((self.inputs.args, self.inputs.kwargs))
        if not any(self.dynamic_dims):
            return None
        new_sizes: dict[str, int] = {}
        for leaf, dims in zip(flat, self.dynamic_dims):
            for d, sym in dims.items():
                if sym in new_sizes or not isinstance(leaf, torch.Tensor):
                    continue
                cur = leaf.shape[d]
                lo, hi = self.symbol_ranges.get(sym, (2, None))
                cands = [cur + 1, cur - 1, cur + 3, cur // 2 + 1] if d == 0 else [cur - 5, cur // 2 + 1, cur + 3, cur - 1, cur + 1]
                for c in cands:
                    if c != cur and c >= max(lo, 2) and (hi is None or c <= hi):
                        new_sizes[sym] = c
                        break
        new_flat = []
        for i, (leaf, dims) in enumerate(zip(flat, self.dynamic_dims)):
            if isinstance(leaf, torch.Tensor) and dims:
                shape = tuple(new_sizes.get(dims.get(d), s) if d in dims else s for d, s in enumerate(leaf.shape))
                new_flat.append(like(leaf, shape, seed=seed + i))
            else:
                new_flat.append(leaf)
        args, kwargs = pytree.tree_unflatten(new_flat, spec)
        return Inputs(tuple(args), dict(kwargs))

    def vocab_sizes(self) -> set[int]:
        """Rows of the embedding tables indexed directly by a user input (token ids): the vocabulary."""
        sizes = set()
        for n in self.graph.nodes:
            if n.op == "call_function" and n.target is torch.ops.aten.embedding.default:
                w, idx = n.args[0], n.args[1]
                if isinstance(idx, fx.Node) and idx.op == "placeholder" and isinstance(w, fx.Node):
                    val = w.meta.get("val")
                    if val is not None:
                        sizes.add(int(val.shape[0]))
        return sizes

    def named_tensors(self) -> dict[str, torch.Tensor]:
        """Every parameter and buffer the graph reads, by module path (get_attr target)."""
        out = {}
        for n in self.graph.nodes:
            if n.op == "get_attr":
                t = _get_attr(self.module, n.target)
                if isinstance(t, torch.Tensor):
                    out[n.target] = t
        return out

    def get_tensor(self, target: str) -> torch.Tensor:
        return _get_attr(self.module, target)

    def set_tensor(self, target: str, value: torch.Tensor, *, parameter: bool | None = None) -> None:
        """Bind a (new) tensor at a module path, creating intermediate modules as needed."""
        *parents, leaf = target.split(".")
        mod = self.module
        for p in parents:
            if not hasattr(mod, p):
                mod.add_module(p, torch.nn.Module())
            mod = getattr(mod, p)
        if parameter is None:
            parameter = isinstance(getattr(mod, leaf, None), torch.nn.Parameter) or value.is_floating_point()
        if leaf in mod._parameters:
            del mod._parameters[leaf]
        if leaf in mod._buffers:
            del mod._buffers[leaf]
        if parameter and value.is_floating_point():
            mod.register_parameter(leaf, torch.nn.Parameter(value))
        else:
            mod.register_buffer(leaf, value)


_GUARD_HOOK = "_evo_rewrite_input_guard"


def guard_calls(program: Program) -> Program:
    """Check every call of ``program.module`` with the program's :class:`InputGuard` (a forward pre-hook that
    binds positional and keyword inputs in the original's order, fills a Hugging Face program's omitted
    ``attention_mask`` / ``token_type_ids`` and raises InputError on a wrong dtype, rank or size).

    The pass manager installs it on the program a rewrite returns and the loader on a loaded ``.pt2``; clones
    (what passes see) do not carry it. Traced calls (torch.export re-exporting the module, fake tensors) and
    decoder programs (``generate`` builds their cache inputs) pass through unchecked.
    """
    gm = program.module
    if program.annotations.kv_cache is not None or getattr(gm, _GUARD_HOOK, None) is not None:
        return program

    guard = program.input_guard()  # built once: the program's inputs do not change after it is returned

    def check(module, args, kwargs):
        if _tracing(args, kwargs):
            return None
        bound = guard.bind(args, kwargs)
        return tuple(bound.args), dict(bound.kwargs)

    handle = gm.register_forward_pre_hook(check, with_kwargs=True)
    gm.__dict__[_GUARD_HOOK] = handle
    return program


def _tracing(args, kwargs) -> bool:
    from torch._subclasses.fake_tensor import FakeTensor

    if torch.compiler.is_compiling() or torch.compiler.is_exporting():
        return True
    return any(isinstance(t, FakeTensor) for t in pytree.tree_leaves((args, kwargs)))


def _get_attr(mod: torch.nn.Module, target: str):
    for part in target.split("."):
        mod = getattr(mod, part)
    return mod


def copy_graph_module(gm: fx.GraphModule) -> fx.GraphModule:
    """A new GraphModule with a deep-copied graph whose attributes are the same tensor objects."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # deepcopy of pytree specs warns in torch 2.13
        graph = copy.deepcopy(gm.graph)
    new_gm = fx.GraphModule(gm, graph, class_name=type(gm).__name__)
    for k, v in gm.__dict__.items():
        if k.startswith("_") and k not in new_gm.__dict__ and k != _GUARD_HOOK and \
                not isinstance(v, (torch.nn.Module, torch.Tensor)):
            new_gm.__dict__[k] = v
    for k in ("_in_spec", "_out_spec"):
        if hasattr(gm, k):
            setattr(new_gm, k, getattr(gm, k))
    new_gm.meta = dict(getattr(gm, "meta", {}))
    new_gm.recompile()
    return new_gm
