"""PyTorch target: a ``.pt2`` ExportedProgram that ``torch.export.load`` runs without the original class.

A program with activation-checkpoint regions (its ``CheckpointRegions`` annotation) is written as a
directory of generated source with safetensors weights instead (``targets/source.py``): export would
inline the regions.

The program is re-exported with the same symbolic batch/sequence dimensions, saved with an
``evo_rewrite.json`` entry (``evo_rewrite.annotations.write_metadata``: source, applied pipeline,
annotations) so the file is again a source, reloaded and run at the example size and at another size
against the in-memory program, and only then moved into place (``evo_rewrite.target_infra.emit``).
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from pathlib import Path
from typing import ClassVar

import torch
import torch.utils._pytree as pytree
from torch.export import Dim

from evo_rewrite.annotations import METADATA_FILE, write_metadata
from evo_rewrite.decoder import export_dynamic_shapes
from evo_rewrite.graph_capture import AUTO_FROM_ONE, widen_size_one
from evo_rewrite.errors import OutputError
from evo_rewrite.program import Program
from evo_rewrite.sdpa import portable
from evo_rewrite.target_infra import Target, TargetReport, emit, register_target

from .paths import check_reproduces

__all__ = ["PyTorchTarget", "save_pt2", "export_program", "load_sharing_weights"]


def export_program(program: Program) -> torch.export.ExportedProgram:
    """Re-export the program with its symbolic dimensions (portable SDPA calls: see evo_rewrite.sdpa)."""
    program = portable(program)
    flat, spec = pytree.tree_flatten((program.inputs.args, program.inputs.kwargs))
    all_dims = program.dynamic_dims + [{}] * (len(flat) - len(program.dynamic_dims))
    example_args, example_kwargs = program.inputs.args, program.inputs.kwargs
    hint = Dim.AUTO
    if program.annotations.kv_cache is None:
        wide, changed = widen_size_one(flat, [list(d) for d in all_dims])
        if changed:  # a size-1 example: export at size 2 so the dimension stays symbolic (and still accepts 1)
            example_args, example_kwargs = pytree.tree_unflatten(wide, spec)
            hint = AUTO_FROM_ONE
    dyn_flat = [{d: hint for d in dims} or None if isinstance(t, torch.Tensor) else None
                for t, dims in zip(flat, all_dims)]
    dyn_args, dyn_kwargs = pytree.tree_unflatten(dyn_flat, spec)
    gm = program.module
    # forward's parameters are the original argument names: positional first, then keywords
    names = gm.graph._codegen.pytree_info.orig_args
    dynamic_shapes = {**dict(zip(names, dyn_args)), **dyn_kwargs}
    if program.annotations.kv_cache is not None:  # a decoder: named lengths, the past may be empty (prefill)
        dynamic_shapes = export_dynamic_shapes(program)
    # keyword inputs stay keywords: torch.export.load's module checks calls against the exported spec, so a .pt2
    # accepts either keywords (a tokenizer's output) or positions, not both; evo_rewrite.load accepts both
    example_args, example_kwargs = tuple(example_args), dict(example_kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.export.export(gm, example_args, example_kwargs, dynamic_shapes=dynamic_shapes, strict=False)


@register_target
@dataclasses.dataclass(frozen=True)
class PyTorchTarget(Target):
    """A .pt2 ExportedProgram; generated source + safetensors when the program has checkpoint regions."""

    name: ClassVar[str] = "pytorch"
    summary: ClassVar[str] = (".pt2 ExportedProgram (torch.export.load runs it without the original class); a directory "
                              "of generated source + safetensors when the program has checkpoint regions")
    suffix: ClassVar[str] = ".pt2"

    def validate(self, program: Program | None, out: Path | None = None) -> None:
        if program is not None and out is not None and self.is_directory(program) and out.suffix == ".pt2":
            raise OutputError(f"{out}: a program with activation-checkpoint regions is written as a directory of "
                              "generated source and safetensors weights (a .pt2 would silently drop the regions: "
                              f"torch.export inlines them); give a directory path, e.g. {out.with_suffix('')}")

    def is_directory(self, program: Program) -> bool:
        return program.annotations.checkpoint is not None

    def output_name(self, program: Program, stem: str) -> str:
        return f"{stem}.rewritten" + ("" if self.is_directory(program) else ".pt2")

    def write(self, program: Program, path: Path) -> TargetReport:
        if self.is_directory(program):
            from .source import write_source

            write_source(program, path)
            return TargetReport(notes=["generated source + safetensors: the program has checkpoint regions, which "
                                       "a .pt2 would drop"])
        ep = export_program(program)
        torch.export.save(ep, str(path), extra_files={METADATA_FILE: write_metadata(program)})
        return TargetReport()

    @classmethod
    def can_read(cls, path: Path) -> bool:
        from .source import is_source_dir

        return is_source_dir(path)

    read_runs_code: ClassVar[bool] = True  # read executes the directory's model.py: the loader asks for --trust-code

    @classmethod
    def read(cls, path: Path) -> Program:
        """Rebuild the program from a generated-source directory: executes its ``model.py`` after checking its
        SHA-256 against the one recorded when it was written (the caller has the user's consent)."""
        from .source import load_source

        return load_source(path)[0]

    def check(self, program: Program, path: Path, report: TargetReport) -> None:
        if self.is_directory(program):
            from .source import check_source

            check_source(program, path)
            return
        loaded = load_sharing_weights(path, program).module()
        check_reproduces(program, lambda i: loaded(*i.args, **i.kwargs), "the saved .pt2")


def load_sharing_weights(path: str | os.PathLike, program: Program) -> torch.export.ExportedProgram:
    """Load the .pt2 just written at ``path`` with the in-memory program's weight tensors instead of a second copy.

    Each weight record of the archive is read (one at a time) and compared byte for byte with the program's
    tensor of the same name, which the loaded program then uses; the graph, constants and example inputs come
    from the file. So checking a 7B program's .pt2 costs one tensor's bytes, not the weights twice, and still
    proves the file holds the program's weights. Where torch's archive layout is not the one this reads
    (another torch version, pickled weights), it falls back to ``torch.export.load`` (a full second copy).
    """
    try:
        from torch._export.serde import schema
        from torch._export.serde.serialize import ExportedProgramDeserializer, _bytes_to_dataclass
        from torch.export.pt2_archive import PT2ArchiveReader
        from torch.export.pt2_archive import _package as pkg
        from torch.export.pt2_archive import constants as names
    except ImportError:
        return torch.export.load(str(path))
    tensors = program.named_tensors()
    with PT2ArchiveReader(str(path)) as reader:
        files = reader.get_file_names()
        model = "model"
        config_file = names.WEIGHTS_CONFIG_FILENAME_FORMAT.format(model)
        if config_file not in files or names.MODELS_FILENAME_FORMAT.format(model) not in files:
            return torch.export.load(str(path))
        config = pkg._load_payload_config(reader, config_file)
        state: dict[str, torch.Tensor] = {}
        for fqn, meta in config.config.items():
            mine = tensors.get(fqn)
            if mine is None:  # a buffer the graph never reads (e.g. rotary's original_inv_freq)
                try:
                    mine = program.get_tensor(fqn)
                except AttributeError:
                    mine = None
            if meta.use_pickle or meta.tensor_meta is None or not isinstance(mine, torch.Tensor):
                return torch.export.load(str(path))
            tm = meta.tensor_meta
            raw = reader.read_bytes(os.path.join(names.WEIGHTS_DIR, meta.path_name))
            stored = torch.frombuffer(bytearray(raw), dtype=mine.dtype) if raw else torch.empty(0, dtype=mine.dtype)
            del raw
            try:
                stored = stored.as_strided([int(s.as_int) for s in tm.sizes], [int(s.as_int) for s in tm.strides],
                                           int(tm.storage_offset.as_int))
            except RuntimeError:
                raise OutputError(f"the saved .pt2 holds weight {fqn} with another size than the program's") from None
            if stored.shape != mine.shape or not torch.equal(stored, mine.detach().cpu()):
                raise OutputError(f"the saved .pt2 holds other values for weight {fqn} than the program")
            del stored
            state[fqn] = torch.nn.Parameter(mine.detach(), requires_grad=tm.requires_grad) if meta.is_param \
                else mine.detach()
        constants = pkg._load_constants(reader, model)
        serialized = _bytes_to_dataclass(schema.ExportedProgram,
                                         reader.read_bytes(names.MODELS_FILENAME_FORMAT.format(model)))
        sample = reader.read_bytes(names.SAMPLE_INPUTS_FILENAME_FORMAT.format(model))
        return ExportedProgramDeserializer(None).deserialize(serialized, state, constants, sample)


def save_pt2(program: Program, path: str | os.PathLike, *, check: bool = True) -> str:
    """Write ``program`` to ``path`` as a checked .pt2; return the path written."""
    out = Path(path)
    if program.annotations.checkpoint is not None:
        raise OutputError(f"cannot write {out}: the program has activation-checkpoint regions, which a .pt2 would "
                          "silently drop (torch.export inlines them); write it as generated source with "
                          "evo_rewrite.targets.source.save_source(program, DIRECTORY) (RewriteResult.save and the CLI do so "
                          "for a path without .pt2)")
    return emit(program, PyTorchTarget(), out, directory=False, check=check).path
