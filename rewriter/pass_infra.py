"""The pass contract: a frozen dataclass of options, one ``run(Program) -> PassResult`` method.

Passes register under a kebab-case ``name``; the pipeline text maps ``name(opt=value, ...)`` onto
the dataclass fields. Options are typed (``int``, ``float``, ``bool``, ``str``, ``Literal[...]``,
``Optional[...]``, ``tuple[str, ...]``) and validated in ``__post_init__``, so a bad option fails
when the pipeline is parsed, naming the pass, the option and the allowed values.

A pass also declares what it needs (``needs``: calibration data, heal data, a reference, a CUDA
device), where it may stand (``placement``: last, after a lossy pass, never after certain
passes) and the dtype of the weights it leaves (``weight_dtype``, checked against the target). ``pipeline.check_pipeline`` checks both before anything loads and names the pass and the
rule, so no code outside a pass asks for it by name.

Built-in passes register through the ``evo_rewrite.passes`` entry-point group, exactly as a
third-party package's passes do: ``registered_passes()`` loads every entry point of the group.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any, ClassVar

import torch.fx as fx

from .errors import PipelineError
from .registry import Registry
from .program import Program

__all__ = ["Pass", "PassResult", "Skip", "Placement", "NEEDS", "register_pass", "registered_passes", "get_pass",
           "module_path", "option_error", "PASSES"]


@dataclasses.dataclass(frozen=True)
class Skip:
    """A site a pass left alone: why, and where (module path and node name)."""

    reason: str
    module: str = ""
    node: str = ""


@dataclasses.dataclass
class PassResult:
    program: Program
    rewrites: int
    skipped: list[Skip] = dataclasses.field(default_factory=list)
    # extra facts for the report, e.g. {"backend": {"h.0.attn": "cudnn"}}
    notes: dict[str, Any] = dataclasses.field(default_factory=dict)
    message: str = ""  # said when rewrites == 0: why there was nothing to do


# What a pass may need, and how a user supplies it (the pipeline check quotes this)
NEEDS = {
    "calibration": "calibration data (--calibration FILE.pt; Python: calibration=...)",
    "heal_data": "unlabeled data to distil on (--heal-data PATH; Python: heal_data=...)",
    "reference": "the program before the first lossy pass (the pass manager keeps it; needs a lossy pass before)",
    "cuda": "a CUDA device (--device cuda; Python: device='cuda')",
}


@dataclasses.dataclass(frozen=True)
class Placement:
    """Where a pass may stand in a pipeline."""

    last: bool = False  # nothing may follow it (tensor-parallel: its plan describes the final graph)
    after_lossy: bool = False  # a lossy pass must come before it (heal distils toward what was before them)
    not_after: tuple[str, ...] = ()  # passes that must not come before it (heal trains fp32: not after bf16)


@dataclasses.dataclass(frozen=True)
class Pass:
    """Base of every pass. Subclasses are frozen dataclasses with class variables ``name`` and ``exact``."""

    name: ClassVar[str] = ""
    exact: ClassVar[bool] = True
    summary: ClassVar[str] = ""
    needs: ClassVar[frozenset[str]] = frozenset()  # keys of NEEDS
    placement: ClassVar[Placement] = Placement()
    # the dtype (torch name, e.g. "bfloat16") of the weights this pass leaves; None: it does not change them.
    # The face checks it against the target before loading (pipeline.check_target)
    weight_dtype: ClassVar[str | None] = None

    def run(self, program: Program) -> PassResult:  # pragma: no cover - abstract
        raise NotImplementedError

    def requirements(self) -> frozenset[str]:
        """What this instance needs (options may add to the class's ``needs``)."""
        return self.needs

    def accepts(self) -> frozenset[str]:
        """What this instance takes if given: its needs and optional inputs (calibrated passes: calibration)."""
        return self.requirements()

    def spec(self) -> str:
        """The pipeline text of this pass with its non-default options."""
        return spec_text(self)

    @classmethod
    def options(cls) -> list[tuple[str, str, Any]]:
        """(name, type text, default) of each option."""
        return option_table(cls)


def spec_text(obj) -> str:
    """``name(opt=value, ...)`` of a pass or target with its non-default options."""
    opts = []
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else dataclasses.MISSING)
        if v != default:
            opts.append(f"{f.name}={_format_value(v)}")
    return f"{obj.name}({', '.join(opts)})" if opts else obj.name


def option_table(cls) -> list[tuple[str, str, Any]]:
    """(name, type text, default) of each option of a pass or target class."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else None
        out.append((f.name, describe_type(hints[f.name]), default))
    return out


def _format_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, tuple):
        return "[" + ",".join(_format_value(x) for x in v) + "]"
    return str(v)


def describe_type(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        return "|".join(str(a) for a in typing.get_args(tp))
    if origin is typing.Union or str(origin) == "<class 'types.UnionType'>":
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return " or ".join(describe_type(a) for a in args) + " (optional)"
    if origin is tuple:
        return f"list of {describe_type(typing.get_args(tp)[0])}"
    return getattr(tp, "__name__", str(tp))


def option_error(pass_name: str, option: str, value, allowed: str) -> PipelineError:
    return PipelineError(f"pass '{pass_name}': option {option}={value!r} is not valid; allowed: {allowed}")


ENTRY_POINT_GROUP = "evo_rewrite.passes"


def _check_needs(cls: type[Pass]) -> None:
    unknown = set(cls.needs) - set(NEEDS)
    if unknown:
        raise ValueError(f"pass {cls.name!r} needs {sorted(unknown)}; known needs: {sorted(NEEDS)}")


PASSES: Registry[type[Pass]] = Registry("pass", Pass, ENTRY_POINT_GROUP, "--list-passes", check=_check_needs)
register_pass = PASSES.register
registered_passes = PASSES.all
get_pass = PASSES.get


def module_path(node: fx.Node) -> str:
    """The innermost module path (``transformer.h.0.attn``) a node was traced in, '' at top level."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return ""
    return list(stack.values())[-1][0]


def module_paths(node: fx.Node) -> list[str]:
    stack = node.meta.get("nn_module_stack") or {}
    return [v[0] for v in stack.values()]
