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

import json
import os
import tempfile
from pathlib import Path

import torch

from evo_rewrite.errors import OutputError
from evo_rewrite.figures import _storage_key
from evo_rewrite.program import Program

from .paths import check_output_file

__all__ = ["save_safetensors", "load_safetensors", "unique_tensors"]

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


def save_safetensors(program: Program, path: str | os.PathLike) -> str:
    """Write the program's tensors to ``path`` (.safetensors), each distinct tensor once; return the path."""
    st = _safetensors()
    out = Path(path)
    parent = check_output_file(out, program.source.path, suffix=".safetensors", what="another path")
    stored, aliases = unique_tensors(program)
    state, seen = {}, set()
    for name, t in stored.items():
        t = t.detach().cpu().contiguous()
        ptr = t.untyped_storage().data_ptr()
        state[name] = t.clone() if ptr in seen else t  # distinct views of one storage: stored apart
        seen.add(ptr)
    meta = {"format": FORMAT, "aliases": json.dumps(aliases), "applied": json.dumps(program.applied)}
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp.safetensors", dir=parent)
    os.close(fd)
    try:
        st.save_file(state, tmp, metadata=meta)
        os.replace(tmp, out)
    except OSError as exc:
        raise OutputError(f"cannot write {out}: {exc.strerror or exc}") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return str(out)


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
