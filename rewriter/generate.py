"""Token generation with a decoder program (rewriter/decoder.py): ``evo_rewrite.generate``.

The program runs once over the prompt (prefill, past length 0) and then once per new token, its
cache held in buffers allocated once for the whole generation (``(B, Hkv, prompt + max_new, D)`` per
layer and per K/V) — nothing grows or is reallocated between steps. Two ways to feed the buffers:

``cache="dynamic"`` (CPU default)
    the past is a view of the buffer's first P positions; the program returns the present
    (P + 1 positions) and the new position is copied into the buffer. Work per step grows with P.
``cache="static"`` (CUDA default)
    the past is the *whole* buffer, with the attention mask zero over the positions not yet written,
    so every decode step has the same shapes: the step can run under ``torch.compile``
    (``compile=True``: mode ``reduce-overhead``, CUDA graphs). Masked positions add exact zeros, so
    greedy tokens are those of the dynamic form.

Greedy decoding (``do_sample=False``) picks the argmax, as transformers' ``generate`` does, so an
exact pipeline reproduces transformers' tokens; sampling applies ``temperature`` then nucleus
(``top_p``) filtering. Rows that produced ``eos_token_id`` continue with ``pad_token_id``; generation
stops when every row has finished.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from .decoder import PAST, PRESENT, capture_decoder, is_causal_lm, is_decoder, not_causal_lm_message, takes_cache
from .errors import UsageError
from .program import Program, SourceInfo

__all__ = ["generate", "decoder_program", "generate_text"]

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


def generate(model_or_path: Any, input_ids: torch.Tensor, max_new_tokens: int = 32, *,
             attention_mask: torch.Tensor | None = None, device: str | torch.device | None = None,
             do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0,
             eos_token_id: int | list[int] | None = None, pad_token_id: int | None = None,
             cache: str | None = None, compile: bool = False, seed: int | None = None, log=None) -> torch.Tensor:
    """Generate up to ``max_new_tokens`` tokens after ``input_ids`` (B, S); return (B, S + new) token ids.

    ``model_or_path``: a decoder Program or RewriteResult, a ``.pt2`` an evo-rewrite run wrote from a causal
    LM, a Hugging Face directory or causal-LM module (captured with its cache first). ``attention_mask``:
    for left-padded batches (1 = token, 0 = padding). ``eos_token_id``/``pad_token_id``: default from the
    source's Hugging Face config. ``cache``: ``"dynamic"`` or ``"static"`` (see the module docstring).
    ``compile``: run the decode step under ``torch.compile`` (static cache; CUDA graphs on CUDA).
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
    cache = cache or ("static" if dev.type == "cuda" else "dynamic")
    if cache not in CACHE_MODES:
        raise UsageError(f"cache must be one of {', '.join(CACHE_MODES)}, not {cache!r}")
    if compile and cache != "static":
        raise UsageError("compile=True needs cache='static' (every decode step the same shapes)")
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
    layout = program.annotations.kv_cache
    dtype = next((t.dtype for t in program.module.parameters() if t.is_floating_point()), torch.float32)
    bufs = {f"{i}.{kind}": torch.zeros(b, c.kv_heads, total, c.head_dim, dtype=dtype, device=dev)
            for i, c in enumerate(layout.layers) for kind in ("key", "value")}
    out = torch.full((b, total), pad, dtype=ids.dtype, device=dev)
    out[:, :s] = ids
    full_mask = torch.zeros(b, total, dtype=torch.long, device=dev)
    full_mask[:, :s] = mask
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    module = program.module

    def run(new_ids, step_mask, pos, past):
        return module(input_ids=new_ids, attention_mask=step_mask, position_ids=pos, **{PAST: past})

    step_fn = torch.compile(run, mode="reduce-overhead" if dev.type == "cuda" else None, dynamic=False) \
        if compile else run

    finished = torch.zeros(b, dtype=torch.bool, device=dev)
    n = s  # positions written
    with torch.no_grad():
        empty = {k: v[:, :, :0] for k, v in bufs.items()}
        res = run(ids, mask, positions.contiguous(), empty)
        _store(bufs, res, 0, s, 0)
        next_pos = positions[:, -1:] + 1
        for step in range(max_new_tokens):
            tok = _pick(res["logits"][:, -1], do_sample, temperature, top_p, gen)
            if eos:
                tok = torch.where(finished, torch.full_like(tok, pad), tok)
            out[:, n] = tok
            full_mask[:, n] = 1
            if eos:
                finished |= torch.isin(tok, torch.tensor(eos, device=dev))
            n += 1
            if step == max_new_tokens - 1 or (eos and bool(finished.all())):
                break
            if cache == "dynamic":
                past = {k: v[:, :, :n - 1] for k, v in bufs.items()}
                res = run(tok[:, None], full_mask[:, :n], next_pos, past)
                _store(bufs, res, n - 1, n, n - 1)
            else:  # the whole buffer with its unwritten tail masked, then the new token at the end
                step_mask = torch.cat([full_mask[:, :total], torch.ones_like(full_mask[:, :1])], 1)
                step_mask[:, n - 1] = 0  # the new token sits at the end, not at its buffer slot yet
                res = step_fn(tok[:, None], step_mask, next_pos, bufs)
                _store(bufs, res, n - 1, n, total)
            next_pos = next_pos + 1
    return out[:, :n]


def _store(bufs: dict, res: dict, start: int, stop: int, src: int) -> None:
    """Copy the present's new positions [src, src + stop - start) into the buffers' [start, stop)."""
    for k, buf in bufs.items():
        present = res[f"{PRESENT}.{k}"]
        buf[:, :, start:stop] = present[:, :, src:src + stop - start]


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
