"""The Python entry points: the same pipeline as the CLI."""

from __future__ import annotations

import dataclasses
import os
from typing import Callable

import torch

from .graph_capture import capture
from .errors import UsageError, VerificationError
from .inputs import Inputs
from .sources import Loaded, load
from .manager import PassManager
from .pass_infra import Pass
from .pipeline import parse_pipeline
from .program import Program, SourceInfo
from .report import Report
from .verify import Thresholds

__all__ = ["RewriteResult", "rewrite", "to_inputs", "prepare"]


@dataclasses.dataclass
class RewriteResult:
    program: Program
    report: Report

    @property
    def module(self) -> torch.fx.GraphModule:
        """The rewritten module: call it like the original model."""
        return self.program.module

    def save(self, path: str | os.PathLike) -> str:
        from targets.pytorch import save_pt2

        written = save_pt2(self.program, path)
        self.report.outputs.append(written)
        return written


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
        if inputs is None or isinstance(inputs, str):
            from .sources import _is_hf_model, hf_example_inputs, parse_input_spec, make_inputs

            if isinstance(inputs, str):
                inputs = make_inputs(parse_input_spec(inputs))
            elif _is_hf_model(source):
                inputs = hf_example_inputs(source)
            else:
                raise UsageError("rewrite(module, ...) needs example_inputs (a tuple of positional or a dict of "
                                 "keyword tensors)")
        info = SourceInfo(kind="module", model_class=type(source).__qualname__)
        from .sources import _is_hf_model

        if _is_hf_model(source):
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
            log: Callable[[str], None] | None = None) -> RewriteResult:
    """Capture SOURCE, run PIPELINE with verification after every pass, return the result and report.

    ``source``: an ``nn.Module`` (with ``example_inputs``), a Program, or any CLI SOURCE string.
    ``pipeline``: text such as ``"gqa(kv_heads=4),flash"`` or a list of Pass objects.
    ``strict``: raise VerificationError when a pass is rolled back (otherwise see ``report.ok``).
    """
    passes = parse_pipeline(pipeline) if isinstance(pipeline, str) else list(pipeline)
    program = prepare(source, example_inputs, allow_pickle=allow_pickle, device=device, log=log)
    manager = PassManager(passes, thresholds or Thresholds(), log=log)
    program, report = manager.run(program)
    report.source = program.source.path or program.source.model_class or ""
    report.source_kind = program.source.kind
    if strict and not report.ok:
        bad = report.failed()[0]
        raise VerificationError(f"pass '{bad.spec}' was rolled back: {bad.failure}"
                                + (f" (first diverging module: {bad.diverges_at})" if bad.diverges_at else ""))
    return RewriteResult(program, report)


