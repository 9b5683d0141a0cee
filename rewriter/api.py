"""The Python entry points: the same pipeline as the CLI."""

from __future__ import annotations

import dataclasses
import os
from typing import Callable

import torch

from .annotations import Calibration
from .errors import UsageError, VerificationError
from .decoder import capture_decoder, is_causal_lm
from .graph_capture import capture
from .heal_data import attach_heal_data
from .inputs import Inputs, make_inputs, parse_input_spec
from .manager import PassManager
from .pass_infra import Pass
from .pipeline import check_pipeline, parse_pipeline
from .program import Program, SourceInfo
from .report import Report
from .sources import Loaded, hf_example_inputs, is_hf_model, load
from .target_infra import Target, TargetReport, emit, get_target, parse_target
from .verify import Thresholds

__all__ = ["RewriteResult", "rewrite", "write", "to_inputs", "prepare", "set_calibration", "load_calibration",
           "given_inputs"]


def given_inputs(calibration: bool, heal_data: bool, device: str = "cpu") -> set[str]:
    """What the caller supplies, in the words of the pass contract (``pass_infra.NEEDS``)."""
    return ({"calibration"} if calibration else set()) | ({"heal_data"} if heal_data else set()) | (
        {"cuda"} if str(device).startswith("cuda") else set())


def set_calibration(program: Program, calibration, device="cpu") -> None:
    """Attach calibration inputs to the program (its ``Calibration`` annotation) for calibrated passes."""
    if calibration is None:
        return
    if isinstance(calibration, (dict, Inputs, torch.Tensor)):
        calibration = [calibration]
    batches = [to_inputs(c).to(device) for c in calibration]
    if not batches:
        raise UsageError("calibration is empty; give at least one batch of inputs")
    program.annotations.calibration = Calibration(
        tuple(batches), f"{len(batches)} calibration batch(es): {batches[0].describe()}")


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

    def write(self, path: str | os.PathLike, target: str | Target = "pytorch", *,
              log: Callable[[str], None] | None = None) -> TargetReport:
        """Write the program with a target (text such as ``"onnx(dtype=fp16)"`` or a Target object), record it
        in the report and return its TargetReport."""
        written = write(self.program, path, target, log=log)
        self.report.targets.append(written)
        self.report.outputs += written.files
        return written

    def save(self, path: str | os.PathLike, target: str | Target = "pytorch") -> str:
        """``write`` and return the path written. The default ``pytorch`` target writes a checked ``.pt2``, or a
        directory of generated source and safetensors weights when the program has checkpoint regions."""
        return self.write(path, target).path

    def save_hf(self, path: str | os.PathLike) -> str:
        """Write a Hugging Face checkpoint directory (GQA -> num_key_value_heads): ``save(path, "hf")``."""
        return self.save(path, "hf")

    def save_onnx(self, path: str | os.PathLike, *, attention: str | None = None, dtype: str = "fp32",
                  external_data: bool | None = None) -> TargetReport:
        """Write a checked ``.onnx`` (see ``targets/onnx.py``); return its report (``write(path, "onnx(...)")``)."""
        cls = get_target("onnx")
        opts = {"dtype": dtype, "external_data": external_data, **({"attention": attention} if attention else {})}
        return self.write(path, cls(**opts))


def write(program: Program, path: str | os.PathLike, target: str | Target = "pytorch", *,
          log: Callable[[str], None] | None = None) -> TargetReport:
    """Write ``program`` at ``path`` with ``target`` (text or object): the one function the CLI and Python use."""
    target = parse_target(target) if isinstance(target, str) else target
    if log:
        log(f"writing {path} (target {target.spec()}: write, reload and check) ...")
    return emit(program, target, path, log=log)


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
            log: Callable[[str], None] | None = None, cache: bool = False) -> Program:
    """Load (if needed) and capture SOURCE: a path/spec string, an nn.Module, or a Program.

    ``cache``: capture a causal LM as a decoder program with its KV cache (rewriter/decoder.py); other
    models are captured as usual."""
    if isinstance(source, Program):
        return source.clone()  # the caller's program keeps its annotations (calibration, heal data)
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
    if cache and is_causal_lm(loaded.model):
        return capture_decoder(loaded.model, source=loaded.source, log=log)
    if log:
        log(f"capturing {loaded.source.model_class} with torch.export ({loaded.inputs.describe()}) ...")
    return capture(loaded.model, loaded.inputs, source=loaded.source, log=log)


def rewrite(source, pipeline: str | list[Pass] = "", example_inputs=None, *, allow_pickle: bool = False,
            device: str = "cpu", thresholds: Thresholds | None = None, strict: bool = False,
            calibration=None, heal_data=None, tokenizer=None, cache: bool = False,
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
    ``cache``: capture a causal LM with its KV cache (a decoder program that ``generate`` runs).
    """
    passes = parse_pipeline(pipeline) if isinstance(pipeline, str) else list(pipeline)
    check_pipeline(passes, given_inputs(calibration is not None, heal_data is not None, device))
    program = prepare(source, example_inputs, allow_pickle=allow_pickle, device=device, log=log, cache=cache)
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


