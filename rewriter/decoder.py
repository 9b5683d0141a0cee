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

Checking a decoder program compares logits, step by step, against the original with its own cache
(:func:`verify_decoder`: transformers' ``DynamicCache`` for Hugging Face models). For the pass
manager, whose verification inputs are fixed, :func:`run_with_own_cache` runs a program on decoder
inputs after building the past from the program itself (a prefill over a fixed prefix): a pass that
changes the cache's head count is then compared on logits alone, as it must be.
"""

from __future__ import annotations

import dataclasses
import re
import warnings

import torch
import torch.fx as fx

from .annotations import KVCacheLayout, LayerCache
from .errors import CaptureError, UsageError, VerificationError
from .inputs import Inputs
from .program import Program, SourceInfo

__all__ = ["cached_module", "capture_decoder", "is_causal_lm", "not_causal_lm_message", "decoder_inputs",
           "cache_layout", "sync_cache", "set_cache_heads", "is_decoder", "empty_past", "step_inputs", "run_with_own_cache",
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


def not_causal_lm_message(what: str, thing: str) -> str:
    return (f"{what} needs a causal language model with a KV cache, and {thing} is not one: Hugging Face "
            "*ForCausalLM / *LMHeadModel models (Llama, SmolLM2, Qwen2, Mistral, ...) qualify, or a program "
            "evo-rewrite captured from one with its cache (the default; not with --no-cache)")


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


def export_dynamic_shapes(program: Program):
    """torch.export's dynamic_shapes for re-exporting a decoder program (the pytorch target)."""
    return _dynamic_shapes(program.annotations.kv_cache)


def capture_decoder(model: torch.nn.Module, *, source: SourceInfo | None = None, log=None) -> Program:
    """Capture a Hugging Face causal LM as a decoder program (see the module docstring)."""
    from .graph_capture import _module_frame, program_from_exported

    if not is_causal_lm(model):
        raise UsageError(not_causal_lm_message("the decoder capture", type(model).__name__))
    source = source or SourceInfo(kind="module", model_class=type(model).__qualname__)
    was_training = model.training
    model.eval()
    try:
        layout = _probe(model)
        wrapper = cached_module(model)
        vocab = int(model.get_output_embeddings().weight.shape[0]) if model.get_output_embeddings() is not None \
            else int(model.config.vocab_size)
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
    and the original with its own cache (transformers' ``DynamicCache``); compare logits at every step.

    ``tolerance``: max |Δ| / max |ref| allowed at any step (default: the exact-pass tolerance of the
    logits' dtype); raises VerificationError naming the first step past it.
    """
    from transformers import DynamicCache

    from .verify import tolerance as dtype_tolerance

    if not is_decoder(program):
        raise UsageError(not_causal_lm_message("verify_decoder", "this program"))
    dev = _device(program)
    ids = input_ids.to(dev)
    mask = torch.ones_like(ids) if attention_mask is None else attention_mask.to(dev)
    cache = DynamicCache()
    past = empty_past(program.annotations.kv_cache, ids.shape[0], 0, device=dev, dtype=_float_dtype(program))
    new, records, tol = ids, [], tolerance
    with torch.no_grad():
        for step in range(steps + 1):
            pos = (mask.cumsum(-1) - 1).clamp(min=0)[:, -new.shape[1]:]
            ref = model(input_ids=new, attention_mask=mask, position_ids=pos, **cache_kwarg(model, cache),
                        use_cache=True, return_dict=True).logits
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
