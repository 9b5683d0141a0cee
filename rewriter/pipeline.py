"""Pipeline text: ``gqa(kv_heads=4),flash,checkpoint(every=2)`` <-> a list of Pass objects."""

from __future__ import annotations

import dataclasses
import typing

from .errors import PipelineError
from .pass_infra import NEEDS, Pass, describe_type, get_pass

__all__ = ["parse_pipeline", "format_pipeline", "check_pipeline", "check_target", "parse_item"]


def _split_top(text: str, sep: str = ",") -> list[str]:
    out, depth, cur, quote = [], 0, [], None
    for ch in text:
        if quote:
            cur.append(ch)
            if ch == quote:
                quote = None
            continue
        if ch in "'\"":
            quote = ch
        elif ch in "([":
            depth += 1
        elif ch in ")]":
            depth -= 1
            if depth < 0:
                raise PipelineError(f"unbalanced ')' or ']' in pipeline text {text!r}")
        if ch == sep and depth == 0:
            out.append("".join(cur).strip())
            cur = []
        else:
            cur.append(ch)
    if depth != 0 or quote:
        raise PipelineError(f"unbalanced brackets or quotes in pipeline text {text!r}")
    out.append("".join(cur).strip())
    return out


def _convert(pass_name: str, option: str, raw: str, tp, what: str = "pass"):
    """Convert option text to the field's type; raise PipelineError naming the allowed values."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    raw_s = raw.strip()
    if len(raw_s) >= 2 and raw_s[0] == raw_s[-1] and raw_s[0] in "'\"":
        raw_s = raw_s[1:-1]
    bad = PipelineError(f"{what} '{pass_name}': option {option}={raw.strip()!r} is not valid; expected {describe_type(tp)}")
    if origin is typing.Union or str(origin) == "<class 'types.UnionType'>":
        if raw_s.lower() in ("none", "null"):
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _convert(pass_name, option, raw_s, a, what)
            except PipelineError as e:
                errors.append(e)
        raise bad
    if origin is typing.Literal:
        for a in args:
            if str(a) == raw_s:
                return a
        raise PipelineError(f"{what} '{pass_name}': option {option}={raw_s!r} is not valid; allowed: "
                            + ", ".join(str(a) for a in args))
    if origin is tuple:
        inner = raw_s[1:-1] if raw_s.startswith("[") and raw_s.endswith("]") else raw_s
        items = [x for x in _split_top(inner, ",") if x] if "," in inner or inner else []
        if not items and inner:
            items = [inner]
        return tuple(_convert(pass_name, option, x, args[0], what) for x in items)
    if tp is bool:
        if raw_s.lower() in ("true", "1", "yes", "on"):
            return True
        if raw_s.lower() in ("false", "0", "no", "off"):
            return False
        raise PipelineError(f"{what} '{pass_name}': option {option}={raw_s!r} is not valid; allowed: true, false")
    if tp is int:
        try:
            return int(raw_s)
        except ValueError:
            raise bad from None
    if tp is float:
        try:
            return float(raw_s)
        except ValueError:
            raise bad from None
    if tp is str:
        return raw_s
    raise bad


def parse_item(item: str, lookup=None, what: str = "pass"):
    """``name(opt=value, ...)`` -> an instance of the class ``lookup(name)`` gives (a pass or a target)."""
    lookup = lookup or get_pass
    if not item:
        raise PipelineError(f"empty {what} name (two commas in a row, or a trailing comma?)")
    if "(" in item:
        if not item.endswith(")"):
            raise PipelineError(f"cannot parse {item!r}: options go in parentheses, e.g. "
                                + ("gqa(kv_heads=4)" if what == "pass" else "onnx(dtype=fp16)"))
        name, body = item[: item.index("(")].strip(), item[item.index("(") + 1: -1]
    else:
        name, body = item.strip(), ""
    cls = lookup(name)
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for opt in _split_top(body) if body.strip() else []:
        if "=" not in opt:
            raise PipelineError(f"{what} '{name}': option {opt!r} needs a value (key=value); options: "
                                + (", ".join(fields) or "none"))
        key, raw = opt.split("=", 1)
        key = key.strip().replace("-", "_")
        if key not in fields:
            raise PipelineError(f"{what} '{name}' has no option '{key}'; options: "
                                + (", ".join(f"{k} ({describe_type(hints[k])})" for k in fields) or "none"))
        if key in kwargs:
            raise PipelineError(f"{what} '{name}': option '{key}' given twice")
        kwargs[key] = _convert(name, key, raw, hints[key], what)
    try:
        return cls(**kwargs)
    except PipelineError:
        raise
    except (TypeError, ValueError) as e:
        raise PipelineError(f"{what} '{name}': {e}") from None


def parse_pipeline(text: str | None) -> list[Pass]:
    """Parse pipeline text into pass objects; '' or None is the empty pipeline."""
    if text is None or not text.strip():
        return []
    return [parse_item(item) for item in _split_top(text.strip())]


def format_pipeline(passes: list[Pass]) -> str:
    return ",".join(p.spec() for p in passes)


def check_pipeline(passes: list[Pass], given: set[str] | frozenset[str] = frozenset()) -> None:
    """Check what each pass needs and where it stands, before anything loads.

    ``given``: what the caller supplies, keys of ``pass_infra.NEEDS`` ("calibration", "heal_data",
    "cuda"). Raises PipelineError naming the pass and the rule; data given that no pass takes is an
    error too (it was meant for a pass that is missing).
    """
    names = [p.name for p in passes]
    for i, p in enumerate(passes):
        where = f"pass '{p.spec()}' (position {i + 1} of {len(passes)})"
        rule = p.placement
        if rule.last and i != len(passes) - 1:
            raise PipelineError(f"{where} must be the last pass: nothing may follow it; move "
                                f"{', '.join(repr(n) for n in names[i + 1:])} before it")
        if rule.after_lossy and not any(not q.exact for q in passes[:i]):
            raise PipelineError(f"{where} must come after a lossy pass (it works toward the program before the lossy "
                                "passes), e.g. 'gqa(kv_heads=1),heal(steps=300)'")
        early = [q.name for q in passes[:i] if q.name in rule.not_after]
        if early:
            raise PipelineError(f"{where} must not come after {', '.join(repr(n) for n in dict.fromkeys(early))}; "
                                f"put {early[0]} after {p.name}")
        for need in sorted(p.requirements() - {"reference"}):
            if need not in given:
                raise PipelineError(f"{where} needs {NEEDS[need]}")
    taken = set().union(*(p.accepts() for p in passes)) if passes else set()
    if any(not p.exact for p in passes):
        taken.add("calibration")  # its held-out part measures every lossy pass (pass manager)
    for extra in sorted(set(given) - taken - {"cuda"}):
        raise PipelineError(f"{NEEDS[extra].split(' (')[0]} was given, but no pass in the pipeline takes it "
                            f"({', '.join(names) or 'empty pipeline'}); add the pass it is for, e.g. "
                            + ("'gqa(kv_heads=1),heal(steps=300)'" if extra == "heal_data" else "'gqa(kv_heads=4,method=fit)'"))


def check_target(passes: list[Pass], target) -> None:
    """Refuse a pipeline whose weights the target cannot run (bf16 then ONNX), before anything loads.

    Each pass declares the dtype of the weights it leaves (``Pass.weight_dtype``); the target says which
    it cannot run and what works instead (``Target.dtype_advice``). The last pass that sets a dtype wins.
    """
    dtype, by = None, None
    for i, p in enumerate(passes):
        if p.weight_dtype:
            dtype, by = p.weight_dtype, (i, p)
    if dtype is None:
        return
    advice = target.dtype_advice(dtype)
    if advice:
        i, p = by
        raise PipelineError(f"pass '{p.spec()}' (position {i + 1} of {len(passes)}) leaves {dtype} weights, which "
                            f"target '{target.spec()}' cannot run: {advice}")
