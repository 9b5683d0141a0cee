"""SDPA backend choice for the `flash` pass: measure once per site signature, check numerics, pin.

On CUDA each candidate backend (cuDNN, FlashAttention-2, memory-efficient) is run in the exact form
the emitted program will use — the backend's own ATen op (``aten._scaled_dot_product_*_attention``)
— at the site's heads, head dim, dtype, mask kind and causality, at several sequence lengths
(including an odd one, since a pinned kernel gets no dispatcher fallback), checked against the math
backend, and timed with CUDA events. The fastest correct candidate is pinned into the graph; the
choice is cached per signature, device and torch version. On CPU, or with ``backend=default``, the
site keeps ``aten.scaled_dot_product_attention`` and PyTorch's dispatcher picks per call.

The programs evo-rewrite captures are full-sequence forwards (prefill and training shapes: query
length equals key length), so that is the regime measured. A decode step (one query, a growing
cache) is a different regime: there cuDNN builds a new plan per new key length, which is why the
measurement also charges each candidate the cost of its first call at a new length.
"""

from __future__ import annotations

import dataclasses
import time

import torch
import torch.fx as fx
import torch.nn.functional as F

from evo_rewrite.sdpa import PINNED, call_pinned, pin  # noqa: F401 - pin: the flash pass pins through this module

CHOICES = ("auto", "default", "cudnn", "flash", "efficient")
_TOL = {torch.float16: 5e-3, torch.bfloat16: 3e-2, torch.float32: 1e-4}
_CACHE: dict[tuple, "Choice"] = {}


@dataclasses.dataclass(frozen=True)
class Signature:
    heads: int
    kv_heads: int
    head_dim: int
    dtype: torch.dtype
    mask: str  # "none", "causal", "key-padding" (B,1,1,S), "full" (…,S,S)
    gqa: bool


@dataclasses.dataclass
class Choice:
    backend: str  # "default" or a key of PINNED
    ms: dict[str, float]  # mean forward ms over the measured lengths, per candidate
    rejected: dict[str, str]  # candidate -> why it was not usable


def _inputs(sig: Signature, batch: int, seq: int, device):
    g = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(batch, sig.heads, seq, sig.head_dim, device=device, dtype=sig.dtype, generator=g)
    k = torch.randn(batch, sig.kv_heads, seq, sig.head_dim, device=device, dtype=sig.dtype, generator=g)
    v = torch.randn(batch, sig.kv_heads, seq, sig.head_dim, device=device, dtype=sig.dtype, generator=g)
    mask = None
    if sig.mask == "key-padding":
        mask = torch.zeros(batch, 1, 1, seq, device=device, dtype=sig.dtype)
        mask[-1, ..., seq - seq // 4:] = torch.finfo(sig.dtype).min
    elif sig.mask == "full":
        mask = torch.randn(batch, 1, seq, seq, device=device, dtype=sig.dtype, generator=g)
    return q, k, v, mask


def time_ms(fn, iters: int = 10) -> float:
    """Mean milliseconds of ``iters`` calls after 3 warm-ups, timed with CUDA events."""
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def choose(sig: Signature, device, batch: int, seqs=(509, 1024, 2048), regime: str = "fixed") -> Choice:
    """Measure every candidate for ``sig`` on ``device``; cached per signature/device/torch version.

    ``regime="fixed"``: shapes repeat (prefill/training batches of a few lengths), so a backend is
    judged by its steady-state time. ``regime="varying"``: every call brings a new length (decode
    with a growing cache), so the first call at a new length (cuDNN builds a plan) is charged to
    every call. PyTorch's own dispatcher ("default") is kept unless a pinned backend beats it by 3%.
    """
    key = (sig, torch.cuda.get_device_name(device), torch.__version__, batch, tuple(seqs), regime)
    if key in _CACHE:
        return _CACHE[key]
    causal = sig.mask == "causal"
    ms: dict[str, float] = {}
    rejected: dict[str, str] = {}
    for name in ["default", *PINNED]:
        _, takes_mask = PINNED.get(name, (None, True))
        if sig.mask in ("key-padding", "full") and not takes_mask:
            rejected[name] = "cannot take an attention mask"
            continue
        if sig.gqa and name != "default":
            rejected[name] = "no grouped K/V heads (would need the repeat materialised)"
            continue
        total = 0.0
        try:
            for seq in seqs:
                q, k, v, mask = _inputs(sig, batch, seq, device)
                scale = sig.head_dim ** -0.5
                with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
                    ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), mask if mask is None else mask.float(),
                                                         is_causal=causal, scale=scale, enable_gqa=sig.gqa)
                if name == "default":
                    fn = lambda: F.scaled_dot_product_attention(q, k, v, mask, is_causal=causal, scale=scale, enable_gqa=sig.gqa)  # noqa: E731
                else:
                    fn = lambda: call_pinned(name, q, k, v, mask, 0.0, causal, scale)  # noqa: E731, B023
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                out = fn()  # first call at this length (plan building, autotuning)
                torch.cuda.synchronize()
                first_ms = (time.perf_counter() - t0) * 1e3
                err = float((out.float() - ref).abs().max() / ref.abs().max().clamp_min(1e-6))
                if not torch.isfinite(out).all() or err > _TOL.get(sig.dtype, 1e-4):
                    raise RuntimeError(f"numerics off at S={seq}: max rel error {err:.3g}")
                steady = time_ms(fn)
                total += steady + (max(first_ms - steady, 0.0) if regime == "varying" else 0.0)
            ms[name] = total / len(seqs)
        except Exception as exc:  # noqa: BLE001 - an unusable backend is a rejected candidate
            rejected[name] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''}"
    best = min(ms, key=ms.get) if ms else "default"
    if "default" in ms and ms[best] > 0.97 * ms["default"]:
        best = "default"
    choice = Choice(best, ms, rejected)
    _CACHE[key] = choice
    return choice


def signature(node: fx.Node) -> Signature | None:
    """The backend-relevant signature of a 4-D SDPA node, or None when it cannot be pinned."""
    q, k = node.args[0].meta.get("val"), node.args[1].meta.get("val")
    mask = node.args[3] if len(node.args) > 3 else None
    if q is None or k is None or q.dim() != 4:
        return None
    try:
        heads, kv_heads, head_dim = int(q.shape[1]), int(k.shape[1]), int(q.shape[-1])
    except (TypeError, ValueError):
        return None
    if mask is None:
        kind = "causal" if (len(node.args) > 5 and node.args[5]) else "none"
    else:
        mv = mask.meta.get("val")
        kind = "key-padding" if mv is not None and mv.dim() == 4 and mv.shape[-2] == 1 else "full"
    return Signature(heads, kv_heads, head_dim, q.dtype, kind, bool(node.kwargs.get("enable_gqa")))
