"""The Python entry points: the same pipeline as the CLI."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Callable

import torch

from .annotations import Calibration
from .errors import UsageError, VerificationError
from .decoder import CacheProtocolError, as_prefill, capture_decoder, declares_cache, is_causal_lm, is_decoder
from .graph_capture import capture
from .heal_data import attach_heal_data
from .inputs import Inputs, make_inputs, parse_input_spec
from .manager import PassManager
from .pass_infra import Pass
from .pipeline import check_pipeline, parse_pipeline
from .program import Program, SourceInfo
from .report import Report
from .sources import Loaded, hf_example_inputs, input_names_of, is_hf_model, load, tokenizer_input_names
from .target_infra import Target, TargetReport, emit, get_target, parse_target
from .verify import Thresholds

__all__ = ["RewriteResult", "rewrite", "write", "to_inputs", "prepare", "set_calibration", "load_calibration",
           "given_inputs"]


def given_inputs(calibration: bool, heal_data: bool, device: str = "cpu") -> set[str]:
    """What the caller supplies, in the words of the pass contract (``pass_infra.NEEDS``)."""
    return ({"calibration"} if calibration else set()) | ({"heal_data"} if heal_data else set()) | (
        {"cuda"} if str(device).startswith("cuda") else set())


def set_calibration(program: Program, calibration, device="cpu") -> None:
    """Attach calibration inputs to the program (its ``Calibration`` annotation) for calibrated passes.

    A dict batch is matched to the captured program's inputs by name (never by order); a name the program
    does not take, or one it needs and the batch lacks, is a UsageError listing the program's input names.
    The last quarter of the batches (of the rows, for a single batch) is held out: passes never see it, and
    the pass manager reports lossy passes' quality on it.
    """
    if calibration is None:
        return
    if isinstance(calibration, (dict, Inputs, torch.Tensor, tuple)):
        calibration = [calibration]
    batches = [_match_inputs(program, as_prefill(program, to_inputs(c)), i).to(device)
               for i, c in enumerate(calibration)]
    if not batches:
        raise UsageError("calibration is empty; give at least one batch of inputs")
    fit, held, how = split_held_out(batches)
    program.annotations.calibration = Calibration(
        tuple(fit), f"{len(batches)} calibration batch(es): {batches[0].describe()}; {how}", tuple(held))


def input_names(program: Program) -> tuple[list[str], list[str]]:
    """(positional, keyword) input names of the captured program, in the order it takes them."""
    ex = program.inputs
    try:
        orig = list(program.module.graph._codegen.pytree_info.orig_args)
    except AttributeError:
        orig = [n.name for n in program.placeholders()]
    return orig[: len(ex.args)], list(ex.kwargs)


def _match_inputs(program: Program, batch: Inputs, index: int) -> Inputs:
    """``batch`` in the structure of the program's example inputs, matched by name; checked for rank and kind."""
    pos, kw = input_names(program)
    takes = ", ".join(pos + kw) or "(none)"
    which = f"calibration batch {index + 1}"
    if batch.kwargs:
        given = list(batch.kwargs)
        unknown = [n for n in given if n not in pos and n not in kw]
        if unknown or batch.args:
            raise UsageError(f"{which} has input(s) {', '.join(unknown) or 'given by position'} that the model's "
                             f"forward does not take here; it takes: {takes} (name each tensor by its input name)")
        missing = [n for n in pos + kw if n not in batch.kwargs]
        if missing:
            raise UsageError(f"{which} lacks input(s) {', '.join(missing)}; the captured model takes: {takes}")
        matched = Inputs(tuple(batch.kwargs[n] for n in pos), {n: batch.kwargs[n] for n in kw})
    else:
        if len(batch.args) != len(pos) + len(kw):
            raise UsageError(f"{which} has {len(batch.args)} positional tensor(s); the captured model takes "
                             f"{len(pos) + len(kw)}: {takes} (give a dict of tensors named by input)")
        matched = Inputs(tuple(batch.args[: len(pos)]), dict(zip(kw, batch.args[len(pos):])))
    ex_flat, got_flat = program.inputs.flat(), matched.flat()
    for name, e, g in zip(pos + kw, ex_flat, got_flat):
        if not isinstance(g, torch.Tensor) or not isinstance(e, torch.Tensor):
            continue
        if g.dim() != e.dim() or g.is_floating_point() != e.is_floating_point():
            raise UsageError(f"{which}: input {name} is {str(g.dtype).replace('torch.', '')}{list(g.shape)}, but the "
                             f"model was captured with {str(e.dtype).replace('torch.', '')}{list(e.shape)} (same rank "
                             "and kind of dtype needed)")
        if g.dtype != e.dtype:
            matched = matched.map_tensors(lambda t, g=g, e=e: t.to(e.dtype) if t is g else t)
    return matched


def split_held_out(batches: list[Inputs]) -> tuple[list[Inputs], list[Inputs], str]:
    """(fit, held out, what was done): the last quarter of the batches, or of the rows of a single batch."""
    if len(batches) >= 2:
        k = max(1, len(batches) // 4)
        return batches[:-k], batches[-k:], f"the last {k} held out for measuring quality"
    only = batches[0]
    flat = [t for t in only.flat() if isinstance(t, torch.Tensor)]
    rows = {int(t.shape[0]) for t in flat if t.dim() >= 1}
    if len(rows) == 1 and next(iter(rows)) >= 2:
        b = next(iter(rows))
        k = max(1, b // 4)
        head = only.map_tensors(lambda t: t[: b - k] if t.dim() >= 1 else t)
        tail = only.map_tensors(lambda t: t[b - k:] if t.dim() >= 1 else t)
        return [head], [tail], f"rows {b - k}..{b - 1} held out for measuring quality"
    return [only], [], "nothing held out (one row): quality is measured on random tokens"


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
    empty = next((k for b in batches for k, v in b.items() if v.numel() == 0), None)
    if empty is not None:
        raise UsageError(f"--calibration {path}: tensor {empty!r} is empty; give at least one row of data")
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
    target = onnx_route(program, path, target)
    if log:
        log(f"writing {path} (target {target.spec()}: write, reload and check) ...")
    return emit(program, target, path, log=log)


def routes_to_genai(target: Target, path: str | os.PathLike | None) -> bool:
    """Whether ``onnx`` to ``path`` means a GenAI directory: a path without ``.onnx`` (for a decoder program)."""
    return target.name == "onnx" and path is not None and not str(path).endswith(".onnx")


def onnx_route(program: Program, path: str | os.PathLike, target: Target) -> Target:
    """``onnx`` with a path without ``.onnx`` and a decoder program: the ``genai`` target (a directory that
    onnxruntime_genai runs, with the KV cache); ``-o file.onnx`` and cacheless programs keep the onnx target."""
    if not (routes_to_genai(target, path) and is_decoder(program)):
        return target
    default = type(target)()
    changed = [f.name for f in dataclasses.fields(target) if getattr(target, f.name) != getattr(default, f.name)]
    if changed:
        raise UsageError(f"--target onnx -o {path} (no .onnx) writes an ONNX Runtime GenAI directory, which takes no "
                         f"onnx({', '.join(changed)}=...) options; give -o NAME.onnx for a single .onnx file with them")
    return get_target("genai")()


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


def _tokenizer_inputs(tokenizer) -> list[str] | None:
    """``model_input_names`` of a tokenizer object, or of the tokenizer in a directory."""
    if tokenizer is None:
        return None
    if isinstance(tokenizer, (str, os.PathLike)):
        return tokenizer_input_names(Path(tokenizer))
    return input_names_of(tokenizer)


def prepare(source, example_inputs=None, *, allow_pickle: bool = False, trust_code: bool = False,
            allow_missing_weights: bool = False, device: str = "cpu",
            log: Callable[[str], None] | None = None, cache: bool = False, tokenizer=None) -> Program:
    """Load (if needed) and capture SOURCE: a path/spec string, an nn.Module, or a Program.

    ``allow_pickle``, ``trust_code``, ``allow_missing_weights``: consent for what loading SOURCE may
    do (see :func:`evo_rewrite.load`). ``cache``: capture a causal LM as a decoder program with its KV
    cache (rewriter/decoder.py): a Hugging Face ``*ForCausalLM``, or a module that follows the cache
    protocol (``forward(input_ids, past_key_values=None, ...) -> (logits, presents)``); other models,
    and a module whose probe shows it departs from the protocol, are captured as usual.
    """
    if isinstance(source, Program):
        return source.clone()  # the caller's program keeps its annotations (calibration, heal data)
    inputs = to_inputs(example_inputs) if not isinstance(example_inputs, str) else example_inputs
    if isinstance(source, torch.nn.Module):
        hf = is_hf_model(source)
        if isinstance(inputs, str):
            inputs = make_inputs(parse_input_spec(inputs))
        elif inputs is None and hf:  # the inputs the tokenizer makes, where one is given
            inputs = hf_example_inputs(source, input_names=_tokenizer_inputs(tokenizer))
        elif inputs is None and not (cache and declares_cache(source)):  # the decoder capture makes its own
            raise UsageError("rewrite(module, ...) needs example_inputs (a tuple of positional or a dict of "
                             "keyword tensors)")
        info = SourceInfo(kind="module", model_class=type(source).__qualname__)
        if hf:
            info.hf_config, info.hf_class = source.config.to_dict(), type(source).__name__
        loaded = Loaded(source=info, model=source.to(device), inputs=None if inputs is None else inputs.to(device))
    else:
        loaded = load(source, inputs=inputs, allow_pickle=allow_pickle, trust_code=trust_code,
                      allow_missing_weights=allow_missing_weights, device=device)
    if loaded.program is not None:
        return loaded.program
    if cache and is_causal_lm(loaded.model):
        return capture_decoder(loaded.model, source=loaded.source, log=log)
    if cache and declares_cache(loaded.model):  # a module of your own: the cache protocol, confirmed by a probe
        try:
            return capture_decoder(loaded.model, source=loaded.source, log=log)
        except CacheProtocolError as exc:
            if loaded.inputs is None:  # nothing to capture the cacheless forward with
                raise UsageError(f"{exc}; or give example_inputs") from None
            if log:
                log(f"{loaded.source.model_class or type(loaded.model).__name__} takes past_key_values but does not "
                    f"follow the cache protocol ({exc.reason}): capturing it without its cache")
    if log:
        log(f"capturing {loaded.source.model_class} with torch.export ({loaded.inputs.describe()}) ...")
    return capture(loaded.model, loaded.inputs, source=loaded.source, log=log)


def rewrite(source, pipeline: str | list[Pass] = "", example_inputs=None, *, allow_pickle: bool = False,
            trust_code: bool = False, allow_missing_weights: bool = False, device: str = "cpu",
            thresholds: Thresholds | None = None, strict: bool = False, calibration=None, heal_data=None,
            tokenizer=None, cache: bool = False,
            log: Callable[[str], None] | None = None) -> RewriteResult:
    """Capture SOURCE, run PIPELINE with verification after every pass, return the result and report.

    ``source``: an ``nn.Module`` (with ``example_inputs``), a Program, or any CLI SOURCE string.
    ``pipeline``: text such as ``"gqa(kv_heads=4),flash"`` or a list of Pass objects.
    ``allow_pickle``, ``trust_code``, ``allow_missing_weights``: consent for what loading SOURCE may do
    (unpickle, execute a generated ``model.py``, keep random weights for tensors a checkpoint lacks).
    ``strict``: raise VerificationError when a pass is rolled back (otherwise see ``report.ok``).
    ``calibration``: inputs for calibrated passes (``gqa(method=fit)``): a list of example-input
    tuples/dicts (or one); default: the example inputs.
    ``heal_data``: unlabeled data for ``heal``: text or token files (paths), a list of strings, or a
    tensor of token ids; text is tokenized with ``tokenizer`` (a directory or a tokenizer object),
    by default the Hugging Face source's own.
    ``cache``: capture a causal LM with its KV cache (a decoder program that ``generate`` runs): a Hugging
    Face ``*ForCausalLM`` or a module that follows the cache protocol (rewriter/decoder.py).
    """
    passes = parse_pipeline(pipeline) if isinstance(pipeline, str) else list(pipeline)
    check_pipeline(passes, given_inputs(calibration is not None, heal_data is not None, device))
    program = prepare(source, example_inputs, allow_pickle=allow_pickle, trust_code=trust_code,
                      allow_missing_weights=allow_missing_weights, device=device, log=log, cache=cache,
                      tokenizer=tokenizer)
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


