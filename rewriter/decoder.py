"""Decoder programs: a causal LM captured as one program that carries its KV cache.

A decoder program is what serving runs token by token::

    inputs   input_ids        (B, S)            int64   the new tokens
             attention_mask   (B, P+S)          int64   1 for real tokens (past and new), 0 for padding
             position_ids     (B, S)            int64   positions of the new tokens
             past_key_values  {"N.key": (B, Hkv, P, D), "N.value": (B, Hkv, P, Dv)} per layer N
    outputs  {"logits": (B, S, V), "present.N.key": (B, Hkv, P+S, D), "present.N.value": ...}

Prefill is the same program with P = 0; decode has S = 1. Batch, new length and past length are
symbolic (``batch``, ``sequence_length``, ``past_sequence_length``; the mask's length is its own
symbol, ``total_sequence_length``), so one program serves both. The names are ONNX Runtime GenAI's:
the flattened inputs read ``past_key_values.N.key`` and the outputs ``present.N.key``.

The cache's shape per layer is the program's :class:`~evo_rewrite.annotations.KVCacheLayout`
annotation, read from the graph (:func:`cache_layout`), so a pass that changes it (``gqa``) keeps it
true by calling :func:`sync_cache` on the program it returns.

Two kinds of model qualify: Hugging Face ``*ForCausalLM`` / ``*LMHeadModel`` models (their cache is
transformers' ``DynamicCache``, :func:`cached_module`), and a module of your own that follows the
**cache protocol** (:data:`CACHE_PROTOCOL`, :func:`protocol_module`)::

    forward(input_ids, past_key_values=None, attention_mask=None, position_ids=None) -> (logits, presents)

``input_ids`` (B, S) is the first positional parameter; ``past_key_values`` (a parameter of that name) is
None or a list/tuple with one ``(key, value)`` pair per layer, each ``(B, Hkv, P, D)`` (P = 0 is a
prefill, as None is); ``presents`` is the same form with P + S positions (the past concatenated with
the new tokens' K/V) and ``logits`` is (B, S, V). ``attention_mask`` (B, P+S; 1 token, 0 padding) and
``position_ids`` (B, S) are optional parameters: the program always has the four inputs above, and
passes each to the module only if its forward names it — a module without ``attention_mask`` ignores
the program's mask (no left padding, and only the growing cache of ``generate(cache="dynamic")``,
since a preallocated cache relies on the mask), one without ``position_ids`` computes positions itself
(typically P, P+1, ...). A module qualifies by its signature (a ``past_key_values`` parameter) *and* a
probe (:func:`_probe_protocol`: prefill 2 tokens from None and from an empty past, decode 1 more; the
shapes must follow the protocol); anything else is captured without its cache. ``zoo.cached_llama``
is an example.

Checking a decoder program compares logits, step by step, against the original with its own cache
(:func:`verify_decoder`: transformers' ``DynamicCache`` for Hugging Face models, the module's own
``past_key_values``/``presents`` for the protocol). For the pass
manager, whose verification inputs are fixed, :func:`run_with_own_cache` runs a program on decoder
inputs after building the past from the program itself (a prefill over a fixed prefix): a pass that
changes the cache's head count is then compared on logits alone, as it must be.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import re
import warnings

import torch
import torch.fx as fx

from .annotations import KVCacheLayout, LayerCache
from .errors import CaptureError, UsageError, VerificationError
from .inputs import Inputs
from .program import Program, SourceInfo

__all__ = ["cached_module", "protocol_module", "capture_decoder", "is_causal_lm", "declares_cache", "takes_cache",
           "CACHE_PROTOCOL", "CacheProtocolError", "not_causal_lm_message", "decoder_inputs",
           "cache_layout", "sync_cache", "set_cache_heads", "is_decoder", "reads_mask", "empty_past", "step_inputs", "as_prefill",
           "run_with_own_cache",
           "verify_decoder", "DecoderCheck", "second_decoder_inputs", "export_dynamic_shapes", "PAST", "PRESENT", "DIM_NAMES"]

PAST = "past_key_values"  # the input dict; its flattened names read past_key_values.N.key / .value
PRESENT = "present"  # output keys present.N.key / .value
DIM_NAMES = ("batch", "sequence_length", "past_sequence_length", "total_sequence_length")
_PAST_KEY = re.compile(r"^(\d+)\.(key|value)$")
_MAX = 65536


def is_causal_lm(model) -> bool:
    """A Hugging Face decoder-only language model (``*ForCausalLM``, ``*LMHeadModel``)."""
    if not (hasattr(model, "config") and type(model).__module__.startswith("transformers")):
        return False
    cfg = model.config
    if getattr(cfg, "is_encoder_decoder", False):
        return False
    name = type(model).__name__
    return name.endswith("ForCausalLM") or name.endswith("LMHeadModel")


CACHE_PROTOCOL = ("forward(input_ids, past_key_values=None, [attention_mask], [position_ids]) returning (logits, "
                  "presents), past and presents a list of per-layer (key, value) tensors (batch, kv_heads, length, "
                  "head_dim)")


class CacheProtocolError(UsageError):
    """A module that declares ``past_key_values`` but does not follow the cache protocol (``reason`` says how)."""

    def __init__(self, model_name: str, reason: str):
        self.reason = reason
        super().__init__(f"{model_name} does not follow the cache protocol: {reason}. A module qualifies with "
                         f"{CACHE_PROTOCOL} (docs/extending.md); --no-cache (rewrite(..., cache=False)) captures it "
                         "without its cache")


def declares_cache(model) -> bool:
    """A module of your own (not transformers') whose ``forward`` has a ``past_key_values`` parameter: it claims the
    cache protocol, which the probe at capture confirms (:func:`_probe_protocol`)."""
    if not isinstance(model, torch.nn.Module) or type(model).__module__.startswith("transformers"):
        return False
    try:
        return PAST in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def takes_cache(model) -> bool:
    """Qualifies for the decoder capture by its kind: a Hugging Face causal LM, or a module that declares the protocol."""
    return is_causal_lm(model) or declares_cache(model)


def not_causal_lm_message(what: str, thing: str) -> str:
    return (f"{what} needs a causal language model with a KV cache, and {thing} is not one: Hugging Face "
            "*ForCausalLM / *LMHeadModel models (Llama, SmolLM2, Qwen2, Mistral, ...) qualify, or a module that "
            f"follows the cache protocol, {CACHE_PROTOCOL} (docs/extending.md), or a program evo-rewrite captured "
            "from either with its cache (the default; not with --no-cache)")


def cached_module(model: torch.nn.Module) -> torch.nn.Module:
    """The causal LM called with its cache as plain tensors (what capture exports): a shallow copy of the
    model whose ``forward`` takes ``(input_ids, attention_mask, position_ids, past_key_values)`` and returns
    ``{"logits", "present.N.key", "present.N.value"}``. It shares the model's parameters and submodules,
    so the program's weights keep the model's own names (``model.layers.0.self_attn.k_proj.weight``)."""
    import copy

    from transformers import DynamicCache

    wrapper = copy.copy(model)
    hf_forward = type(model).forward

    def forward(input_ids, attention_mask, position_ids, past_key_values: dict[str, torch.Tensor]):
        past = past_key_values
        layers = len(past) // 2
        cache = DynamicCache(ddp_cache_data=[(past[f"{i}.key"], past[f"{i}.value"]) for i in range(layers)])
        out = hf_forward(wrapper, input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         **cache_kwarg(model, cache), use_cache=True, return_dict=True)
        result = {"logits": out.logits}
        for i, layer in enumerate(returned_cache(out).layers):
            result[f"{PRESENT}.{i}.key"] = layer.keys
            result[f"{PRESENT}.{i}.value"] = layer.values
        return result

    wrapper.forward = forward
    return wrapper


def cache_kwarg(model, cache) -> dict:
    """transformers >= 5.2x names the cache argument ``cache`` (``past_key_values`` before, now deprecated)."""
    import inspect

    params = inspect.signature(model.forward).parameters
    return {"cache": cache} if "cache" in params else {"past_key_values": cache}


def returned_cache(out):
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


def _protocol_kwargs(model) -> tuple[bool, bool]:
    """(takes attention_mask, takes position_ids): what the module's forward names."""
    params = inspect.signature(model.forward).parameters
    return "attention_mask" in params, "position_ids" in params


def call_protocol(model, forward, input_ids, past, attention_mask=None, position_ids=None):
    """Call a protocol module's ``forward`` (a bound method, or the class's function and the module) with the
    optional inputs it names; return ``(logits, presents)``."""
    takes_mask, takes_pos = _protocol_kwargs(model)
    extra = {}
    if takes_mask and attention_mask is not None:
        extra["attention_mask"] = attention_mask
    if takes_pos and position_ids is not None:
        extra["position_ids"] = position_ids
    out = forward(input_ids, past_key_values=past, **extra)
    return out[0], out[1]


def protocol_module(model: torch.nn.Module) -> torch.nn.Module:
    """A cache-protocol module called as :func:`cached_module` calls a Hugging Face one: a shallow copy whose
    ``forward`` takes ``(input_ids, attention_mask, position_ids, past_key_values)`` (the past a dict
    ``{"N.key", "N.value"}``) and returns ``{"logits", "present.N.key", "present.N.value"}``; it shares the
    model's parameters, so the program's weights keep the model's own names."""
    wrapper = copy.copy(model)
    own_forward = type(model).forward

    def forward(input_ids, attention_mask, position_ids, past_key_values: dict[str, torch.Tensor]):
        past = [(past_key_values[f"{i}.key"], past_key_values[f"{i}.value"]) for i in range(len(past_key_values) // 2)]
        # the mask's last P + S positions (all of it): its length stays a symbol of its own, as in the Hugging Face
        # programs, rather than the expression P + S that a module broadcasting it against its keys would make it
        total = past[0][0].shape[2] + input_ids.shape[1]
        last = attention_mask.shape[1]
        attention_mask = attention_mask.index_select(1, torch.arange(last - total, last, device=attention_mask.device))
        logits, presents = call_protocol(model, lambda *a, **k: own_forward(wrapper, *a, **k), input_ids, past,
                                         attention_mask, position_ids)
        result = {"logits": logits}
        for i, (k, v) in enumerate(presents):
            result[f"{PRESENT}.{i}.key"] = k
            result[f"{PRESENT}.{i}.value"] = v
        return result

    wrapper.forward = forward
    return wrapper


def _probe_protocol(model) -> tuple[KVCacheLayout, int]:
    """Check that ``model`` follows the cache protocol with three calls (prefill 2 tokens from None and from an
    empty past, decode 1 more) and return its cache layout and vocabulary size; CacheProtocolError says where
    it departs."""
    name = type(model).__name__
    dev = _device(model)
    ids = torch.zeros(1, 2, dtype=torch.long, device=dev)

    def call(what, new, past):
        try:
            out = model(new, past_key_values=past)
        except Exception as exc:  # noqa: BLE001 - the reason goes into one line
            first = (str(exc).strip().splitlines() or [""])[0][:200]
            raise CacheProtocolError(name, f"{what} raised {type(exc).__name__}: {first}") from None
        if not (isinstance(out, (tuple, list)) and len(out) == 2 and isinstance(out[0], torch.Tensor)):
            raise CacheProtocolError(name, f"{what} returned {type(out).__name__}, not a pair (logits, presents)")
        logits, presents = out
        s, p = new.shape[1], (past[0][0].shape[2] if past else 0)
        if logits.dim() != 3 or tuple(logits.shape[:2]) != (1, s):
            raise CacheProtocolError(name, f"{what} returned logits of shape {tuple(logits.shape)}, not (batch 1, "
                                           f"{s} tokens, vocab)")
        ok = isinstance(presents, (tuple, list)) and len(presents) > 0 and all(
            isinstance(kv, (tuple, list)) and len(kv) == 2 and all(isinstance(t, torch.Tensor) and t.dim() == 4
                                                                   for t in kv) for kv in presents)
        if not ok:
            raise CacheProtocolError(name, f"{what} returned presents that are not a list of per-layer (key, value) "
                                           "4-D tensors")
        for i, (k, v) in enumerate(presents):
            if k.shape[0] != 1 or k.shape[2] != p + s or v.shape[2] != p + s or k.shape[1] != v.shape[1]:
                raise CacheProtocolError(name, f"{what}: layer {i}'s present key {tuple(k.shape)} / value "
                                               f"{tuple(v.shape)} is not (batch 1, kv_heads, {p + s} positions, "
                                               "head_dim) with as many heads in both")
            if k.shape[-1] != v.shape[-1]:
                raise CacheProtocolError(name, f"{what}: K and V head sizes differ in layer {i}")
        return logits, presents

    with torch.no_grad():
        logits, presents = call("forward(input_ids, past_key_values=None)", ids, None)
        empty = [(k[:, :, :0], v[:, :, :0]) for k, v in presents]
        logits0, presents0 = call("forward(input_ids, past_key_values=<empty past>)", ids, empty)
        if len(presents0) != len(presents):
            raise CacheProtocolError(name, "a prefill from an empty past returned a different number of layers")
        scale = max(logits.float().abs().max().item(), 1e-6)
        if not torch.allclose(logits0.float(), logits.float(), rtol=1e-3, atol=1e-3 * scale):
            raise CacheProtocolError(name, "a prefill from an empty past (P = 0) gave other logits than from "
                                           "past_key_values=None")
        call("a decode step (1 token after 2)", ids[:, :1], presents)
    layers = tuple(LayerCache(int(k.shape[1]), int(k.shape[-1]), str(k.dtype).removeprefix("torch."))
                   for k, _ in presents)
    return KVCacheLayout(layers), int(logits.shape[-1])


def _probe(model) -> KVCacheLayout:
    """Run the model once with a DynamicCache and read each layer's K/V shape and dtype."""
    from transformers import DynamicCache

    dev = next(model.parameters()).device
    ids = torch.zeros(1, 2, dtype=torch.long, device=dev)
    with torch.no_grad():
        out = model(input_ids=ids, **cache_kwarg(model, DynamicCache()), use_cache=True, return_dict=True)
    layers = []
    for layer in returned_cache(out).layers:
        k, v = layer.keys, layer.values
        if k is None or k.dim() != 4 or v.dim() != 4 or k.shape[1] != v.shape[1]:
            raise CaptureError(f"{type(model).__name__}: its cache layer {len(layers)} is not a (batch, heads, "
                               "length, head_dim) K/V pair; evo-rewrite captures Llama-style caches only. Use "
                               "--no-cache for the cacheless forward.")
        if k.shape[-1] != v.shape[-1]:
            raise CaptureError(f"{type(model).__name__}: K and V head sizes differ in layer {len(layers)}; "
                               "not supported by the decoder capture (--no-cache captures the cacheless forward)")
        layers.append(LayerCache(int(k.shape[1]), int(k.shape[-1]), str(k.dtype).removeprefix("torch.")))
    return KVCacheLayout(tuple(layers))


def empty_past(layout: KVCacheLayout, batch: int, length: int = 0, *, device="cpu", generator=None,
               dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Past K/V of ``length`` positions per layer (zeros, or random with a generator)."""
    past = {}
    for i, c in enumerate(layout.layers):
        dt = dtype or getattr(torch, c.dtype)
        for kind in ("key", "value"):
            shape = (batch, c.kv_heads, length, c.head_dim)
            past[f"{i}.{kind}"] = (torch.randn(shape, generator=generator).to(dt).to(device) if generator is not None
                                   else torch.zeros(shape, dtype=dt, device=device))
    return past


def step_inputs(input_ids: torch.Tensor, attention_mask: torch.Tensor, past: dict[str, torch.Tensor]) -> Inputs:
    """One step's inputs: ``attention_mask`` covers past and new tokens; positions count real tokens
    (so left padding works as in transformers' generate)."""
    s = input_ids.shape[1]
    pos = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -s:].contiguous()
    return Inputs((), {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": pos, PAST: past})


def as_prefill(program: Program, batch: Inputs) -> Inputs:
    """A decoder program takes token batches (``input_ids``, optionally ``attention_mask``) as prefill steps:
    positions from the mask and an empty past in the cache's layout. Any other batch is returned as it is."""
    layout = program.annotations.kv_cache
    kw = batch.kwargs if not batch.args else {"input_ids": batch.args[0]} if len(batch.args) == 1 else None
    if layout is None or kw is None or PAST in kw or set(kw) - {"input_ids", "attention_mask"} \
            or not isinstance(kw.get("input_ids"), torch.Tensor):
        return batch
    ids = kw["input_ids"]
    mask = kw.get("attention_mask", torch.ones_like(ids))
    return step_inputs(ids, mask, empty_past(layout, ids.shape[0], 0, device=ids.device))


def _prefix(batch: int, past_len: int, vocab: int) -> torch.Tensor:
    """The fixed prefix whose K/V a decoder program's example past holds (a function of the sizes alone)."""
    g = torch.Generator().manual_seed(1000 + 7 * batch + past_len)
    return torch.randint(3, max(4, vocab), (batch, past_len), generator=g)


def decoder_inputs(model, layout: KVCacheLayout, vocab: int, *, batch: int = 2, seq: int = 5, past: int = 3,
                   pad: bool = False, seed: int = 0) -> Inputs:
    """Decoder inputs whose past K/V are the model's own over a fixed prefix of ``past`` tokens
    (:func:`_prefix`), so that :func:`run_with_own_cache` rebuilds them exactly. ``pad``: the last row
    starts with one padding position (left padding, as batched generation has it)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, max(4, vocab), (batch, seq), generator=g)
    prefix = _prefix(batch, past, vocab)
    mask = torch.ones(batch, past + seq, dtype=torch.long)
    if pad and past + seq > 2:
        mask[-1, 0] = 0
    kv = _own_past(model, layout, prefix, mask[:, :past])
    return step_inputs(ids, mask, kv)


def _own_past(run, layout: KVCacheLayout, prefix: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """The past that ``run`` (a program, or a cached_module) computes over ``prefix``."""
    b, p = prefix.shape
    dev = _device(run)
    dtype = _float_dtype(run)
    past0 = empty_past(layout, b, 0, device=dev, dtype=dtype)
    if p == 0:
        return past0
    step = step_inputs(prefix.to(dev), mask.to(dev), past0)
    with torch.no_grad():
        out = run(**step.kwargs) if isinstance(run, torch.nn.Module) else run(step)
    return {k.removeprefix(f"{PRESENT}."): v for k, v in out.items() if k.startswith(f"{PRESENT}.")}


def _device(run) -> torch.device:
    mod = run.module if isinstance(run, Program) else run
    for t in list(mod.parameters()) + list(mod.buffers()):
        return t.device
    return torch.device("cpu")


def _float_dtype(run) -> torch.dtype | None:
    mod = run.module if isinstance(run, Program) else run
    for t in mod.parameters():
        if t.is_floating_point():
            return t.dtype
    return None


def _dynamic_shapes(layout: KVCacheLayout):
    from torch.export import Dim

    batch = Dim(DIM_NAMES[0], min=1, max=_MAX)
    seq = Dim(DIM_NAMES[1], min=1, max=_MAX)
    past = Dim(DIM_NAMES[2], min=0, max=_MAX)
    # the mask covers past + new tokens: torch.export finds that relation itself (a Dim may not be a sum of two)
    return {"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: Dim.AUTO},
            "position_ids": {0: batch, 1: seq},
            PAST: {f"{i}.{kind}": {0: batch, 2: past} for i in range(len(layout.layers)) for kind in ("key", "value")}}


def is_decoder(program: Program) -> bool:
    return program.annotations.kv_cache is not None


def reads_mask(program: Program) -> bool:
    """Whether the decoder program uses its ``attention_mask`` input. A program captured from a cache-protocol
    module without an ``attention_mask`` parameter takes the input but ignores it: it cannot hide padding or
    the unwritten tail of a preallocated cache (generate's ``cache="static"``)."""
    return any(n.name == "attention_mask" and len(n.users) > 0 for n in program.placeholders())


def export_dynamic_shapes(program: Program):
    """torch.export's dynamic_shapes for re-exporting a decoder program (the pytorch target)."""
    return _dynamic_shapes(program.annotations.kv_cache)


def capture_decoder(model: torch.nn.Module, *, source: SourceInfo | None = None, log=None) -> Program:
    """Capture a causal LM as a decoder program (see the module docstring): a Hugging Face ``*ForCausalLM``, or a
    module that follows the cache protocol (CacheProtocolError, a UsageError, says where one departs from it)."""
    from .graph_capture import _module_frame, program_from_exported

    hf = is_causal_lm(model)
    if not hf and not declares_cache(model):
        raise UsageError(not_causal_lm_message("the decoder capture", type(model).__name__))
    source = source or SourceInfo(kind="module", model_class=type(model).__qualname__)
    was_training = model.training
    model.eval()
    try:
        if hf:
            layout = _probe(model)
            wrapper = cached_module(model)
            vocab = int(model.get_output_embeddings().weight.shape[0]) if model.get_output_embeddings() is not None \
                else int(model.config.vocab_size)
        else:
            layout, vocab = _probe_protocol(model)
            wrapper = protocol_module(model)
        inputs = decoder_inputs(wrapper, layout, vocab).to(_device(model))
        if log:
            log(f"capturing {type(model).__name__} as a decoder program with its KV cache "
                f"({len(layout.layers)} layers, {layout.layers[0].kv_heads} K/V heads of {layout.layers[0].head_dim}) ...")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ep = torch.export.export(wrapper, (), inputs.kwargs, dynamic_shapes=_dynamic_shapes(layout),
                                         strict=False)
        except Exception as exc:  # noqa: BLE001 - every capture failure becomes one clear message
            mod, line = _module_frame(exc, wrapper)
            where = f" in module '{mod}'" if mod else ""
            at = f" at {line}" if line else ""
            first = (str(exc).strip().splitlines() or [""])[0][:300]
            if "Constraints violated" in first:  # e.g. a position table or mask buffer of a fixed size
                first += (f" (the decoder program's batch, new and past lengths are symbolic up to {_MAX}; a module "
                          "that bounds them, such as with a fixed-size position table or mask buffer sliced by "
                          "length, cannot be captured with its cache)")
            raise CaptureError(f"cannot capture {type(model).__name__} with its KV cache: torch.export failed{where}{at} "
                               f"with {type(exc).__name__}: {first}. Use --no-cache (rewrite(..., cache=False)) for "
                               "the cacheless forward.") from None
    finally:
        model.train(was_training)
    program = program_from_exported(ep, inputs, source)
    _drop_empty_concats(program)
    _name_dims(program)
    program.annotations.kv_cache = layout
    return program


def _drop_empty_concats(program: Program) -> None:
    """DynamicCache starts each layer from ``torch.tensor([])`` and concatenates the past onto it: drop
    those 1-D empty operands (cat skips them anyway) so the past input feeds cat(past, new) directly."""
    g = program.graph
    for n in list(g.nodes):
        if n.op != "call_function" or n.target is not torch.ops.aten.cat.default:
            continue
        parts = [a for a in n.args[0] if not _empty_1d(a)]
        if len(parts) == len(n.args[0]):
            continue
        if len(parts) == 1:
            n.replace_all_uses_with(parts[0])
            g.erase_node(n)
        else:
            n.args = (parts, *n.args[1:])
    g.eliminate_dead_code()
    program.module.recompile()


def _empty_1d(a) -> bool:
    v = a.meta.get("val") if isinstance(a, fx.Node) else None
    return isinstance(v, torch.Tensor) and v.dim() == 1 and v.shape[0] == 0


def _name_dims(program: Program) -> None:
    """dynamic_dims by the names of DIM_NAMES (export may give every past tensor its own symbol)."""
    names = []
    for n in program.placeholders():
        if n.name in ("input_ids", "position_ids"):
            names.append({0: "batch", 1: "sequence_length"})
        elif n.name == "attention_mask":
            names.append({0: "batch", 1: "total_sequence_length"})
        else:
            names.append({0: "batch", 2: "past_sequence_length"})
    program.dynamic_dims = names
    program.symbol_ranges = {"batch": (1, _MAX), "sequence_length": (1, _MAX), "past_sequence_length": (0, _MAX),
                             "total_sequence_length": (1, _MAX)}


# ---- the cache layout, read from the graph ------------------------------------------------------------

def _past_placeholders(program: Program) -> dict[str, fx.Node]:
    """``"N.key"`` -> placeholder, in the order of the flattened inputs."""
    names = [k for k in program.inputs.kwargs.get(PAST, {})]
    holders = [n for n in program.placeholders() if n.name.startswith(f"{PAST}_")]
    return dict(zip(names, holders))


def cache_layout(program: Program) -> KVCacheLayout:
    """The layout the program's past inputs actually have (heads and head dim from the graph, dtype too)."""
    past = program.inputs.kwargs[PAST]
    layers = []
    for i in range(len(past) // 2):
        k = past[f"{i}.key"]
        layers.append(LayerCache(int(k.shape[1]), int(k.shape[-1]), str(k.dtype).removeprefix("torch.")))
    return KVCacheLayout(tuple(layers))


def set_cache_heads(program: Program, past_inputs, kv_heads: int) -> KVCacheLayout:
    """A pass changed the K/V heads read from these past inputs (placeholders) to ``kv_heads``: update the
    layout, the placeholders and the example past (:func:`sync_cache`); return the new layout."""
    by_node = {node: name for name, node in _past_placeholders(program).items()}
    layers = list(program.annotations.kv_cache.layers)
    for node in past_inputs:
        i = int(by_node[node].split(".")[0])
        layers[i] = dataclasses.replace(layers[i], kv_heads=kv_heads)
    layout = KVCacheLayout(tuple(layers))
    sync_cache(program, layout)
    return layout


def sync_cache(program: Program, layout: KVCacheLayout) -> None:
    """Make the program's past inputs (example tensors and placeholder metadata) and its annotation
    follow ``layout`` — what a pass that changes the cache's heads or dtype calls on the program it
    returns. The example past is rebuilt by the program itself (:func:`run_with_own_cache`'s prefix)."""
    program.annotations.kv_cache = layout
    old = program.inputs.kwargs[PAST]
    b, p = next(iter(old.values())).shape[0], next(iter(old.values())).shape[2]
    holders = _past_placeholders(program)
    for name, node in holders.items():
        i = int(name.split(".")[0])
        c = layout.layers[i]
        v = node.meta.get("val")
        if v is not None:
            with v.fake_mode:
                node.meta["val"] = torch.empty((v.shape[0], c.kv_heads, v.shape[2], c.head_dim),
                                               dtype=getattr(torch, c.dtype), device=v.device)
    mask = program.inputs.kwargs["attention_mask"]
    kv = _own_past(program, layout, _prefix(b, p, _vocab(program)), mask[:, :p])
    program.inputs = Inputs((), {**program.inputs.kwargs, PAST: kv})


def _vocab(program: Program) -> int:
    sizes = program.vocab_sizes()
    return min(sizes) if sizes else 4


def second_decoder_inputs(program: Program) -> Inputs:
    """The pass manager's second verification input for a decoder program: a decode step (one new
    token) for one more row, after a longer past whose last row starts with padding; the past is the
    program's own (:func:`run_with_own_cache` rebuilds it the same way)."""
    ex = program.inputs.kwargs
    b = ex["input_ids"].shape[0] + 1
    p = next(iter(ex[PAST].values())).shape[2] + 4
    dev = ex["input_ids"].device
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, max(4, _vocab(program)), (b, 1), generator=g)
    mask = torch.ones(b, p + 1, dtype=torch.long)
    mask[-1, :2] = 0
    kv = _own_past(program, program.annotations.kv_cache, _prefix(b, p, _vocab(program)), mask[:, :p].to(dev))
    return step_inputs(ids.to(dev), mask.to(dev), kv)


# ---- running and checking ----------------------------------------------------------------------------

def run_with_own_cache(program: Program, inputs: Inputs):
    """Run a decoder program on ``inputs`` with the past rebuilt by the program itself over the fixed
    prefix those inputs were made with; return ``{"logits": ...}`` only.

    Comparing two programs this way is fair even when a pass changed the cache's head count or dtype:
    each runs with its own cache, as it will when it generates.
    """
    kw = inputs.kwargs
    past_in = kw[PAST]
    first = next(iter(past_in.values()))
    b, p = first.shape[0], first.shape[2]
    layout = program.annotations.kv_cache
    mask = kw["attention_mask"]
    own = _own_past(program, layout, _prefix(b, p, _vocab(program)).to(mask.device), mask[:, :p])
    out = program(Inputs((), {**kw, PAST: own}))
    return {"logits": out["logits"]}


@dataclasses.dataclass
class DecoderCheck:
    """Logits of the program vs the original at each step (prefill, then one token per step)."""

    steps: list[dict]  # per step: {"step", "tokens", "max_abs_error", "max_rel_error", "top1_agreement"}
    tolerance: float

    @property
    def max_rel_error(self) -> float:
        return max(s["max_rel_error"] for s in self.steps)


def verify_decoder(program: Program, model: torch.nn.Module, input_ids: torch.Tensor, *, steps: int = 3,
                   attention_mask: torch.Tensor | None = None, tolerance: float | None = None) -> DecoderCheck:
    """Prefill ``input_ids`` and decode ``steps`` greedy tokens (the original's choice) in both the program
    and the original with its own cache (transformers' ``DynamicCache``, or a protocol module's own
    ``past_key_values``/``presents``); compare logits at every step.

    ``tolerance``: max |Δ| / max |ref| allowed at any step (default: the exact-pass tolerance of the
    logits' dtype); raises VerificationError naming the first step past it.
    """
    from .verify import tolerance as dtype_tolerance

    if not is_decoder(program):
        raise UsageError(not_causal_lm_message("verify_decoder", "this program"))
    if not takes_cache(model):
        raise UsageError(not_causal_lm_message("verify_decoder", type(model).__name__))
    dev = _device(program)
    ids = input_ids.to(dev)
    mask = torch.ones_like(ids) if attention_mask is None else attention_mask.to(dev)
    hf = is_causal_lm(model)
    if hf:
        from transformers import DynamicCache

        cache = DynamicCache()
    else:
        cache = None  # the module's own presents, fed back as its past
    past = empty_past(program.annotations.kv_cache, ids.shape[0], 0, device=dev, dtype=_float_dtype(program))
    new, records, tol = ids, [], tolerance
    with torch.no_grad():
        for step in range(steps + 1):
            pos = (mask.cumsum(-1) - 1).clamp(min=0)[:, -new.shape[1]:]
            if hf:
                ref = model(input_ids=new, attention_mask=mask, position_ids=pos, **cache_kwarg(model, cache),
                            use_cache=True, return_dict=True).logits
            else:
                ref, cache = call_protocol(model, model, new, cache, mask, pos)
            out = program(step_inputs(new, mask, past))
            got = out["logits"]
            past = {k.removeprefix(f"{PRESENT}."): v for k, v in out.items() if k.startswith(f"{PRESENT}.")}
            tol = tol if tol is not None else dtype_tolerance(ref.dtype)
            diff = (got.float() - ref.float()).abs().max().item()
            rel = diff / max(ref.float().abs().max().item(), 1e-30)
            agree = (got.argmax(-1) == ref.argmax(-1)).float().mean().item()
            records.append({"step": step, "tokens": int(new.shape[1]), "max_abs_error": diff, "max_rel_error": rel,
                            "top1_agreement": agree})
            if rel > tol:
                raise VerificationError(f"the decoder program differs from the original at step {step} "
                                        f"({'prefill' if step == 0 else 'decode'} of {new.shape[1]} token(s), past "
                                        f"{mask.shape[1] - new.shape[1]}): max relative error {rel:.3g} > {tol:g}")
            new = ref[:, -1:].argmax(-1)
            mask = torch.cat([mask, torch.ones_like(new)], dim=1)
    return DecoderCheck(records, tol)
