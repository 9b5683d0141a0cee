"""The model's figures for the report: parameters, unique weight bytes, KV-cache bytes, attention sites."""

from __future__ import annotations

import dataclasses

import torch

from .attention import find_attention
from .program import Program

__all__ = ["Figures", "figures"]


@dataclasses.dataclass
class Figures:
    parameters: int  # unique floating-point parameter elements (tied weights counted once)
    weight_bytes: int  # unique bytes of every tensor the graph reads (parameters and buffers)
    kv_cache_bytes_per_token: int | None  # K and V bytes stored per token, summed over attention sites
    attention_sites: int
    softmaxes: int

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def _storage_key(t: torch.Tensor):
    try:
        return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)
    except (RuntimeError, NotImplementedError):
        return id(t)


def figures(program: Program) -> Figures:
    tensors = program.named_tensors()
    params = 0
    seen_params, seen_storage = set(), {}
    for t in tensors.values():
        key = _storage_key(t)
        if isinstance(t, torch.nn.Parameter) and key not in seen_params:
            seen_params.add(key)
            params += t.numel()
        try:
            st = t.untyped_storage()
            seen_storage[st.data_ptr()] = max(seen_storage.get(st.data_ptr(), 0), st.nbytes())
        except (RuntimeError, NotImplementedError):
            seen_storage[id(t)] = t.numel() * t.element_size()
    reports = find_attention(program.module)
    sites = [r.site for r in reports if r.site is not None]
    kv = 0
    for s in sites:
        dt = s.v.meta.get("val").dtype if s.v.meta.get("val") is not None else torch.float32
        b = s.kv_bytes_per_token(torch.empty((), dtype=dt).element_size())
        if b is None:
            kv = None
            break
        kv += b
    return Figures(params, sum(seen_storage.values()), kv if sites else 0, len(sites), len(reports))
