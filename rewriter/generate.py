"""Token generation with a decoder program (rewriter/decoder.py): ``evo_rewrite.generate``.

The program runs once over the prompt (prefill) and then once per new token. Two caches
(docs/generate.md):

``cache="dynamic"`` (CPU default)
    buffers ``(B, Hkv, prompt + max_new, D)`` per layer and per K/V, allocated once; the program itself
    runs each step, its past a view of the buffer's first P positions, and the present's new position is
    copied back. The program appends with ``cat(past, new)``, so every step copies the past: work per
    step grows with P. This is the program as verified, the reference for the other path.
``cache="static"`` (CUDA default)
    the in-place step (rewriter/static_cache.py): derived once per program (the program is untouched),
    it writes each new K/V into its buffer slot with ``index_copy_`` and attends over the whole buffer
    with a mask that is 1 on the written slots. Every decode step has the same shapes and the same
    buffers (marked static for dynamo), so it runs under ``torch.compile`` (``compile=True``: mode
    ``reduce-overhead``, CUDA graphs, on CUDA) without recompiling. The step and its buffers are kept
    with the program for the next call (a buffer at least as long as needed is reused), as
    transformers keeps its StaticCache.

Masked slots add exact zeros, so greedy tokens are those of the dynamic path. Greedy decoding
(``do_sample=False``) picks the argmax, as transformers' ``generate`` does, so an exact pipeline
reproduces transformers' tokens; sampling applies ``temperature`` then nucleus (``top_p``)
filtering. Rows that produced ``eos_token_id`` continue with ``pad_token_id``; generation stops
when every row has finished.
"""

from __future__ import annotations

import dataclasses
import os
import weakref
from typing import Any, Callable

import torch

from .decoder import (PAST, PRESENT, capture_decoder, is_causal_lm, is_decoder, not_causal_lm_message, reads_mask,
                      takes_cache)
from .errors import UsageError
from .program import Program, SourceInfo
from .static_cache import InPlaceStep, inplace_step, storage_dtypes

__all__ = ["generate", "decoder_program", "generate_text", "static_step"]

CACHE_MODES = ("dynamic", "static")


def decoder_program(model_or_path: Any, *, device: str | torch.device = "cpu", log=None) -> Program:
    """A decoder program from a Program, a RewriteResult, a path (.pt2 or any SOURCE) or a causal-LM module (a
    Hugging Face ``*ForCausalLM`` or a module that follows the cache protocol of rewriter/decoder.py)."""
    obj = getattr(model_or_path, "program", model_or_path)  # a RewriteResult
    if isinstance(obj, Program):
        program = obj
    elif isinstance(obj, torch.nn.Module):
        if not takes_cache(obj):
            raise UsageError(not_causal_lm_message("generate", type(obj).__name__))
        info = SourceInfo(kind="module", model_class=type(obj).__qualname__)
        if is_causal_lm(obj):
            info.hf_config, info.hf_class = obj.config.to_dict(), type(obj).__name__
        program = capture_decoder(obj.to(device), source=info, log=log)
    elif isinstance(obj, (str, os.PathLike)):
        from .sources import load

        loaded = load(obj, device=device)
        if loaded.program is not None:
            program = loaded.program
        elif loaded.model is not None and takes_cache(loaded.model):
            program = capture_decoder(loaded.model, source=loaded.source, log=log)
        else:
            raise UsageError(not_causal_lm_message("generate", str(obj)))
    else:
        raise UsageError(f"generate takes a Program, a RewriteResult, a path or a causal-LM module, not "
                         f"{type(obj).__name__}")
    if not is_decoder(program):
        raise UsageError(not_causal_lm_message("generate", "this program (captured without its cache)"))
    program.module.to(device)
    return program


def _pick(logits: torch.Tensor, do_sample: bool, temperature: float, top_p: float, generator) -> torch.Tensor:
    """(B, V) logits of the last position -> (B,) next tokens."""
    if not do_sample:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_p < 1.0:
        sorted_logits, order = logits.sort(-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) > top_p  # keep the smallest set whose mass reaches top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


@dataclasses.dataclass
class _Static:
    """A program's in-place step, kept with the program (its module) between generate calls."""

    code: str  # the program module's code when the step was derived (a changed graph derives it again)
    device: torch.device
    step: InPlaceStep
    buffers: dict[str, torch.Tensor] | None = None
    compiled: dict = dataclasses.field(default_factory=dict)  # compile argument -> compiled step module

    def buffers_for(self, batch: int, length: int) -> dict[str, torch.Tensor]:
        """Zeroed cache buffers of ``batch`` rows and at least ``length`` positions (the kept ones when they
        fit: the same tensors at the same addresses, as a compiled step and its CUDA graphs want)."""
        bufs = self.buffers
        first = next(iter(bufs.values())) if bufs else None
        if first is not None and first.shape[0] == batch and first.shape[2] >= length:
            for t in bufs.values():
                t.zero_()
            return bufs
        self.buffers = None  # free the old ones first
        bufs = self.step.allocate(batch, length, self.device)
        for t in bufs.values():
            torch._dynamo.mark_static_address(t)
        self.buffers = bufs
        return bufs

    def compiled_step(self, compile) -> Callable:
        if compile not in self.compiled:
            kw = ({"mode": "reduce-overhead"} if self.device.type == "cuda" else {}) if compile is True \
                else {"backend": compile}
            self.compiled[compile] = torch.compile(self.step.module, fullgraph=True, dynamic=False, **kw)
        return self.compiled[compile]


_STATIC: "weakref.WeakKeyDictionary[torch.nn.Module, _Static]" = weakref.WeakKeyDictionary()


def static_step(program: Program) -> _Static:
    """The program's in-place step (rewriter/static_cache.py) with its kept buffers and compiled forms."""
    module = program.module
    dev = next((t.device for t in module.parameters()), torch.device("cpu"))
    state = _STATIC.get(module)
    if state is None or state.code != module.code or state.device != dev:
        state = _Static(module.code, dev, inplace_step(program))
        _STATIC[module] = state
    return state


def generate(model_or_path: Any, input_ids: torch.Tensor, max_new_tokens: int = 32, *,
             attention_mask: torch.Tensor | None = None, device: str | torch.device | None = None,
             do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0,
             eos_token_id: int | list[int] | None = None, pad_token_id: int | None = None,
             cache: str | None = None, compile: bool | str | Callable = False, seed: int | None = None,
             log=None) -> torch.Tensor:
    """Generate up to ``max_new_tokens`` tokens after ``input_ids`` (B, S); return (B, S + new) token ids.

    ``model_or_path``: a decoder Program or RewriteResult, a ``.pt2`` an evo-rewrite run wrote from a causal
    LM, a Hugging Face directory or causal-LM module (captured with its cache first). ``attention_mask``:
    for left-padded batches (1 = token, 0 = padding). ``eos_token_id``/``pad_token_id``: default from the
    source's Hugging Face config. ``cache``: ``"dynamic"`` or ``"static"`` (see the module docstring; default
    static on CUDA or when compiling, else dynamic).
    ``compile``: run the static cache's decode step under ``torch.compile`` (``True``: inductor, with
    ``mode="reduce-overhead"``, i.e. CUDA graphs, on CUDA; a string or callable: that ``torch.compile`` backend).
    """
    if max_new_tokens < 1:
        raise UsageError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if do_sample and not (temperature > 0):
        raise UsageError(f"temperature must be > 0 when sampling, got {temperature}")
    if not 0 < top_p <= 1:
        raise UsageError(f"top_p must lie in (0, 1], got {top_p}")
    input_ids = torch.as_tensor(input_ids)
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    if device is None:
        device = input_ids.device if input_ids.device.type != "cpu" else "cpu"
    program = decoder_program(model_or_path, device=device, log=log)
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    masked = reads_mask(program)  # a cache-protocol module without a mask cannot hide slots or padding
    cache = cache or ("static" if (dev.type == "cuda" or compile is not False) and masked else "dynamic")
    if cache not in CACHE_MODES:
        raise UsageError(f"cache must be one of {', '.join(CACHE_MODES)}, not {cache!r}")
    if cache == "static" and not masked:
        raise UsageError("cache='static' hides the buffer's unwritten slots with attention_mask, which this program "
                         "ignores (its module takes no attention_mask): use cache='dynamic' (without compile)")
    if not masked and attention_mask is not None and not bool(torch.as_tensor(attention_mask).bool().all()):
        raise UsageError("attention_mask has padding, which this program ignores (its module takes no attention_mask): "
                         "generate rows of one length, without padding")
    if compile is not False and cache != "static":
        raise UsageError("compile needs cache='static' (every decode step the same shapes)")
    cfg = program.source.hf_config or {}
    eos = cfg.get("eos_token_id") if eos_token_id is None else eos_token_id
    eos = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
    pad = pad_token_id if pad_token_id is not None else (cfg.get("pad_token_id") if cfg.get("pad_token_id") is not None
                                                          else (eos[0] if eos else 0))
    gen = torch.Generator(device=dev).manual_seed(seed) if seed is not None else None

    ids = input_ids.to(dev)
    b, s = ids.shape
    mask = (torch.ones_like(ids) if attention_mask is None else attention_mask.to(dev)).long()
    total = s + max_new_tokens
    window = cfg.get("sliding_window") if cfg.get("use_sliding_window", True) is not False else None
    if cache == "static" and isinstance(window, int) and total > window:
        raise UsageError(f"cache='static' attends over the whole buffer, which needs prompt + max_new_tokens "
                         f"({total}) <= the model's sliding window ({window}); use cache='dynamic'")
    out = torch.full((b, total), pad, dtype=ids.dtype, device=dev)
    out[:, :s] = ids
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    eos_t = torch.tensor(eos, device=dev) if eos else None
    module = program.module

    with torch.no_grad():
        if cache == "static":
            state = static_step(program)
            step = state.step
            bufs = state.buffers_for(b, total)
            length = next(iter(bufs.values())).shape[2]
            if log:
                log(f"static cache: {len(bufs)} buffers of {length} positions, "
                    f"{step.bytes_per_token() * b * length / 2**20:.1f} MiB, written in place")
            full_mask = torch.zeros(b, length, dtype=torch.long, device=dev)
            # prefill through the in-place step on views of the prompt's slots (exact: see static_cache.py)
            logits = step(ids, mask, positions.contiguous(), torch.arange(s, device=dev),
                          {k: v[:, :, :s] for k, v in bufs.items()})
            decode = state.compiled_step(compile) if compile is not False else step.module
            mark = compile is True and dev.type == "cuda"
            flat = [bufs[k] for k in step.names]
            slot = torch.full((1,), s, dtype=torch.long, device=dev)  # the buffer slot of the next token
        else:
            dtypes = storage_dtypes(program)
            fallback = next((t.dtype for t in module.parameters() if t.is_floating_point()), torch.float32)
            bufs = {f"{i}.{kind}": torch.zeros(b, c.kv_heads, total, c.head_dim, device=dev,
                                               dtype=dtypes.get(f"{i}.{kind}", fallback))
                    for i, c in enumerate(program.annotations.kv_cache.layers) for kind in ("key", "value")}
            full_mask = torch.zeros(b, total, dtype=torch.long, device=dev)
            res = module(input_ids=ids, attention_mask=mask, position_ids=positions.contiguous(),
                         **{PAST: {k: v[:, :, :0] for k, v in bufs.items()}})
            _store(bufs, res, 0, s)
            logits = res["logits"]
        full_mask[:, :s] = mask
        next_pos = positions[:, -1:] + 1
        finished = torch.zeros(b, dtype=torch.bool, device=dev)
        n = s  # positions written
        for i in range(max_new_tokens):
            tok = _pick(logits[:, -1], do_sample, temperature, top_p, gen)
            if eos:
                tok = torch.where(finished, torch.full_like(tok, pad), tok)
            out[:, n] = tok
            full_mask[:, n] = 1
            if eos:
                finished |= torch.isin(tok, eos_t)
            n += 1
            if i == max_new_tokens - 1 or (eos and bool(finished.all())):
                break
            if cache == "dynamic":
                res = module(input_ids=tok[:, None], attention_mask=full_mask[:, :n], position_ids=next_pos,
                             **{PAST: {k: v[:, :, :n - 1] for k, v in bufs.items()}})
                _store(bufs, res, n - 1, n)
                logits = res["logits"]
            else:  # the new token goes to its slot, n - 1; the mask is 1 on the slots 0..n-1 that are not padding
                if mark:
                    torch.compiler.cudagraph_mark_step_begin()
                logits = decode(tok[:, None], full_mask, next_pos, *flat, slot)
                slot += 1
            next_pos = next_pos + 1
    return out[:, :n]


def _store(bufs: dict, res: dict, start: int, stop: int) -> None:
    """Copy the present's last stop - start positions into the buffers' [start, stop)."""
    for k, buf in bufs.items():
        present = res[f"{PRESENT}.{k}"]
        buf[:, :, start:stop] = present[:, :, present.shape[2] - (stop - start):]


def generate_text(program: Program, prompt: str, tokenizer: str | os.PathLike | None, max_new_tokens: int = 32,
                  device: str = "cpu") -> str:
    """The CLI's ``--generate``: tokenize ``prompt`` with the tokenizer in directory ``tokenizer`` (the Hugging
    Face source's, or ``--tokenizer``), generate greedily, return the decoded continuation."""
    from pathlib import Path

    if not is_decoder(program):
        raise UsageError(not_causal_lm_message("--generate", "this program (captured without its cache)"))
    d = Path(str(tokenizer)) if tokenizer else None
    if d is None or not d.is_dir() or not any((d / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json",
                                                                         "tokenizer.model", "vocab.json")):
        raise UsageError(f"--generate needs a tokenizer: {tokenizer} is not a directory with tokenizer files; give "
                         "--tokenizer DIR (the Hugging Face model directory the program came from)")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(d), local_files_only=True)
    ids = tok(prompt, return_tensors="pt")["input_ids"]
    out = generate(program, ids, max_new_tokens=max_new_tokens, device=device)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
