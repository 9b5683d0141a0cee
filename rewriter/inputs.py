"""Example inputs: parsing `--inputs` text, deriving inputs, and making a second input of another size.

A spec is a comma-separated list of ``name:dtype[d0,d1,...]`` items, each optionally followed by
``@lo..hi`` (integer value range, ``hi`` exclusive), e.g.::

    input_ids:int64[2,16]@0..50257,attention_mask:int64[2,16]

Tensors are passed to the model's ``forward`` as keyword arguments named by ``name``.
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

__all__ = ["Inputs", "TensorSpec", "parse_input_spec", "make_inputs", "max_input_bytes", "MAX_INPUT_BYTES_ENV"]

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
