"""Pipeline text: ``gqa(kv_heads=4),flash,checkpoint(every=2)`` <-> a list of Pass objects."""

from __future__ import annotations

import dataclasses
import typing

from .errors import PipelineError
from .pass_infra import Pass, describe_type, get_pass

__all__ = ["parse_pipeline", "format_pipeline"]


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


def _convert(pass_name: str, option: str, raw: str, tp):
    """Convert option text to the field's type; raise PipelineError naming the allowed values."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    raw_s = raw.strip()
    if len(raw_s) >= 2 and raw_s[0] == raw_s[-1] and raw_s[0] in "'\"":
        raw_s = raw_s[1:-1]
    bad = PipelineError(f"pass '{pass_name}': option {option}={raw.strip()!r} is not valid; expected {describe_type(tp)}")
    if origin is typing.Union or str(origin) == "<class 'types.UnionType'>":
        if raw_s.lower() in ("none", "null"):
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _convert(pass_name, option, raw_s, a)
            except PipelineError as e:
                errors.append(e)
        raise bad
    if origin is typing.Literal:
        for a in args:
            if str(a) == raw_s:
                return a
        raise PipelineError(f"pass '{pass_name}': option {option}={raw_s!r} is not valid; allowed: "
                            + ", ".join(str(a) for a in args))
    if origin is tuple:
        inner = raw_s[1:-1] if raw_s.startswith("[") and raw_s.endswith("]") else raw_s
        items = [x for x in _split_top(inner, ",") if x] if "," in inner or inner else []
        if not items and inner:
            items = [inner]
        return tuple(_convert(pass_name, option, x, args[0]) for x in items)
    if tp is bool:
        if raw_s.lower() in ("true", "1", "yes", "on"):
            return True
        if raw_s.lower() in ("false", "0", "no", "off"):
            return False
        raise PipelineError(f"pass '{pass_name}': option {option}={raw_s!r} is not valid; allowed: true, false")
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


def _parse_item(item: str) -> Pass:
    if not item:
        raise PipelineError("empty pass name in pipeline (two commas in a row, or a trailing comma?)")
    if "(" in item:
        if not item.endswith(")"):
            raise PipelineError(f"cannot parse {item!r}: options go in parentheses, e.g. gqa(kv_heads=4)")
        name, body = item[: item.index("(")].strip(), item[item.index("(") + 1: -1]
    else:
        name, body = item.strip(), ""
    cls = get_pass(name)
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for opt in _split_top(body) if body.strip() else []:
        if "=" not in opt:
            raise PipelineError(f"pass '{name}': option {opt!r} needs a value (key=value); options: "
                                + (", ".join(fields) or "none"))
        key, raw = opt.split("=", 1)
        key = key.strip().replace("-", "_")
        if key not in fields:
            raise PipelineError(f"pass '{name}' has no option '{key}'; options: "
                                + (", ".join(f"{k} ({describe_type(hints[k])})" for k in fields) or "none"))
        if key in kwargs:
            raise PipelineError(f"pass '{name}': option '{key}' given twice")
        kwargs[key] = _convert(name, key, raw, hints[key])
    try:
        return cls(**kwargs)
    except PipelineError:
        raise
    except (TypeError, ValueError) as e:
        raise PipelineError(f"pass '{name}': {e}") from None


def parse_pipeline(text: str | None) -> list[Pass]:
    """Parse pipeline text into pass objects; '' or None is the empty pipeline."""
    if text is None or not text.strip():
        return []
    return [_parse_item(item) for item in _split_top(text.strip())]


def format_pipeline(passes: list[Pass]) -> str:
    return ",".join(p.spec() for p in passes)
