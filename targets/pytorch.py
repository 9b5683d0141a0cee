"""PyTorch target: a ``.pt2`` ExportedProgram that ``torch.export.load`` runs without the original class.

A program with activation-checkpoint regions is not written here (export would inline them): it is
written as generated source with safetensors weights by ``targets/source.py``.

The program is re-exported with the same symbolic batch/sequence dimensions, saved with an
``evo_rewrite.json`` entry (source, applied pipeline) so the file is again a source, reloaded and run
at the example size and at another size against the in-memory program, and only then moved into
place (atomically: a temporary file in the same directory, then ``os.replace``).
"""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from pathlib import Path

import torch
import torch.utils._pytree as pytree
from torch.export import Dim

from evo_rewrite.errors import OutputError
from evo_rewrite.program import Program

from .paths import check_output_file, check_reproduces

__all__ = ["save_pt2", "export_program"]


def export_program(program: Program) -> torch.export.ExportedProgram:
    from evo_rewrite.passes.flash_backends import pinned_backend, unpin

    if any(pinned_backend(n) for n in program.graph.nodes):
        program = program.clone()
        program.meta["sdpa_backends"] = unpin(program.graph)
        program.module.recompile()
    flat, spec = pytree.tree_flatten((program.inputs.args, program.inputs.kwargs))
    dyn_flat = [{d: Dim.AUTO for d in dims} or None if isinstance(t, torch.Tensor) else None
                for t, dims in zip(flat, program.dynamic_dims + [{}] * (len(flat) - len(program.dynamic_dims)))]
    dyn_args, dyn_kwargs = pytree.tree_unflatten(dyn_flat, spec)
    gm = program.module
    # forward's parameters are the original argument names: positional first, then keywords
    names = gm.graph._codegen.pytree_info.orig_args
    dynamic_shapes = {**dict(zip(names, dyn_args)), **dyn_kwargs}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.export.export(gm, program.inputs.args, program.inputs.kwargs,
                                   dynamic_shapes=dynamic_shapes, strict=False)


def _metadata(program: Program) -> str:
    from evo_rewrite.passes.flash_backends import pinned_backend

    pinned = {}
    for n in program.graph.nodes:
        b = pinned_backend(n)
        if b:
            from evo_rewrite.pass_infra import module_path

            pinned[module_path(n)] = b
    s = program.source
    return json.dumps({"tool": "evo-rewrite", "source_kind": s.kind, "source": s.path, "model_class": s.model_class,
                       "hf_class": s.hf_class, "hf_config": s.hf_config, "applied": program.applied,
                       "dynamic_dims": program.dynamic_dims, "sdpa_backends": pinned,
                       "tensor_parallel": program.meta.get("tensor_parallel")}, default=str)


def _check_loaded(path: str, program: Program) -> None:
    loaded = torch.export.load(path).module()
    check_reproduces(program, lambda i: loaded(*i.args, **i.kwargs), "the saved .pt2")


def save_pt2(program: Program, path: str | os.PathLike, *, check: bool = True) -> str:
    """Write ``program`` to ``path`` atomically; return the path written."""
    from evo_rewrite.sources import METADATA_FILE

    from evo_rewrite.passes.checkpoint_regions import regions_of

    out = Path(path)
    if regions_of(program.module):
        raise OutputError(f"cannot write {out}: the program has activation-checkpoint regions, which a .pt2 would "
                          "silently drop (torch.export inlines them); write it as generated source with "
                          "evo_rewrite.targets.source.save_source(program, DIRECTORY) (RewriteResult.save and the CLI do so "
                          "for a path without .pt2)")
    parent = check_output_file(out, program.source.path, suffix=".pt2", what="another -o")
    ep = export_program(program)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp.pt2", dir=parent)
    os.close(fd)
    try:
        torch.export.save(ep, tmp, extra_files={METADATA_FILE: _metadata(program)})
        if check:
            _check_loaded(tmp, program)
        os.replace(tmp, out)
    except OSError as exc:
        raise OutputError(f"cannot write {out}: {exc.strerror or exc}") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return str(out)
