"""The in-place decode step of a decoder program: the KV cache written where it lies.

A decoder program (rewriter/decoder.py) appends each layer's new K/V to its past with
``cat([past, new], dim=2)`` and returns the result as the present. Generating from a preallocated
cache that way copies the whole cache at every step (B × Hkv × T × D per layer, for K and V).
:func:`inplace_step` derives, from a copy of the program's graph (the program is left untouched;
the step shares its weights), a step module that instead

* takes each layer's cache buffer ``(B, Hkv, T, D)`` and the buffer slots of the new tokens
  (``cache_position``, ``(S,)`` int64) as inputs;
* writes the new K/V into the buffer in place where the program concatenated
  (``index_copy_`` along the sequence dimension) and attends over the whole buffer;
* shows every other reader of a past input (the mask builder, which reads the past length from its
  shape) a view of the buffer's first ``T - S`` positions: the program's own mask code then sees
  ``T - S`` past + ``S`` new = ``T`` keys, and the attention mask ``(B, T)`` says which slots hold
  tokens (1) and which are empty or padding (0);
* returns the logits ``(B, S, V)`` only: the presents are the buffers themselves.

The view tells the program that the new tokens sit at the end of the buffer. That is exact in the
two ways generation calls the step:

* **decode**, one new token (``S = 1``) in any slot of a buffer of any length: the query is taken to
  sit at the last position, where causality allows every key, so the mask is the attention mask alone
  (the written slots and the new one) — unless a sliding window shorter than the buffer cuts it, which
  generate refuses;
* **prefill**, ``S`` tokens into a buffer view of exactly ``S`` positions (``buf[:, :, :S]``,
  ``cache_position = arange(S)``): the past is empty and the view is where the tokens go.

Grouped attention (``gqa`` programs, Hq query heads over Hkv < Hq K/V heads) reaches the step as SDPA with
``enable_gqa=True`` and a mask, which CUDA's fused kernels do not take (SDPA falls back to its math form, which
repeats K and V to Hq heads). With ``fold_groups`` (the default on CUDA) the step folds each group's query heads
into the query length instead — query ``(B, Hq, S, D)`` as ``(B, Hkv, G·S, D)``, the mask repeated G times along
its rows — so one fused SDPA without ``enable_gqa`` reads each K/V head once: the same attention, row by row.

Storage dtype: a layer's cache is stored in the dtype every reader of the concatenation casts it to
before use (bf16 when ``bf16`` made attention a bf16 op), else in the concatenation's own dtype —
lossless either way, and the casts are dropped from the step (they would copy the whole cache).
"""

from __future__ import annotations

import copy
import dataclasses
import operator
import re
import warnings

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from .errors import UsageError
from .program import Program

__all__ = ["InPlaceStep", "inplace_step", "cache_concats", "storage_dtypes"]

aten = torch.ops.aten
PAST = "past_key_values"  # as rewriter/decoder.py names the past inputs
_PAST_NAME = re.compile(rf"^{PAST}_(\d+)_(key|value)$")
_CASTS = (aten._to_copy.default, aten.to.dtype, aten.to.dtype_layout)
# ops that reshape or re-stride the cache without computing on it (a cast at their end still reads the cache)
_VIEWS = (aten.unsqueeze.default, aten.expand.default, aten.reshape.default, aten.view.default,
          aten._unsafe_view.default, aten.slice.Tensor, aten.transpose.int, aten.permute.default,
          aten.alias.default, aten.contiguous.default, aten.clone.default)


@dataclasses.dataclass
class InPlaceStep:
    """``module(input_ids, attention_mask, position_ids, *buffers, cache_position) -> logits`` (see the module
    docstring); ``buffers`` in the order of ``names`` (``"N.key"``, ``"N.value"``), each ``(B, heads[N], T,
    head_dims[N])`` of dtype ``dtypes[N.kind]``."""

    module: fx.GraphModule
    names: tuple[str, ...]
    heads: dict[str, int]
    head_dims: dict[str, int]
    dtypes: dict[str, torch.dtype]
    folded: int = 0  # grouped SDPA sites with their query heads folded into the query length

    def allocate(self, batch: int, length: int, device) -> dict[str, torch.Tensor]:
        """Zeroed buffers for ``batch`` rows of ``length`` positions."""
        return {k: torch.zeros(batch, self.heads[k], length, self.head_dims[k], dtype=self.dtypes[k], device=device)
                for k in self.names}

    def bytes_per_token(self) -> int:
        """Cache bytes per token per sequence, in the storage dtypes."""
        return sum(self.heads[k] * self.head_dims[k] * self.dtypes[k].itemsize for k in self.names)

    def __call__(self, input_ids, attention_mask, position_ids, cache_position, buffers: dict[str, torch.Tensor]):
        return self.module(input_ids, attention_mask, position_ids, *(buffers[k] for k in self.names), cache_position)


def cache_concats(graph: fx.Graph) -> dict[str, fx.Node]:
    """``"N.key"`` -> the ``cat([past input, new], dim=2)`` node that appends layer N's new K (V) to its past."""
    out = {}
    for n in graph.nodes:
        if n.op != "call_function" or n.target is not aten.cat.default:
            continue
        parts, dim = n.args[0], (n.args[1] if len(n.args) > 1 else n.kwargs.get("dim", 0))
        if len(parts) != 2 or dim % 4 != 2 or getattr(parts[0], "op", None) != "placeholder":
            continue
        m = _PAST_NAME.match(parts[0].name)
        if m:
            out[f"{m.group(1)}.{m.group(2)}"] = n
    return out


def _dtype(n) -> torch.dtype | None:
    v = n.meta.get("val") if isinstance(n, fx.Node) else None
    return v.dtype if isinstance(v, torch.Tensor) else None


def _cast_dtype(n: fx.Node) -> torch.dtype | None:
    """The dtype a cast node casts to (None: not a pure dtype cast)."""
    if n.target is aten._to_copy.default or n.target is aten.to.dtype_layout:
        if set(n.kwargs) - {"dtype", "layout", "device"} or len(n.args) != 1:
            return None
        return n.kwargs.get("dtype")
    if n.target is aten.to.dtype:
        return n.args[1] if len(n.args) > 1 else n.kwargs.get("dtype")
    return None


def _reader_casts(cat: fx.Node) -> list[fx.Node] | None:
    """The casts every path from ``cat`` through views ends in, or None when some reader uses the cache itself
    (the program's output, the present, is not a reader: the step returns no presents)."""
    casts, todo = [], list(cat.users)
    while todo:
        u = todo.pop()
        if u.op == "output":
            continue
        if u.op == "call_function" and u.target in _CASTS and _cast_dtype(u) is not None:
            casts.append(u)
        elif u.op == "call_function" and u.target in _VIEWS and u.args[0] is not None:
            todo.extend(u.users)
        else:
            return None
    return casts or None


def _storage_dtype(cat: fx.Node) -> tuple[torch.dtype, list[fx.Node]]:
    """(dtype to store the cache in, the reader casts that become no-ops)."""
    own = _dtype(cat) or torch.float32
    casts = _reader_casts(cat)
    if casts:
        to = {_cast_dtype(c) for c in casts}
        if len(to) == 1:
            (dt,) = to
            if isinstance(dt, torch.dtype) and dt.is_floating_point and dt.itemsize < own.itemsize:
                return dt, casts
    return own, []


def storage_dtypes(program: Program) -> dict[str, torch.dtype]:
    """``"N.key"`` -> the dtype the in-place step stores that cache in (read from the program, which stays as is);
    only the layers whose past is appended to with ``cat([past, new], dim=2)``."""
    return {k: _storage_dtype(cat)[0] for k, cat in cache_concats(program.graph).items()}


def _sdpa_args(n: fx.Node) -> dict:
    names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal")
    got = {"attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None, "enable_gqa": False}
    got.update(dict(zip(names, n.args)))
    got.update(n.kwargs)
    return got


def _fold_groups(graph: fx.Graph, writes: dict[fx.Node, int]) -> int:
    """Rewrite every ``SDPA(q, K, V, mask, enable_gqa=True)`` over a written cache with fewer K/V heads than query
    heads into SDPA over the query heads folded into the query length (see the module docstring); return how many."""
    done = 0
    for n in list(graph.nodes):
        if n.op != "call_function" or n.target is not aten.scaled_dot_product_attention.default:
            continue
        a = _sdpa_args(n)
        q, k, mask = a["query"], a["key"], a["attn_mask"]
        qv = q.meta.get("val")
        mv = mask.meta.get("val") if isinstance(mask, fx.Node) else None
        if (k not in writes or not a["enable_gqa"] or a["is_causal"] or a["dropout_p"] or mv is None or qv is None
                or mv.dim() != 4 or mv.shape[1] != 1):
            continue
        hq, hkv = qv.shape[1], writes[k]
        if not (isinstance(hq, int) and isinstance(hkv, int) and hq > hkv and hq % hkv == 0):
            continue
        g = hq // hkv
        call = graph.call_function
        with graph.inserting_before(n):
            b, s, d = (call(aten.sym_size.int, (q, i)) for i in (0, 2, 3))
            gs = call(operator.mul, (s, g))
            q_f = call(aten.reshape.default, (q, [b, hkv, gs, d]))  # (B, Hkv, G*S, D): head h = kv * G + g
            mb, mt = call(aten.sym_size.int, (mask, 0)), call(aten.sym_size.int, (mask, 3))
            m5 = call(aten.expand.default, (call(aten.unsqueeze.default, (mask, 2)), [-1, -1, g, -1, -1]))
            m_f = call(aten.reshape.default, (m5, [mb, 1, gs, mt]))  # (B, 1, G*S, T): row g*S + s = mask row s
            o_f = call(aten.scaled_dot_product_attention.default, (q_f, k, a["value"], m_f, 0.0, False),
                       {"scale": a["scale"]} if a["scale"] is not None else {})
            dv = call(aten.sym_size.int, (o_f, 3))
            out = call(aten.reshape.default, (o_f, [b, hq, s, dv]))
        n.replace_all_uses_with(out)
        graph.erase_node(n)
        done += 1
    return done


def inplace_step(program: Program, *, fold_groups: bool | None = None) -> InPlaceStep:
    """The in-place decode step of a decoder program (see the module docstring). ``fold_groups``: fold grouped
    query heads into the query length (default: when the program is on CUDA). Raises UsageError naming the
    past input that is not appended to with ``cat([past, new], dim=2)`` (then only ``cache="dynamic"`` works)."""
    src = program.module
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # deepcopy of pytree specs warns in torch 2.13
        graph = copy.deepcopy(src.graph)
    holders = {n.name: n for n in graph.nodes if n.op == "placeholder"}
    past = {f"{m.group(1)}.{m.group(2)}": n for name, n in holders.items() if (m := _PAST_NAME.match(name))}
    if not past or "input_ids" not in holders:
        raise UsageError("the static cache needs a decoder program (inputs input_ids, attention_mask, position_ids, "
                         "past_key_values); this program has none: use cache='dynamic'")
    cats = cache_concats(graph)
    missing = sorted(set(past) - set(cats), key=lambda k: (int(k.split(".")[0]), k))
    if missing:
        raise UsageError(f"the static cache writes each new K/V into its buffer where the program appends it with "
                         f"cat([past, new], dim=2), but past input {PAST}.{missing[0]} is not appended that way; "
                         "use cache='dynamic'")
    names = tuple(past)  # placeholder order: the step's arguments after input_ids, attention_mask, position_ids
    order = [n.name for n in graph.nodes if n.op == "placeholder"]
    if order != ["input_ids", "attention_mask", "position_ids"] + [past[k].name for k in names]:
        raise UsageError(f"the static cache needs a decoder program with the inputs input_ids, attention_mask, "
                         f"position_ids, {PAST}; this one takes {', '.join(order)}: use cache='dynamic'")

    # the flat output of the program: keep the logits only
    out_node = next(n for n in graph.nodes if n.op == "output")
    flat_out = list(out_node.args[0]) if isinstance(out_node.args[0], (list, tuple)) else [out_node.args[0]]
    spec = getattr(graph._codegen, "pytree_info", None)
    index = pytree.tree_unflatten(list(range(len(flat_out))), spec.out_spec) if spec and spec.out_spec else None
    logits = flat_out[index["logits"]] if isinstance(index, dict) and "logits" in index else flat_out[0]

    last = [n for n in graph.nodes if n.op == "placeholder"][-1]
    with graph.inserting_after(last):
        cache_position = graph.placeholder("cache_position")
    heads, dims, dtypes, writes = {}, {}, {}, {}
    with graph.inserting_after(cache_position):
        new_len = graph.call_function(aten.sym_size.int, (holders["input_ids"], 1))  # S
    anchor = new_len.next  # the views go here, in order
    for key in names:
        holder, cat = past[key], cats[key]
        v = holder.meta.get("val")
        heads[key], dims[key] = int(v.shape[1]), int(v.shape[3])
        dtype, casts = _storage_dtype(cat)
        dtypes[key] = dtype
        others = [u for u in holder.users if u is not cat]
        if others:  # they read the past length (the mask): a view of the first T - S positions
            with graph.inserting_before(anchor):
                total = graph.call_function(aten.sym_size.int, (holder, 2))
                past_len = graph.call_function(operator.sub, (total, new_len))
                view = graph.call_function(aten.slice.Tensor, (holder, 2, 0, past_len))
            for u in others:
                u.replace_input_with(holder, view)
        new = cat.args[0][1]
        with graph.inserting_before(cat):
            if _dtype(new) != dtype:
                new = graph.call_function(aten._to_copy.default, (new,), {"dtype": dtype})
            write = graph.call_function(aten.index_copy_.default, (holder, 2, cache_position, new))
        writes[write] = heads[key]
        cat.replace_all_uses_with(write)
        graph.erase_node(cat)
        for c in casts:  # the cache is already in the dtype these casts produced
            c.replace_all_uses_with(c.args[0])
            graph.erase_node(c)
    if fold_groups is None:
        fold_groups = next((t.device.type == "cuda" for t in src.parameters()), False)
    folded = _fold_groups(graph, writes) if fold_groups else 0
    out_node.args = (logits,)
    graph._codegen = fx.graph.CodeGen()  # flat positional inputs, one output
    for n in list(graph.nodes):  # DynamicCache's empty start tensors (CPU constants): a dead detach_ of a fresh copy
        fresh = getattr(n.args[0], "target", None) is aten.lift_fresh_copy.default if n.args else False
        if n.target is aten.detach_.default and not n.users and fresh:
            graph.erase_node(n)
    graph.eliminate_dead_code()
    module = fx.GraphModule(src, graph, class_name="InPlaceDecodeStep")
    return InPlaceStep(module, names, heads, dims, dtypes, folded)
