"""The pass contract: a frozen dataclass of options, one ``run(Program) -> PassResult`` method.

Passes register under a kebab-case ``name``; the pipeline text maps ``name(opt=value, ...)`` onto
the dataclass fields. Options are typed (``int``, ``float``, ``bool``, ``str``, ``Literal[...]``,
``Optional[...]``, ``tuple[str, ...]``) and validated in ``__post_init__``, so a bad option fails
when the pipeline is parsed, naming the pass, the option and the allowed values.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any, ClassVar

import torch.fx as fx

from .errors import PipelineError
from .program import Program

__all__ = ["Pass", "PassResult", "Skip", "register_pass", "registered_passes", "get_pass", "module_path", "option_error"]


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


@dataclasses.dataclass(frozen=True)
class Pass:
    """Base of every pass. Subclasses are frozen dataclasses with class variables ``name`` and ``exact``."""

    name: ClassVar[str] = ""
    exact: ClassVar[bool] = True
    summary: ClassVar[str] = ""
    # True for passes that learn from the program before the lossy passes (heal) rather than being one
    uses_reference: ClassVar[bool] = False

    def run(self, program: Program) -> PassResult:  # pragma: no cover - abstract
        raise NotImplementedError

    def spec(self) -> str:
        """The pipeline text of this pass with its non-default options."""
        opts = []
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            default = f.default if f.default is not dataclasses.MISSING else (
                f.default_factory() if f.default_factory is not dataclasses.MISSING else dataclasses.MISSING)
            if v != default:
                opts.append(f"{f.name}={_format_value(v)}")
        return f"{self.name}({', '.join(opts)})" if opts else self.name

    @classmethod
    def options(cls) -> list[tuple[str, str, Any]]:
        """(name, type text, default) of each option."""
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


_REGISTRY: dict[str, type[Pass]] = {}


def register_pass(cls: type[Pass]) -> type[Pass]:
    if not cls.name or cls.name != cls.name.lower() or "_" in cls.name:
        raise ValueError(f"pass names are kebab-case: {cls.name!r}")
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"pass {cls.name!r} registered twice")
    _REGISTRY[cls.name] = cls
    return cls


def _load_builtin_passes() -> None:
    import evo_rewrite.passes  # noqa: F401 - importing registers the built-in passes


def registered_passes() -> dict[str, type[Pass]]:
    _load_builtin_passes()
    return dict(sorted(_REGISTRY.items()))


def get_pass(name: str) -> type[Pass]:
    reg = registered_passes()
    if name not in reg:
        import difflib

        close = difflib.get_close_matches(name, reg, n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise PipelineError(f"unknown pass '{name}'.{hint} Known passes: {', '.join(reg) or '(none)'} "
                            "(evo-rewrite --list-passes shows their options)")
    return reg[name]


def module_path(node: fx.Node) -> str:
    """The innermost module path (``transformer.h.0.attn``) a node was traced in, '' at top level."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return ""
    return list(stack.values())[-1][0]


def module_paths(node: fx.Node) -> list[str]:
    stack = node.meta.get("nn_module_stack") or {}
    return [v[0] for v in stack.values()]
