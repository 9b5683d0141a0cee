"""Example inputs: parsing `--inputs` text, deriving inputs, and making a second input of another size.

A spec is a comma-separated list of ``name:dtype[d0,d1,...]`` items, each optionally followed by
``@lo..hi`` (integer value range, ``hi`` exclusive), e.g.::

    input_ids:int64[2,16]@0..50257,attention_mask:int64[2,16]

Tensors are passed to the model's ``forward`` as keyword arguments named by ``name``.

:class:`InputGuard` is the other side: what a captured program accepts when it is called (names in
the original forward's order, dtype, rank and the allowed size of every dimension), checked before
the graph runs so that a wrong input fails with one line naming it (:class:`InputError`).
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from typing import Any

import torch
import torch.utils._pytree as pytree

from .errors import UsageError

__all__ = ["Inputs", "TensorSpec", "parse_input_spec", "make_inputs", "max_input_bytes", "MAX_INPUT_BYTES_ENV",
           "InputError", "InputGuard", "HF_DEFAULTS"]

MAX_INPUT_BYTES_ENV = "EVO_REWRITE_MAX_INPUT_BYTES"
DEFAULT_MAX_INPUT_BYTES = 2 << 30  # 2 GiB of example inputs in all


def max_input_bytes() -> int:
    """The most bytes ``--inputs`` may ask for (``EVO_REWRITE_MAX_INPUT_BYTES``, default 2 GiB)."""
    text = os.environ.get(MAX_INPUT_BYTES_ENV, "").strip()
    if not text:
        return DEFAULT_MAX_INPUT_BYTES
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value <= 0:
        raise UsageError(f"{MAX_INPUT_BYTES_ENV}={text!r}: give a positive number of bytes, e.g. {DEFAULT_MAX_INPUT_BYTES}")
    return value


def _human(n: int) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if n < 1024 or unit == "PiB":
            return f"{n:,} {unit}" if unit == "bytes" else f"{n:,.1f} {unit}"
        n /= 1024
    return str(n)

_DTYPES = {
    "int64": torch.int64, "long": torch.int64, "int32": torch.int32, "int": torch.int32,
    "bool": torch.bool, "float32": torch.float32, "float": torch.float32, "fp32": torch.float32,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float64": torch.float64,
}
_ITEM = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*)\s*:\s*([a-z0-9]+)\s*\[([0-9,\s]*)\]\s*(?:@\s*(-?\d+)\s*\.\.\s*(-?\d+))?\s*$")


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    low: int | None = None
    high: int | None = None


@dataclasses.dataclass
class Inputs:
    """Positional and keyword example inputs of a model's forward."""

    args: tuple = ()
    kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)

    def flat(self) -> list[Any]:
        return pytree.tree_leaves((self.args, self.kwargs))

    def map_tensors(self, fn) -> "Inputs":
        args, kwargs = pytree.tree_map_only(torch.Tensor, fn, (self.args, self.kwargs))
        return Inputs(tuple(args), dict(kwargs))

    def to(self, device) -> "Inputs":
        return self.map_tensors(lambda t: t.to(device))

    def describe(self) -> str:
        parts = []
        flat, _ = pytree.tree_flatten_with_path((self.args, self.kwargs))
        for path, leaf in flat:
            top = path[0].idx if hasattr(path[0], "idx") else 0
            rest = pytree.keystr(path[1:]).strip("[]'\"")
            name = (f"arg{rest}" if top == 0 else rest) or "input"
            if isinstance(leaf, torch.Tensor):
                parts.append(f"{name}:{str(leaf.dtype).replace('torch.', '')}{list(leaf.shape)}")
        return ", ".join(parts)


def _split_top(text: str) -> list[str]:
    """Split at commas that are not inside brackets."""
    out, depth, cur = [], 0, []
    for ch in text:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        if ch == "," and depth == 0:
            out.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    if "".join(cur).strip():
        out.append("".join(cur))
    return out


def parse_input_spec(text: str) -> list[TensorSpec]:
    """Parse ``name:dtype[d0,d1]@lo..hi, ...``; raise UsageError naming the bad item."""
    specs = []
    for item in _split_top(text):
        m = _ITEM.match(item)
        if not m:
            raise UsageError(
                f"--inputs: cannot parse {item.strip()!r}. Write name:dtype[d0,d1,...] with an optional "
                "@lo..hi integer range, e.g. input_ids:int64[2,16]@0..50257"
            )
        name, dtype_s, dims_s, lo, hi = m.groups()
        if dtype_s not in _DTYPES:
            raise UsageError(f"--inputs: unknown dtype {dtype_s!r} for {name!r}; use one of {', '.join(sorted(_DTYPES))}")
        dims = tuple(int(d) for d in dims_s.split(",") if d.strip())
        if any(d <= 0 for d in dims):
            raise UsageError(f"--inputs: {name!r} has a non-positive dimension in {list(dims)}")
        if lo is not None and int(hi) <= int(lo):
            raise UsageError(f"--inputs: {name!r} has an empty value range {lo}..{hi}")
        dtype = _DTYPES[dtype_s]
        if lo is not None:
            if dtype.is_floating_point or dtype == torch.bool:
                raise UsageError(f"--inputs: {name!r} is {dtype_s}; a value range @lo..hi applies only to integer inputs")
            info = torch.iinfo(dtype)
            if int(lo) < info.min or int(hi) - 1 > info.max:
                raise UsageError(f"--inputs: {name!r} range {lo}..{hi} does not fit {dtype_s} ({info.min}..{info.max + 1}); "
                                 "give a smaller range or a wider dtype")
        if any(n.name == name for n in specs):
            raise UsageError(f"--inputs: {name!r} is given twice")
        specs.append(TensorSpec(name, dtype, dims, None if lo is None else int(lo), None if hi is None else int(hi)))
    if not specs:
        raise UsageError("--inputs is empty; give at least one name:dtype[dims] item")
    limit = max_input_bytes()
    total = sum(math.prod(s.shape) * s.dtype.itemsize for s in specs)
    if total > limit:
        sizes = ", ".join(f"{s.name} {_human(math.prod(s.shape) * s.dtype.itemsize)}" for s in specs)
        raise UsageError(f"--inputs asks for {_human(total)} of example tensors ({sizes}), above the limit of "
                         f"{_human(limit)}; example inputs need only a small batch and sequence (e.g. [2,16]). "
                         f"Raise the limit with {MAX_INPUT_BYTES_ENV}=BYTES if you mean it")
    return specs


def _random_tensor(dtype, shape, low=None, high=None, generator=None, name: str = "") -> torch.Tensor:
    if dtype == torch.bool:
        return torch.ones(shape, dtype=torch.bool)
    if dtype.is_floating_point:
        return torch.randn(shape, generator=generator).to(dtype)
    if "mask" in name and low is None:
        return torch.ones(shape, dtype=dtype)
    low = 0 if low is None else low
    high = 2 if high is None else high
    return torch.randint(low, high, shape, generator=generator, dtype=dtype)


def make_inputs(specs: list[TensorSpec], *, default_high: int | None = None, seed: int = 0) -> Inputs:
    g = torch.Generator().manual_seed(seed)
    kwargs = {}
    for s in specs:
        high = s.high if s.high is not None else default_high
        kwargs[s.name] = _random_tensor(s.dtype, s.shape, s.low, high, g, s.name)
    return Inputs((), kwargs)


def like(example: torch.Tensor, shape: tuple[int, ...], *, seed: int, pad_last_row: bool = True) -> torch.Tensor:
    """A new tensor of ``shape`` with the example's dtype and value statistics.

    Integer tensors holding only 0/1 are treated as masks: all ones, with the last row padded at
    its tail, so padding paths are exercised. Other integer tensors are drawn in the example's
    [min, max] range; where the example mixes negative values with non-negative ones (labels with
    -100 = ignored), the negatives are a sentinel: the rest is drawn in the non-negative range and
    the sentinel placed at the example's rate. Floating tensors get its mean and std.
    """
    g = torch.Generator().manual_seed(seed)
    dev = example.device
    if example.dtype == torch.bool or (not example.dtype.is_floating_point and example.numel() and
                                        int(example.min()) >= 0 and int(example.max()) <= 1):
        out = torch.ones(shape, dtype=example.dtype)
        if pad_last_row and len(shape) == 2 and shape[1] > 2:
            out[-1, -(shape[1] // 4 or 1):] = 0
        return out.to(dev)
    if not example.dtype.is_floating_point:
        ex = example.detach().cpu()
        neg = ex[ex < 0]
        if neg.numel() and neg.numel() < ex.numel():  # ids with a negative sentinel (labels' -100 = ignore)
            sentinel = int(neg.mode().values)
            ex = ex[ex >= 0]
            out = torch.randint(int(ex.min()), int(ex.max()) + 1, shape, generator=g, dtype=example.dtype)
            hit = torch.rand(shape, generator=g) < neg.numel() / example.numel()
            return out.masked_fill(hit, sentinel).to(dev)
        lo = int(ex.min()) if ex.numel() else 0
        hi = int(ex.max()) + 1 if ex.numel() else 2
        return torch.randint(lo, max(hi, lo + 1), shape, generator=g, dtype=example.dtype).to(dev)
    ex = example.detach().float()
    mean = float(ex.mean()) if ex.numel() else 0.0
    std = float(ex.std()) if ex.numel() > 1 else 1.0
    return (torch.randn(shape, generator=g) * std + mean).to(example.dtype).to(dev)


# ---- calling a captured program ---------------------------------------------------------------------

class InputError(UsageError):
    """A captured program was called with inputs it cannot take: the message names the input, the
    dimension, the size given and the sizes allowed (exit code 2, like every usage error)."""


# Hugging Face models fill these when the caller leaves them out (a mask of ones, segment 0); a program
# captured with them does the same, so ``program(input_ids)`` works like ``model(input_ids)``
HF_DEFAULTS = {"attention_mask": 1, "token_type_ids": 0}

# the guards torch.export writes that name one input dimension: ``L['x'].size()[1] <= 64``,
# ``L['a'].size()[0] == L['b'].size()[0]`` (anything else is left to the graph; nothing is executed)
_REF = r"L\['([A-Za-z_][A-Za-z0-9_]*)'\]\.size\(\)\[(\d+)\]"
_GUARD = re.compile(rf"^\s*{_REF}\s*(==|!=|<=|>=|<|>)\s*(?:(-?\d+)|{_REF})\s*$")
_OPS = {"==": lambda a, b: a == b, "!=": lambda a, b: a != b, "<=": lambda a, b: a <= b,
        ">=": lambda a, b: a >= b, "<": lambda a, b: a < b, ">": lambda a, b: a > b}


@dataclasses.dataclass(frozen=True)
class _Leaf:
    """One tensor a program takes: where it sits under its input name, its dtype, its sizes (int: static;
    str: a symbol of torch.export's range constraints)."""

    where: str  # "" for the input itself, "[0][1]" inside a list
    dtype: torch.dtype
    dims: tuple[int | str, ...]


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


@dataclasses.dataclass(frozen=True)
class InputGuard:
    """What a captured program accepts, and the binding of a call to it.

    ``names`` are the program's inputs in the original forward's order (a call may give them by position
    in that order, by keyword, or both); the first ``n_args`` are passed to the graph positionally, the
    rest as keywords, as it was captured. ``ranges`` are torch.export's range constraints; ``guards`` the
    simple dimension guards it wrote (``L['x'].size()[1] <= 64``), read as data, never executed.
    ``defaults`` are inputs filled when left out (Hugging Face programs: :data:`HF_DEFAULTS`).
    """

    names: tuple[str, ...]
    n_args: int
    leaves: dict[str, tuple[_Leaf, ...]]
    specs: dict[str, pytree.TreeSpec]
    ranges: dict[str, tuple[int, int | None]]
    guards: tuple[tuple, ...] = ()
    defaults: dict[str, int] = dataclasses.field(default_factory=dict)

    @classmethod
    def from_program(cls, program) -> "InputGuard":
        ex = program.inputs
        try:
            names = list(program.module.graph._codegen.pytree_info.orig_args)
        except AttributeError:
            names = [f"arg{i}" for i in range(len(ex.args))] + list(ex.kwargs)
        values = dict(zip(names, ex.args)) | dict(ex.kwargs)
        names = [n for n in names if n in values]
        flat_dims = iter(program.dynamic_dims)
        leaves, specs = {}, {}
        for name in [*names[: len(ex.args)], *ex.kwargs]:  # the flattening order of (args, kwargs)
            flat, specs[name] = pytree.tree_flatten_with_path(values[name])
            out = []
            for path, leaf in flat:
                dyn = next(flat_dims, {})
                if isinstance(leaf, torch.Tensor):
                    dims = tuple(dyn.get(d, int(s)) for d, s in enumerate(leaf.shape))
                    out.append(_Leaf(pytree.keystr(path), leaf.dtype, dims))
                else:
                    out.append(None)
            leaves[name] = tuple(out)
        guards = tuple(g for g in (_parse_guard(t) for t in getattr(program, "guards", ())) if g is not None)
        hf = program.source.hf_config is not None
        defaults = {n: v for n, v in HF_DEFAULTS.items() if hf and n in values and "input_ids" in values}
        return cls(tuple(names), len(ex.args), leaves, specs, dict(program.symbol_ranges), guards, defaults)

    # ---- binding ---------------------------------------------------------------------------------

    def bind(self, args: tuple = (), kwargs: dict | None = None) -> Inputs:
        """The call's inputs in the structure the program was captured with; InputError when they do not fit."""
        kwargs = dict(kwargs or {})
        takes = ", ".join(self.names) or "no inputs"
        if len(args) > len(self.names):
            raise InputError(f"the program takes {len(self.names)} input(s) ({takes}) but was given {len(args)} "
                             "by position")
        bound = dict(zip(self.names, args))
        for k, v in kwargs.items():
            if k in bound:
                raise InputError(f"input {k} is given both by position and by keyword; give it once")
            if k not in self.leaves:
                if v is None:  # the original's default: nothing to pass
                    continue
                raise InputError(f"{k} is not an input of this program; it takes {takes} (a program takes the "
                                 "inputs it was captured with: capture with this input in the example to accept it)")
            bound[k] = v
        for name in self.names:
            if bound.get(name) is None:
                bound[name] = self._default(name, bound)
        sizes: dict[str, tuple[int, str]] = {}  # symbol -> (size, where it was first seen)
        for name in self.names:
            self._check(name, bound[name], sizes)
        for g in self.guards:
            self._check_guard(g, bound)
        return Inputs(tuple(bound[n] for n in self.names[: self.n_args]),
                      {n: bound[n] for n in self.names[self.n_args:]})

    def _default(self, name: str, bound: dict):
        like_ids = bound.get("input_ids")
        if name in self.defaults and isinstance(like_ids, torch.Tensor):
            leaf = self.leaves[name][0]
            return torch.full(tuple(like_ids.shape), self.defaults[name], dtype=leaf.dtype, device=like_ids.device)
        raise InputError(f"input {name} is missing ({self._describe(name)}); the program takes "
                         f"{', '.join(self.names)}")

    def _describe(self, name: str) -> str:
        leaves = [lf for lf in self.leaves[name] if lf is not None]
        if len(leaves) != 1:
            return f"{len(leaves)} tensors"
        lf = leaves[0]
        sizes = ", ".join(self.allowed(d) if isinstance(d, str) else str(d) for d in lf.dims)
        return f"{_dtype_name(lf.dtype)}[{sizes}]"

    def allowed(self, symbol: str) -> str:
        """The sizes a symbolic dimension accepts, as text: ``1..64``, ``1 or more``."""
        lo, hi = self.ranges.get(symbol, (2, None))
        lo = 1 if lo <= 2 else lo  # torch.export's [2, oo] ranges accept 1 at run time (its 0/1 rule)
        return f"{lo} or more" if hi is None else (f"exactly {lo}" if hi == lo else f"{lo}..{hi}")

    def _check(self, name: str, value, sizes: dict) -> None:
        try:
            flat, spec = pytree.tree_flatten(value)
        except Exception:  # noqa: BLE001 - an object pytree cannot walk
            flat, spec = [value], None
        if spec != self.specs[name]:
            raise InputError(f"input {name} is {_kind(value)}; the program takes {self._describe(name)}")
        for got, leaf in zip(flat, self.leaves[name]):
            if leaf is None:
                continue
            label = f"{name}{leaf.where}"
            if not isinstance(got, torch.Tensor):
                raise InputError(f"input {label} is {_kind(got)}; the program takes a tensor {self._describe(name)}")
            if got.dtype != leaf.dtype:
                want = _dtype_name(leaf.dtype)
                raise InputError(f"input {label} is {_dtype_name(got.dtype)}; the program takes {want} "
                                 f"(convert it with .to(torch.{want}))")
            if got.dim() != len(leaf.dims):
                raise InputError(f"input {label} has {got.dim()} dimension(s) {list(got.shape)}; the program takes "
                                 f"{len(leaf.dims)}: {self._describe(name)}")
            for d, (size, want) in enumerate(zip(got.shape, leaf.dims)):
                size = int(size)
                if isinstance(want, int):
                    if size != want:
                        raise InputError(f"input {label} dimension {d} is {size}; the program takes exactly {want} "
                                         "there (a static size of the captured model; see the report's static_dims)")
                    continue
                lo, hi = self.ranges.get(want, (2, None))
                if size < (1 if lo <= 2 else lo) or (hi is not None and size > hi):
                    raise InputError(f"input {label} dimension {d} is {size}; allowed sizes are {self.allowed(want)}")
                if want in sizes and sizes[want][0] != size:
                    first, where = sizes[want]
                    raise InputError(f"input {label} dimension {d} is {size}, but {where} is {first}: the program "
                                     "takes them equal")
                sizes.setdefault(want, (size, f"{label} dimension {d}"))

    def _check_guard(self, guard: tuple, bound: dict) -> None:
        (name, d), op, rhs = guard

        def size(ref):
            t = bound.get(ref[0])
            return int(t.shape[ref[1]]) if isinstance(t, torch.Tensor) and ref[1] < t.dim() else None

        lhs = size((name, d))
        value = rhs if isinstance(rhs, int) else size(rhs)
        if lhs is None or value is None or _OPS[op](lhs, value):
            return
        other = str(rhs) if isinstance(rhs, int) else f"{rhs[0]} dimension {rhs[1]} ({value})"
        raise InputError(f"input {name} dimension {d} is {lhs}; the program requires it {op} {other} "
                         "(a guard torch.export recorded when it captured the model)")


def _parse_guard(text) -> tuple | None:
    m = _GUARD.match(text) if isinstance(text, str) else None
    if m is None:
        return None
    name, d, op, num, rname, rd = m.groups()
    return (name, int(d)), op, (int(num) if num is not None else (rname, int(rd)))


def _kind(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"a tensor {_dtype_name(value.dtype)}{list(value.shape)}"
    return f"a {type(value).__name__}"
