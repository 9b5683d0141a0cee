"""Capture: a module and example inputs -> one Program (torch.export, symbolic batch and sequence).

Capture runs ``torch.export.export`` (non-strict) with ``Dim.AUTO`` on the batch dimension of every
tensor input and on the sequence dimension of rank-2 and rank-3 inputs, then unlifts the program so
weights are ``get_attr`` nodes named by module path. Where export fails, it retries on a
``torch.fx.symbolic_trace`` graph of the module, so passes still see the ATen dialect. When both
fail, the error names the innermost module and the source line that failed.

Where torch.export fixes a dimension capture asked to keep symbolic (a position table of fixed length
added without slicing, a reshape to a constant, a size-1 example dimension the model cannot take at
size 2), the program's ``static_dims`` say which input dimension, its size and why: the line of the
model's code at which export fixed it, read from torch's shape-environment log of a second export.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import logging
import os
import re
import traceback
import warnings

import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from torch.export import Dim

from .errors import CaptureError, quiet
from .inputs import Inputs
from .program import Program, SourceInfo, StaticDim
from .sources import is_hf_model

__all__ = ["capture", "program_from_exported", "default_dynamic_dims"]


def default_dynamic_dims(t) -> list[int]:
    """Batch (dim 0) of every tensor; sequence (dim 1) of rank-2 and rank-3 tensors."""
    if not isinstance(t, torch.Tensor) or t.dim() == 0:
        return []
    return [0, 1] if t.dim() in (2, 3) else [0]


def widen_size_one(leaves: list, dims: list) -> tuple[list, bool]:
    """torch.export specialises a dimension whose example size is 1 (its "0/1 specialization"): the
    leaves with every dynamic dimension (``dims[i]``: the dims of leaf ``i``) of size 1 duplicated to
    size 2, for export only; and whether any was. The program keeps the user's example as its inputs."""
    out, changed = [], False
    for t, ds in zip(leaves, dims):
        if isinstance(t, torch.Tensor):
            for d in ds or ():
                if d < t.dim() and t.shape[d] == 1:
                    t, changed = torch.cat([t, t], d), True
        out.append(t)
    return out, changed


# a dynamic dimension captured from a widened example still accepts size 1
AUTO_FROM_ONE = Dim.AUTO(min=1)


def _widened(inputs: Inputs, dims_of) -> Inputs | None:
    flat, spec = pytree.tree_flatten((inputs.args, inputs.kwargs))
    new, changed = widen_size_one(flat, [dims_of(t) for t in flat])
    if not changed:
        return None
    args, kwargs = pytree.tree_unflatten(new, spec)
    return Inputs(tuple(args), dict(kwargs))


def _dynamic_shapes(model, inputs: Inputs, dims_of=default_dynamic_dims, hint=Dim.AUTO):
    """torch.export's dynamic_shapes, keyed by forward's parameter names."""

    def spec(t):
        if not isinstance(t, torch.Tensor):
            return None
        return {d: hint for d in dims_of(t)} or None

    try:
        sig = inspect.signature(model.forward)
        bound = sig.bind(*inputs.args, **inputs.kwargs)
    except (TypeError, ValueError):
        return tuple(pytree.tree_map(spec, a) for a in inputs.args) if not inputs.kwargs else None
    out = {}
    for name, value in bound.arguments.items():
        kind = sig.parameters[name].kind
        if kind is inspect.Parameter.VAR_KEYWORD:
            out[name] = {k: pytree.tree_map(spec, v) for k, v in value.items()}
        elif kind is inspect.Parameter.VAR_POSITIONAL:
            out[name] = tuple(pytree.tree_map(spec, v) for v in value)
        else:
            out[name] = pytree.tree_map(spec, value)
    return out


def _prepare_hf(model) -> list:
    """Turn off what does not export in a plain forward (KV-cache outputs); return what to restore."""
    configs = {id(m.config): m.config for m in model.modules() if hasattr(m, "config")}
    for cfg in list(configs.values()):
        for k in ("text_config", "decoder", "encoder"):
            sub = getattr(cfg, k, None)
            if sub is not None and hasattr(sub, "to_dict"):
                configs[id(sub)] = sub
    restore = []
    for c in configs.values():
        if hasattr(c, "use_cache"):
            restore.append((c, "use_cache", c.use_cache))
            c.use_cache = False
    return restore


def _plain_out_spec(spec: pytree.TreeSpec) -> pytree.TreeSpec:
    """Replace pytree node types that need their defining package (HF ModelOutput) by dicts/tuples."""
    children = [_plain_out_spec(c) for c in spec.children()] if spec.num_children else []
    t = spec.type
    if t is None or t in (tuple, list, dict):
        return pytree.TreeSpec(t, spec.context, children) if children or t is not None else spec
    ctx = spec.context
    if isinstance(ctx, (list, tuple)) and all(isinstance(k, str) for k in ctx) and len(ctx) == len(children):
        return pytree.TreeSpec(dict, list(ctx), children)
    return pytree.TreeSpec(tuple, None, children)


_TORCH_DIR = os.path.dirname(torch.__file__) + os.sep


def _module_frame(exc: BaseException, model: torch.nn.Module) -> tuple[str | None, str | None]:
    """The innermost module (by path) in ``exc``'s traceback, and the innermost source line of the
    model's own code (a frame inside the model's call that is not in torch: the user's file:line,
    never torch's ``module.py`` call wrapper)."""
    names = {id(m): n for n, m in model.named_modules()}
    found_mod, found_line = None, None
    inside = False
    tb = exc.__traceback__
    frames = traceback.extract_tb(tb)
    i = 0
    while tb is not None:
        frame = tb.tb_frame
        self_obj = frame.f_locals.get("self")
        if self_obj is not None and id(self_obj) in names:
            found_mod = names[id(self_obj)] or "<root>"
            inside = True
        fs = frames[i]
        if inside and not fs.filename.startswith(_TORCH_DIR) and not fs.filename.startswith("<"):
            found_line = f"{fs.filename.rsplit(os.sep, 1)[-1]}:{fs.lineno}: {(fs.line or '').strip()}"
        tb = tb.tb_next
        i += 1
    return found_mod, found_line


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]


def program_from_exported(ep: torch.export.ExportedProgram, inputs: Inputs, source: SourceInfo,
                          guards: list[str] | None = None) -> Program:
    """The unlifted Program of ``ep``. ``guards``: export's guard texts on the inputs (default: ``ep``'s own);
    the Program keeps them as data for its InputGuard, which checks calls without executing them."""
    guards = list(getattr(ep, "_guards_code", None) or []) if guards is None else list(guards)
    gm = ep.module()
    pi = getattr(gm.graph._codegen, "pytree_info", None)
    if pi is not None and pi.out_spec is not None:
        plain = _plain_out_spec(pi.out_spec)
        gm.graph._codegen.pytree_info = pi._replace(out_spec=plain)
        gm._out_spec = plain
        gm.recompile()
    # export's generated guard function re-checks input shapes; its generated code fails on some
    # torch versions (2.11: a guard reading an input that is None), and every Program is verified and
    # re-exported (with fresh guards, which the written .pt2 keeps) before it is saved, so the in-memory
    # program drops it: its InputGuard (rewriter/inputs.py) checks calls instead, from the same range
    # constraints and guard texts, with messages that name the input and the allowed sizes
    for n in list(gm.graph.nodes):
        if n.op == "call_module" and n.target == "_guards_fn":
            gm.graph.erase_node(n)
    if hasattr(gm, "_guards_fn"):
        delattr(gm, "_guards_fn")
    # likewise export's input-constraint pre-hook (torch 2.11 attaches it to the unlifted module; its
    # copies never have it): it reads the placeholders' symbolic sizes, which a later shape propagation
    # on the same shape environment can pin to the example's sizes, and then rejects a valid batch
    gm._forward_pre_hooks.clear()
    gm._forward_pre_hooks_with_kwargs.clear()
    # export records each dtype conversion with an assert of the dtype it saw (``.to(x.dtype)`` at
    # capture time); the program is then refused under torch.autocast, where the same conversion sees
    # another dtype. The asserts compute nothing and every pass skips them, so the program drops them.
    # (in every graph: torch 2.11 exports an autocast region as a higher-order op whose body is a submodule)
    for sub in [m for m in gm.modules() if isinstance(m, torch.fx.GraphModule)]:
        dropped = [n for n in sub.graph.nodes if n.op == "call_function" and not n.users
                   and n.target is torch.ops.aten._assert_tensor_metadata.default]
        for n in dropped:
            sub.graph.erase_node(n)
        if dropped and sub is not gm:
            sub.recompile()
    gm.recompile()
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    dynamic_dims = []
    for n in placeholders:
        val = n.meta.get("val")
        dims = {}
        if isinstance(val, torch.Tensor):
            for d, s in enumerate(val.shape):
                if isinstance(s, torch.SymInt) and not s.node.is_nested_int() and s.node.expr.free_symbols:
                    dims[d] = str(s.node.expr)
        dynamic_dims.append(dims)
    ranges = {}
    for sym, vr in ep.range_constraints.items():
        try:
            hi = int(vr.upper) if vr.upper.is_finite else None
        except Exception:  # noqa: BLE001 - sympy infinity variants
            hi = None
        ranges[str(sym)] = (int(vr.lower), hi)
    return Program(module=gm, inputs=inputs, source=source, dynamic_dims=dynamic_dims, symbol_ranges=ranges,
                   guards=tuple(g for g in guards if isinstance(g, str)))


@dataclasses.dataclass
class _Exported:
    """One successful export: the program, what it was exported with, and why size-1 example dimensions stayed
    static (capture at a duplicated size failed), or None."""

    ep: torch.export.ExportedProgram
    args: tuple
    kwargs: dict
    dynamic_shapes: object
    size_one_failure: str | None = None


def _export(model, inputs: Inputs, dims_of, log=None) -> _Exported:
    wide = _widened(inputs, dims_of)
    failure = None
    if wide is not None:  # a size-1 batch or sequence: export at size 2 so it stays symbolic (and accepts 1)
        try:
            dyn = _dynamic_shapes(model, wide, dims_of, AUTO_FROM_ONE)
            with quiet(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ep = torch.export.export(model, wide.args, wide.kwargs, dynamic_shapes=dyn, strict=False)
            return _Exported(ep, wide.args, wide.kwargs, dyn)
        except Exception as exc:  # noqa: BLE001 - the model may really need size 1 there: capture it static
            failure = _first_line(exc)
            if log:
                log(f"capture at a duplicated size-1 dimension failed ({failure}); the size-1 dimensions "
                    "of the example stay static")
    dyn = _dynamic_shapes(model, inputs, dims_of)
    with quiet(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ep = torch.export.export(model, inputs.args, inputs.kwargs, dynamic_shapes=dyn, strict=False)
    return _Exported(ep, inputs.args, inputs.kwargs, dyn, failure)


def in_signature_order(model, inputs: Inputs) -> Inputs:
    """Keyword example inputs in the order of ``forward``'s parameters, so the program's positional order is
    the original's (a tokenizer's dict may list ``token_type_ids`` before ``attention_mask``)."""
    if len(inputs.kwargs) < 2:
        return inputs
    try:
        rank = {n: i for i, n in enumerate(inspect.signature(model.forward).parameters)}
    except (TypeError, ValueError):
        return inputs
    order = sorted(inputs.kwargs, key=lambda k: rank.get(k, len(rank)))  # stable: **kwargs extras keep theirs
    return Inputs(inputs.args, {k: inputs.kwargs[k] for k in order})


def capture(model: torch.nn.Module, inputs: Inputs, *, source: SourceInfo | None = None,
            dims_of=default_dynamic_dims, log=None) -> Program:
    """Capture ``model`` called with ``inputs`` as a Program with symbolic batch/sequence sizes."""
    source = source or SourceInfo(kind="module", model_class=type(model).__qualname__)
    was_training = model.training
    model.eval()
    restore = _prepare_hf(model) if is_hf_model(model) else []
    try:
        return _capture(model, inputs, source, dims_of, log)
    finally:  # the user's model leaves capture as it came (training flag, use_cache)
        for obj, attr, value in restore:
            setattr(obj, attr, value)
        model.train(was_training)


def _capture(model, inputs: Inputs, source: SourceInfo, dims_of, log) -> Program:
    inputs = in_signature_order(model, inputs)
    exporting = model
    try:
        exported = _export(model, inputs, dims_of, log)
    except (Exception, SystemExit) as exc:  # noqa: BLE001 - every capture failure becomes one clear message
        mod, line = _module_frame(exc, model)
        first = exc
        if isinstance(exc, SystemExit):
            raise CaptureError(f"cannot capture {type(model).__name__}: its forward called sys.exit({exc.code!r})"
                               + (f" in module '{mod}'" if mod else "") + (f" at {line}" if line else "")
                               + "; a model's forward must return its outputs") from None
        if log:
            log(f"torch.export failed ({_first_line(exc)}); retrying on a torch.fx.symbolic_trace graph")
        try:
            with quiet():
                traced = fx.symbolic_trace(model)
            exported = _export(traced, inputs, dims_of, log)
            exporting = traced
        except (Exception, SystemExit):  # noqa: BLE001
            where = f" in module '{mod}'" if mod else ""
            at = f" at {line}" if line else ""
            raise CaptureError(
                f"cannot capture {type(model).__name__}: torch.export failed{where}{at} with "
                f"{_first_line(first)}, and torch.fx.symbolic_trace could not trace it either. "
                "Data-dependent Python control flow, calls outside PyTorch (numpy, .item()/.tolist()) and "
                "in-place changes to inputs are the usual causes: rewrite that line with torch ops "
                "(torch.where, torch.cond), or pass example inputs (--inputs) that avoid the branch."
            ) from None
    program = program_from_exported(exported.ep, inputs, source)
    program.static_dims = _static_dims(program, exporting, exported, dims_of)
    if log:
        for sd in program.static_dims:
            log(f"static: {sd.describe()}")
    return program


# ---- dimensions export fixed -------------------------------------------------------------------------

def _leaf_names(program: Program) -> list[tuple[str, torch.Tensor | None]]:
    """(name, example leaf) of every flattened input: ``input_ids``, ``past_key_values[0][1]``."""
    try:
        names = list(program.module.graph._codegen.pytree_info.orig_args)
    except AttributeError:
        names = []
    ex = program.inputs
    out = []
    for path, leaf in pytree.tree_flatten_with_path((ex.args, ex.kwargs))[0]:
        top, key = path[0].idx, path[1]
        name = (names[key.idx] if key.idx < len(names) else f"arg{key.idx}") if top == 0 else str(key.key)
        out.append((name + pytree.keystr(path[2:]), leaf if isinstance(leaf, torch.Tensor) else None))
    return out


def _static_dims(program: Program, model, exported: _Exported, dims_of) -> tuple[StaticDim, ...]:
    """The dimensions capture asked to keep symbolic that the program has static, each with its reason."""
    wanted = []
    for (name, leaf), dyn in zip(_leaf_names(program), program.dynamic_dims):
        if leaf is not None:
            wanted += [(name, d, int(leaf.shape[d])) for d in dims_of(leaf) if d < leaf.dim() and d not in dyn]
    if not wanted:
        return ()
    fixed_by = _why_static(model, exported) if any(size != 1 for _, _, size in wanted) or \
        exported.size_one_failure is None else {}
    out = []
    for name, d, size in wanted:
        if size == 1 and exported.size_one_failure:
            reason = (f"the example's size there is 1 and capture at size 2 failed ({exported.size_one_failure}); "
                      "give an example of size 2 or more there to keep it symbolic")
        elif (name, d) in fixed_by:
            reason = f"the model's code fixes it, at {fixed_by[name, d]}"
        else:
            reason = "torch.export fixed it while tracing the model (a size the model's code depends on)"
        out.append(StaticDim(name, d, size, reason))
    return tuple(out)


_SOURCE = re.compile(r"create_symbol (\S+) = \S+ for L\['([^']+)'\]((?:\[[^\]]*\])*)\.size\(\)\[(\d+)\]")
_FIXED = re.compile(r"set_replacement (\S+) = (-?\d+) ")
_STDLIB = os.path.dirname(os.__file__) + os.sep
_HERE = os.path.dirname(os.path.abspath(__file__)) + os.sep


class _SpecialisationLog(logging.Handler):
    """Listens to torch's shape environment during one export: which input dimension each symbol stands for, and
    for a symbol set to a constant, the innermost line of the model's code at that moment."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.sources: dict[str, tuple[str, int]] = {}
        self.fixed: dict[str, str] = {}

    def emit(self, record: logging.LogRecord) -> None:
        msg = record.getMessage()
        m = _SOURCE.match(msg)
        if m:
            sym, name, rest, d = m.groups()
            self.sources[sym] = (name + rest, int(d))
            return
        m = _FIXED.match(msg)
        if m and m.group(1) not in self.fixed:
            self.fixed[m.group(1)] = _model_line() or f"a guard torch.export added ({m.group(1)} = {m.group(2)})"

    def reasons(self) -> dict[tuple[str, int], str]:
        return {self.sources[s]: where for s, where in self.fixed.items() if s in self.sources}

    @contextlib.contextmanager
    def listening(self):
        """Hear INFO records of torch's symbolic-shapes logger, and nothing else (every other handler muted)."""
        lg = logging.getLogger("torch.fx.experimental.symbolic_shapes")
        loggers = [logging.root] + [x for x in logging.root.manager.loggerDict.values()
                                    if isinstance(x, logging.Logger)]
        muted = [(h, h.level) for x in loggers for h in x.handlers]
        if logging.lastResort is not None:
            muted.append((logging.lastResort, logging.lastResort.level))
        disabled, level = logging.root.manager.disable, lg.level
        for h, _ in muted:
            h.setLevel(logging.CRITICAL + 1)
        logging.disable(logging.NOTSET)
        lg.setLevel(logging.INFO)
        lg.addHandler(self)
        try:
            yield self
        finally:
            lg.removeHandler(self)
            lg.setLevel(level)
            logging.disable(disabled)
            for h, lvl in muted:
                h.setLevel(lvl)


def _model_line() -> str | None:
    """``file.py:123: code`` of the innermost frame of the model's code (inside the export of ``_why_static``,
    outside torch, the standard library and evo-rewrite)."""
    stack = traceback.extract_stack()
    start = max((i for i, fs in enumerate(stack) if fs.name == "_why_static" and fs.filename.startswith(_HERE)),
                default=len(stack))
    for fs in reversed(stack[start + 1:]):
        f = fs.filename
        stdlib = f.startswith(_STDLIB) and not any(p in f for p in ("site-packages", "dist-packages"))
        if stdlib or f.startswith((_TORCH_DIR, _HERE, "<")):
            continue
        return f"{f.rsplit(os.sep, 1)[-1]}:{fs.lineno}: {(fs.line or '').strip()}"
    return None


def _why_static(model, exported: _Exported) -> dict[tuple[str, int], str]:
    """Export once more, listening to the shape environment: {(input, dim): the model line that fixed it}."""
    rec = _SpecialisationLog()
    try:
        with quiet(), rec.listening(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.export.export(model, exported.args, exported.kwargs, dynamic_shapes=exported.dynamic_shapes,
                                strict=False)
    except Exception:  # noqa: BLE001 - it exported once; a reason is a courtesy, never a failure
        pass
    return rec.reasons()
