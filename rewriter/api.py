"""The Python entry points: the same pipeline as the CLI."""

from __future__ import annotations

import dataclasses
import os
from typing import Callable

import torch

from .graph_capture import capture
from .heal_data import attach_heal_data
from .errors import UsageError, VerificationError
from .inputs import Inputs, make_inputs, parse_input_spec
from .sources import Loaded, hf_example_inputs, is_hf_model, load
from .manager import PassManager
from .pass_infra import Pass
from .pipeline import parse_pipeline
from .program import Program, SourceInfo
from .report import Report
from .verify import Thresholds

__all__ = ["RewriteResult", "rewrite", "to_inputs", "prepare", "set_calibration", "load_calibration"]


def check_heal_data(passes: list[Pass], given: bool, flag: str = "heal_data") -> None:
    """heal needs data, and data without heal is a mistake: say so before any loading."""
    heals = any(p.name == "heal" for p in passes)
    if heals and not given:
        raise UsageError(f"the pipeline has heal, which distils on unlabeled data: give {flag} (text or token files)")
    if given and not heals:
        raise UsageError(f"{flag} is given but the pipeline has no heal step; add heal after the lossy passes, "
                         "e.g. 'gqa(kv_heads=1),heal(steps=300)'")


def set_calibration(program: Program, calibration, device="cpu") -> None:
    """Attach calibration inputs to the program (``program.meta``) for calibrated passes."""
    if calibration is None:
        return
    if isinstance(calibration, (dict, Inputs, torch.Tensor)):
        calibration = [calibration]
    batches = [to_inputs(c).to(device) for c in calibration]
    if not batches:
        raise UsageError("calibration is empty; give at least one batch of inputs")
    program.meta["calibration"] = batches
    program.meta["calibration_note"] = f"{len(batches)} calibration batch(es): {batches[0].describe()}"


def load_calibration(path: str):
    """Calibration batches from a .pt file (a dict of tensors or a list of them), read without pickled code."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UsageError(f"--calibration {path}: no such file") from None
    except Exception as exc:  # noqa: BLE001
        raise UsageError(f"--calibration {path}: not a tensor file ({type(exc).__name__}); save a dict of input "
                         "tensors (or a list of such dicts) with torch.save") from None
    batches = obj if isinstance(obj, list) else [obj]
    if not batches or not all(isinstance(b, dict) and all(isinstance(v, torch.Tensor) for v in b.values()) for b in batches):
        raise UsageError(f"--calibration {path}: expected a dict of input tensors or a list of such dicts")
    return batches


@dataclasses.dataclass
class RewriteResult:
    program: Program
    report: Report

    @property
    def module(self) -> torch.fx.GraphModule:
        """The rewritten module: call it like the original model."""
        return self.program.module

    def save(self, path: str | os.PathLike) -> str:
        """Write a checked ``.pt2``; a program with checkpoint regions is written as a directory of generated
        source and safetensors weights instead (``targets/source.py``: a ``.pt2`` would drop the regions)."""
        from evo_rewrite.passes.checkpoint_regions import regions_of
        from evo_rewrite.targets.pytorch import save_pt2
        from evo_rewrite.targets.source import save_source

        written = (save_source if regions_of(self.program.module) else save_pt2)(self.program, path)
        self.report.outputs.append(written)
        return written

    def save_hf(self, path: str | os.PathLike) -> str:
        """Write a Hugging Face checkpoint directory (GQA -> num_key_value_heads); see targets/hf.py."""
        from evo_rewrite.targets.hf import save_hf

        written = save_hf(self.program, path)
        self.report.outputs.append(written)
        return written

    def save_onnx(self, path: str | os.PathLike, *, attention: str | None = None, dtype: str = "fp32",
                  external_data: bool | None = None):
        """Write a checked ``.onnx`` (see ``targets/onnx.py``); record it in the report; return its OnnxReport."""
        from evo_rewrite.targets.onnx import DEFAULT_ATTENTION, save_onnx

        rep = save_onnx(self.program, path, attention=attention or DEFAULT_ATTENTION, dtype=dtype,
                        external_data=external_data)
        self.report.onnx = rep.to_dict()
        self.report.outputs += [rep.path] + ([rep.external_data] if rep.external_data else [])
        return rep


def to_inputs(example_inputs) -> Inputs | None:
    if example_inputs is None or isinstance(example_inputs, Inputs):
        return example_inputs
    if isinstance(example_inputs, dict):
        return Inputs((), dict(example_inputs))
    if isinstance(example_inputs, torch.Tensor):
        return Inputs((example_inputs,), {})
    if isinstance(example_inputs, (tuple, list)):
        return Inputs(tuple(example_inputs), {})
    raise UsageError(f"example_inputs must be a tuple, a dict or a tensor, not {type(example_inputs).__name__}")


def prepare(source, example_inputs=None, *, allow_pickle: bool = False, device: str = "cpu",
            log: Callable[[str], None] | None = None) -> Program:
    """Load (if needed) and capture SOURCE: a path/spec string, an nn.Module, or a Program."""
    if isinstance(source, Program):
        return source
    inputs = to_inputs(example_inputs) if not isinstance(example_inputs, str) else example_inputs
    if isinstance(source, torch.nn.Module):
        hf = is_hf_model(source)
        if isinstance(inputs, str):
            inputs = make_inputs(parse_input_spec(inputs))
        elif inputs is None and hf:
            inputs = hf_example_inputs(source)
        elif inputs is None:
            raise UsageError("rewrite(module, ...) needs example_inputs (a tuple of positional or a dict of "
                             "keyword tensors)")
        info = SourceInfo(kind="module", model_class=type(source).__qualname__)
        if hf:
            info.hf_config, info.hf_class = source.config.to_dict(), type(source).__name__
        loaded = Loaded(source=info, model=source.to(device), inputs=inputs.to(device))
    else:
        loaded = load(source, inputs=inputs, allow_pickle=allow_pickle, device=device)
    if loaded.program is not None:
        return loaded.program
    if log:
        log(f"capturing {loaded.source.model_class} with torch.export ({loaded.inputs.describe()}) ...")
    return capture(loaded.model, loaded.inputs, source=loaded.source, log=log)


def rewrite(source, pipeline: str | list[Pass] = "", example_inputs=None, *, allow_pickle: bool = False,
            device: str = "cpu", thresholds: Thresholds | None = None, strict: bool = False,
            calibration=None, heal_data=None, tokenizer=None,
            log: Callable[[str], None] | None = None) -> RewriteResult:
    """Capture SOURCE, run PIPELINE with verification after every pass, return the result and report.

    ``source``: an ``nn.Module`` (with ``example_inputs``), a Program, or any CLI SOURCE string.
    ``pipeline``: text such as ``"gqa(kv_heads=4),flash"`` or a list of Pass objects.
    ``strict``: raise VerificationError when a pass is rolled back (otherwise see ``report.ok``).
    ``calibration``: inputs for calibrated passes (``gqa(method=fit)``): a list of example-input
    tuples/dicts (or one); default: the example inputs.
    ``heal_data``: unlabeled data for ``heal``: text or token files (paths), a list of strings, or a
    tensor of token ids; text is tokenized with ``tokenizer`` (a directory or a tokenizer object),
    by default the Hugging Face source's own.
    """
    passes = parse_pipeline(pipeline) if isinstance(pipeline, str) else list(pipeline)
    check_heal_data(passes, heal_data is not None)
    program = prepare(source, example_inputs, allow_pickle=allow_pickle, device=device, log=log)
    set_calibration(program, calibration, device)
    attach_heal_data(program, heal_data, tokenizer)
    manager = PassManager(passes, thresholds or Thresholds(), log=log)
    program, report = manager.run(program)
    report.source = program.source.path or program.source.model_class or ""
    report.source_kind = program.source.kind
    if strict and not report.ok:
        bad = report.failed()[0]
        raise VerificationError(f"pass '{bad.spec}' was rolled back: {bad.failure}"
                                + (f" (first diverging module: {bad.diverges_at})" if bad.diverges_at else ""))
    return RewriteResult(program, report)


