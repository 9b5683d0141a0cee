"""Weights target: the program's tensors as one safetensors file, each tensor stored once.

A Hugging Face checkpoint cannot say that layers share weights (its config has no such field, and
``from_pretrained`` would untie them into per-layer copies), so after ``share-layers`` the weights go out
as a plain safetensors state dict of the program instead: keys are the program's get_attr targets
(``shared_layers.<container>.<set>.<name>`` for a shared tensor, ``<block>.<name>_res_u`` / ``_res_v`` for
residuals, module paths for the rest). A tensor the graph reads under several names (a tied output head)
is stored once under its first name; the others are listed in the file's metadata (``aliases``: name ->
stored name) and come back as the same tensor from ``load_safetensors``. The graph itself travels in the
``.pt2`` (or generated source); this file is for tools that want only the weights::

    from evo_rewrite.targets.weights import save_safetensors, load_safetensors
    save_safetensors(result.program, "model.safetensors")
    state = load_safetensors("model.safetensors")      # {name: tensor}, aliases share one tensor
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import ClassVar

import torch

from evo_rewrite.errors import OutputError, VerificationError
from evo_rewrite.figures import _storage_key
from evo_rewrite.program import Program
from evo_rewrite.target_infra import Target, TargetReport, emit, register_target

__all__ = ["SafetensorsTarget", "save_safetensors", "load_safetensors", "unique_tensors"]

FORMAT = "evo-rewrite-weights/1"


def _safetensors():
    try:
        import safetensors.torch as st
    except ImportError:
        raise OutputError("writing safetensors weights needs safetensors: pip install 'evo-rewrite[hf]' "
                          "(or pip install safetensors)") from None
    return st


def unique_tensors(program: Program) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(stored: name -> tensor, one per distinct tensor; aliases: other name -> stored name)."""
    stored: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    first: dict = {}
    for name, t in program.named_tensors().items():
        key = _storage_key(t)
        if key in first:
            aliases[name] = first[key]
        else:
            first[key] = name
            stored[name] = t
    return stored, aliases


@register_target
@dataclasses.dataclass(frozen=True)
class SafetensorsTarget(Target):
    """The program's tensors as one safetensors file, each distinct tensor once (shared layers stay shared)."""

    name: ClassVar[str] = "safetensors"
    summary: ClassVar[str] = "the program's weights as one safetensors file, each tensor once (aliases in its metadata)"
    suffix: ClassVar[str] = ".safetensors"

    def write(self, program: Program, path: Path) -> TargetReport:
        st = _safetensors()
        stored, aliases = unique_tensors(program)
        state, seen = {}, set()
        for name, t in stored.items():
            t = t.detach().cpu().contiguous()
            ptr = t.untyped_storage().data_ptr()
            state[name] = t.clone() if ptr in seen else t  # distinct views of one storage: stored apart
            seen.add(ptr)
        meta = {"format": FORMAT, "aliases": json.dumps(aliases), "applied": json.dumps(program.applied)}
        st.save_file(state, str(path), metadata=meta)
        return TargetReport(notes=[f"{len(stored)} tensors, {len(aliases)} aliases"] if aliases else [])

    def check(self, program: Program, path: Path, report: TargetReport) -> None:
        got = load_safetensors(path)
        for name, t in program.named_tensors().items():
            if name not in got or not torch.equal(got[name], t.detach().cpu()):
                raise VerificationError(f"the written safetensors file does not hold {name} as the program does")


def save_safetensors(program: Program, path: str | os.PathLike) -> str:
    """Write the program's tensors to ``path`` (.safetensors), each distinct tensor once; return the path."""
    return emit(program, SafetensorsTarget(), path).path


def load_safetensors(path: str | os.PathLike, device: str = "cpu") -> dict[str, torch.Tensor]:
    """The state dict written by ``save_safetensors``: every name, aliases pointing at the stored tensor."""
    st = _safetensors()
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    state = st.load_file(str(path), device=device)
    for name, target in json.loads(meta.get("aliases", "{}")).items():
        state[name] = state[target]
    return state
