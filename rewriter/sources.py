"""Sources: turn what the user names into a module and example inputs (or a Program, for .pt2).

SOURCE is one of
  * ``model.pt2``                  a torch.export ExportedProgram (every output of evo-rewrite is one)
  * ``path/to/hf_dir``             a Hugging Face model directory (config.json + weights), read offline
  * ``file.py:factory`` or ``pkg.module:factory``  a callable returning a module, or (module, inputs)
  * ``model.pt``                   a pickled nn.Module; loads only with ``allow_pickle=True``
  * ``path/to/out_dir``            a directory a registered target wrote and reads back (``Target.can_read``
                                   / ``Target.read``): the pytorch target's generated source for programs
                                   with checkpoint regions
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import inspect
import io
import json
import os
import pickle
import re
import sys
import tokenize
import zipfile
from pathlib import Path

import torch

from .annotations import METADATA_FILE, read_metadata
from .errors import SourceError, UsageError, quiet
from .inputs import Inputs, TensorSpec, make_inputs, parse_input_spec
from .program import Program, SourceInfo, guard_calls
from .sdpa import restore_pins

__all__ = ["Loaded", "load", "hf_example_inputs", "check_pt2_archive", "check_input_names", "METADATA_FILE"]
_PICKLE_EXT = {".pt", ".pth", ".bin", ".pkl", ".pickle"}


@dataclasses.dataclass
class Loaded:
    source: SourceInfo
    model: torch.nn.Module | None = None
    inputs: Inputs | None = None
    program: Program | None = None  # set for .pt2 sources, which are already captured


def _describe_exc(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]


def _looks_like_factory(src: str) -> bool:
    if ":" not in src:
        return False
    left, right = src.rsplit(":", 1)
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", right):
        return False
    return left.endswith(".py") or bool(re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.]*", left))


def load(source: str | os.PathLike, *, inputs: str | Inputs | None = None, allow_pickle: bool = False,
         trust_code: bool = False, allow_missing_weights: bool = False,
         device: str | torch.device = "cpu") -> Loaded:
    """Load SOURCE and its example inputs. Raises SourceError with what to do on any bad source.

    ``allow_pickle``: unpickle a pickled ``.pt`` module or a ``.pt2``'s pickled entries (runs code in the file).
    ``trust_code``: execute the ``model.py`` of a generated-source directory (checked against its recorded digest).
    ``allow_missing_weights``: load a Hugging Face checkpoint that lacks some of its class's tensors (they stay random).
    """
    src = str(source)
    path = Path(src)
    specs = parse_input_spec(inputs) if isinstance(inputs, str) else None  # a bad --inputs fails before any loading
    written = _load_written(path, trust_code) if path.is_dir() and (path / METADATA_FILE).is_file() else None
    if written is not None:
        loaded = written
    elif path.is_dir():
        loaded = _load_hf(path, allow_missing_weights)
    elif path.is_file() and path.suffix == ".pt2":
        loaded = _load_pt2(path, allow_pickle)
    elif path.is_file() and path.suffix in _PICKLE_EXT:
        loaded = _load_pickle(path, allow_pickle)
    elif _looks_like_factory(src) and not path.exists():
        loaded = _load_factory(src)
    elif path.is_file():
        if zipfile.is_zipfile(path):
            loaded = _load_pt2(path, allow_pickle)
        else:
            raise SourceError(f"{src}: not a model evo-rewrite can read. Give a .pt2 ExportedProgram, a Hugging Face "
                              "model directory, file.py:factory, or a pickled .pt module with --allow-pickle.")
    else:
        raise SourceError(f"{src}: no such file or directory. Give a .pt2 file, a Hugging Face model directory, "
                          "file.py:factory or package.module:factory.")
    if inputs is not None:
        if specs is not None:
            module = loaded.model if loaded.model is not None else loaded.program.module
            check_input_names(specs, module)
            high = _vocab_size(loaded.model) if loaded.model is not None else None
            loaded.inputs = make_inputs(specs, default_high=high)
            check_input_values(specs, module, loaded.inputs)
        else:
            loaded.inputs = inputs
        if loaded.program is not None:
            loaded.program.inputs = loaded.inputs
    if loaded.program is None and loaded.inputs is None:
        loaded.inputs = _guess_inputs(loaded.model)
    if loaded.model is not None:
        loaded.model.to(device)
    if loaded.program is not None and str(device) != "cpu":
        loaded.program.module.to(device)
        if torch.device(device).type == "cuda":
            restore_pins(loaded.program)  # the output recorded the flash pass's backend choice
    if loaded.inputs is not None:
        loaded.inputs = loaded.inputs.to(device)
        if loaded.program is not None:
            loaded.program.inputs = loaded.inputs
    return loaded


def check_input_values(specs: list[TensorSpec], module: torch.nn.Module, inputs: Inputs) -> None:
    """Run ``module`` once on the inputs made from ``--inputs``: values outside an embedding's rows (or a
    negative index) are the user's to fix (a UsageError naming the embedding), not a capture failure."""
    was_training = module.training
    try:
        module.eval()
    except NotImplementedError:  # an unlifted exported program has no train/eval switch
        was_training = None
    try:
        with torch.no_grad(), quiet():
            module(*inputs.args, **inputs.kwargs)
    except IndexError as exc:
        emb = _failing_embedding(exc, module)
        ints = [s for s in specs if not s.dtype.is_floating_point and s.dtype != torch.bool]
        named = ", ".join(s.name for s in ints) or "the inputs"
        where = (f"embedding '{emb[0]}' ({emb[1]} rows, so token ids must lie in 0..{emb[1]})" if emb
                 else "an embedding or index of the model")
        example = (f", e.g. {ints[0].name}:{str(ints[0].dtype).replace('torch.', '')}"
                   f"[{','.join(map(str, ints[0].shape))}]@0..{emb[1]}") if emb and ints else ""
        raise UsageError(f"--inputs: values of {named} fall outside {where} ({_describe_exc(exc)}); give a value range "
                         f"with @lo..hi (hi exclusive){example}") from None
    except Exception:  # noqa: BLE001 - anything else is capture's to report, with the line that failed
        pass
    finally:
        if was_training is not None:
            module.train(was_training)


def _failing_embedding(exc: BaseException, module: torch.nn.Module) -> tuple[str, int] | None:
    names = {id(m): n for n, m in module.named_modules()}
    found = None
    tb = exc.__traceback__
    while tb is not None:
        obj = tb.tb_frame.f_locals.get("self")
        if isinstance(obj, torch.nn.Embedding) and id(obj) in names:
            found = (names[id(obj)], obj.num_embeddings)
        tb = tb.tb_next
    return found


def check_input_names(specs: list[TensorSpec], module: torch.nn.Module) -> None:
    """Refuse ``--inputs`` names that ``module.forward`` does not take (a UsageError naming the ones it does)."""
    try:
        params = inspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        return
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    takes = [n for n, p in params.items() if p.kind not in (inspect.Parameter.VAR_POSITIONAL,
                                                             inspect.Parameter.POSITIONAL_ONLY)]
    unknown = [s.name for s in specs if s.name not in takes]
    if unknown:
        raise UsageError(f"--inputs names {', '.join(unknown)}, but {type(module).__name__}.forward takes "
                         f"{', '.join(takes) or 'no named arguments'}; name each input after an argument of forward")


# ---- .pt2 ----------------------------------------------------------------------------------

_PICKLE_ADVICE = ("unpickling runs code stored in the file, so evo-rewrite did not load it. If you trust the file, rerun "
                  "with --allow-pickle (Python: allow_pickle=True); safer: re-export the model with torch.export.save "
                  "from plain tensors")


def _damaged(path: Path, what: str) -> SourceError:
    return SourceError(f"{path}: not a readable .pt2 ExportedProgram ({what}). The file may be truncated, damaged or "
                       "written by another tool; re-export it with torch.export.save.")


def _sympy_names() -> frozenset[str]:
    """Names a sympy expression written by torch.export may use (srepr of shape expressions)."""
    import sympy
    import torch.utils._sympy.functions as fns

    names = {n for n, v in vars(fns).items() if isinstance(v, type) and issubclass(v, sympy.Basic)}
    names |= {"Symbol", "Integer", "Rational", "Float", "Add", "Mul", "Pow", "Mod", "Max", "Min", "Abs", "floor",
              "ceiling", "sqrt", "Eq", "Ne", "Lt", "Le", "Gt", "Ge", "StrictLessThan", "StrictGreaterThan",
              "LessThan", "GreaterThan", "Equality", "Unequality", "And", "Or", "Not", "Piecewise", "ExprCondPair",
              "true", "false", "oo", "zoo", "nan", "Infinity", "NegativeInfinity", "BooleanTrue", "BooleanFalse",
              "NegativeOne", "One", "Zero", "Half", "True", "False", "None", "precision"}
    from sympy.core.assumptions import _assume_defined

    return frozenset(names | set(_assume_defined))


_SYMBOL_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _plain_sympy(text: str, allowed: frozenset[str]) -> bool:
    """Whether ``text`` is a plain shape expression: known sympy names, symbol names, numbers and operators.

    torch.export.load parses these with ``sympy.sympify``, which evaluates Python, so anything else
    (a builtin, an attribute, a lambda) could run code.
    """
    if not isinstance(text, str) or len(text) > 20000:
        return False
    try:
        tokens = list(tokenize.generate_tokens(io.StringIO(text).readline))
    except (tokenize.TokenError, SyntaxError, IndentationError):
        return False
    for t in tokens:
        if t.type == tokenize.NAME:
            if t.string not in allowed and not re.fullmatch(r"[a-z]{1,6}[0-9]+", t.string):
                return False
        elif t.type == tokenize.STRING:
            if not re.fullmatch(r"'[A-Za-z_][A-Za-z0-9_]*'|\"[A-Za-z_][A-Za-z0-9_]*\"", t.string):
                return False
        elif t.type == tokenize.OP:
            if t.string not in {"(", ")", "+", "-", "*", "/", "**", "//", "%", ",", "=", "==", "!=", "<", ">",
                                "<=", ">="}:
                return False
        elif t.type not in (tokenize.NUMBER, tokenize.NEWLINE, tokenize.NL, tokenize.ENDMARKER):
            return False
    return True


_OPERATOR_TARGETS = {"getitem", "add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "neg", "pos", "abs", "eq",
                     "ne", "lt", "le", "gt", "ge", "and_", "or_", "xor", "not_", "invert", "lshift", "rshift",
                     "matmul", "index", "truth"}


def _plain_target(target: str) -> bool:
    """Whether a node target is an operator torch.export writes (the loader resolves others by attribute path)."""
    if target.startswith("torch.ops.") or target.startswith("#"):
        return True
    if re.fullmatch(r"torch\.(_?sym_[a-z_]+|_assert_async|_assert_scalar|_check[a-z_]*)", target):
        return True
    if target.startswith("_operator."):
        return target.split(".", 1)[1] in _OPERATOR_TARGETS
    if target.startswith("math."):
        return re.fullmatch(r"math\.[a-z0-9_]+", target) is not None
    return not target.startswith(("torch", "_operator", "math"))  # left as a string by the loader: never called


def _walk_graph_json(obj, found: list[tuple[str, str]], depth: int = 0) -> None:
    """Collect ("expr", text) and ("target", text) pairs from a serialized ExportedProgram."""
    if depth > 200:
        found.append(("depth", ""))
        return
    if isinstance(obj, dict):
        for k, v in obj.items():
            if k == "expr_str":
                found.append(("expr", v))
            elif k == "target" and isinstance(v, str) and "inputs" in obj:
                found.append(("target", v))
            else:
                _walk_graph_json(v, found, depth + 1)
    elif isinstance(obj, list):
        for v in obj:
            _walk_graph_json(v, found, depth + 1)


def _torch_load_safe(data: bytes) -> bool:
    try:
        torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        return True
    except Exception:  # noqa: BLE001 - anything the safe unpickler refuses needs the unsafe one
        return False


def check_pt2_archive(path: str | os.PathLike, *, allow_pickle: bool = False) -> None:
    """Read a ``.pt2``'s manifest before torch.export.load does, and refuse what would run code.

    ``torch.export.load`` unpickles (``weights_only=False``) any weight or constant entry marked
    ``use_pickle`` in its payload config, custom and opaque objects, and sample inputs the safe
    unpickler refuses; it evaluates the shape expressions of ``models/*.json`` with ``sympy.sympify``
    and resolves node targets by attribute path from ``torch``; and it loads AOTInductor shared
    libraries. This check refuses pickled entries (unless ``allow_pickle``), compiled code, shape
    expressions and targets that are not what torch.export writes, and entries failing the zip CRC.
    """
    path = Path(path)
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError, EOFError) as exc:
        raise _damaged(path, f"not a zip archive: {_describe_exc(exc)}") from None
    with zf:
        try:
            bad = zf.testzip()
        except Exception as exc:  # noqa: BLE001 - a truncated member, a bad compression stream
            raise _damaged(path, f"an entry cannot be read: {_describe_exc(exc)}") from None
        if bad is not None:
            raise _damaged(path, f"entry {bad} fails its CRC check")
        names = zf.namelist()
        roots = {n.split("/", 1)[0] for n in names if "/" in n}
        if len(roots) != 1:
            raise _damaged(path, "not one archive folder")
        root = roots.pop()
        rel = {n.split("/", 1)[1]: n for n in names if "/" in n}

        def read(r: str) -> bytes:
            return zf.read(rel[r])

        def read_json(r: str):
            try:
                return json.loads(read(r))
            except (ValueError, UnicodeDecodeError) as exc:
                raise _damaged(path, f"entry {root}/{r} is not JSON: {_describe_exc(exc)}") from None

        compiled = [n for r, n in rel.items() if r.startswith(("data/aotinductor/", "data/mtia/", "data/executorch/"))
                    and not r.endswith("/")]
        if compiled:
            raise SourceError(f"{path}: entry {compiled[0]} is compiled code (AOTInductor/ExecuTorch), which "
                              "torch.export.load would load into this process; evo-rewrite reads only the "
                              "ExportedProgram. Save the program without compiled artifacts (torch.export.save).")
        models = [r[len("models/"):-len(".json")] for r in rel if r.startswith("models/") and r.endswith(".json")]
        if not models:
            raise _damaged(path, "no models/*.json entry")
        pickled: list[str] = []
        for m in models:
            for legacy in (f"data/weights/{m}.pt", f"data/constants/{m}.pt"):
                if legacy in rel and not _torch_load_safe(read(legacy)):
                    pickled.append(f"{root}/{legacy} (pickled objects)")
            def payload(folder: str):
                """(name, stored file, meta) of each entry of a weights/constants payload config, if present."""
                config = f"data/{folder}/{m}_{folder}_config.json"
                if config not in rel:
                    return []
                cfg = read_json(config)
                entries = cfg.get("config") if isinstance(cfg, dict) else None
                if not isinstance(entries, dict):
                    raise _damaged(path, f"entry {root}/{config} is not a payload config")
                return [(fqn, meta.get("path_name", "?") if isinstance(meta, dict) else "?", meta)
                        for fqn, meta in entries.items()]

            for fqn, where, meta in payload("weights"):
                if not isinstance(meta, dict) or meta.get("use_pickle"):
                    pickled.append(f"{root}/data/weights/{where} (weight {fqn}, marked use_pickle)")
            for fqn, where, meta in payload("constants"):
                if not isinstance(meta, dict) or meta.get("use_pickle"):
                    pickled.append(f"{root}/data/constants/{where} (constant {fqn}, marked use_pickle)")
                elif not str(where).startswith("tensor_"):
                    pickled.append(f"{root}/data/constants/{where} (constant {fqn}, a pickled object)")
            sample = f"data/sample_inputs/{m}.pt"
            if sample in rel and not _torch_load_safe(read(sample)):
                pickled.append(f"{root}/{sample} (sample inputs holding objects the safe unpickler refuses)")
            graph = read_json(f"models/{m}.json")
            if not isinstance(graph, dict):
                raise _damaged(path, f"entry {root}/models/{m}.json is not an ExportedProgram")
            found: list[tuple[str, str]] = []
            _walk_graph_json(graph.get("graph_module"), found)
            allowed = _sympy_names()
            for key in (graph.get("range_constraints") or {}):
                if not _SYMBOL_NAME.fullmatch(str(key)):
                    found.append(("expr", "?"))
            for kind, text in found:
                if kind == "depth" or (kind == "expr" and not _plain_sympy(text, allowed)) or (
                        kind == "target" and not _plain_target(text)):
                    shown = text if len(text) < 80 else text[:77] + "..."
                    what = {"expr": "a shape expression", "target": "a node target",
                            "depth": "a graph nested"}[kind]
                    how = {"expr": "torch.export.load evaluates it as Python",
                           "target": "torch.export.load resolves it to a Python function",
                           "depth": "too deep to check"}[kind]
                    raise SourceError(f"{path}: entry {root}/models/{m}.json holds {what} that torch.export does not "
                                      f"write ({shown!r}; {how}), so evo-rewrite did not load the file. Re-export "
                                      "the model with torch.export.save.")
        if pickled and not allow_pickle:
            more = f" (and {len(pickled) - 1} more)" if len(pickled) > 1 else ""
            raise SourceError(f"{path}: entry {pickled[0]}{more} is pickled: {_PICKLE_ADVICE}")


def _load_pt2(path: Path, allow_pickle: bool = False) -> Loaded:
    from .graph_capture import program_from_exported

    check_pt2_archive(path, allow_pickle=allow_pickle)
    extra = {METADATA_FILE: ""}
    try:
        with quiet():
            ep = torch.export.load(str(path), extra_files=extra)
    except Exception as exc:  # noqa: BLE001 - any failure here means the file is not a usable .pt2
        raise _damaged(path, _describe_exc(exc)) from None
    # export's input guards are Python source that ep.module() would exec: the program keeps them as text,
    # which its InputGuard reads as data (the simple "input dimension <op> size" forms) and never executes
    guards = [g for g in (getattr(ep, "_guards_code", None) or []) if isinstance(g, str)]
    ep._guards_code = []
    try:
        recorded = read_metadata(extra.get(METADATA_FILE), kind="pt2", path=str(path))
    except (ValueError, TypeError, AttributeError, KeyError) as exc:  # not JSON, not an object, odd annotations
        raise SourceError(f"{path}: its {METADATA_FILE} entry is not evo-rewrite metadata ({exc}); re-export the "
                          "model or remove the entry") from None
    ex = getattr(ep, "example_inputs", None)
    if ex is not None:
        inputs = Inputs(tuple(ex[0]), dict(ex[1]))
    else:
        inputs = _inputs_from_placeholders(ep)
    try:
        with quiet():
            program = program_from_exported(ep, inputs, recorded.source, guards)
    except Exception as exc:  # noqa: BLE001 - a graph torch.export wrote but cannot run here
        raise _damaged(path, _describe_exc(exc)) from None
    program.applied = recorded.applied
    program.annotations = recorded.annotations
    guard_calls(program)  # called like the original: positional or keyword, checked, named in errors
    return Loaded(source=recorded.source, inputs=inputs, program=program)


def _inputs_from_placeholders(ep) -> Inputs:
    """Inputs shaped like the program's user inputs (for .pt2 files saved without example inputs)."""
    import torch.utils._pytree as pytree

    flat = []
    for spec in ep.graph_signature.input_specs:
        if spec.kind.name != "USER_INPUT":
            continue
        node = next(n for n in ep.graph.nodes if n.op == "placeholder" and n.name == spec.arg.name)
        v = node.meta["val"]
        shape = [int(s) if not isinstance(s, torch.SymInt) else max(2, int(s.node.hint or 2)) for s in v.shape]
        flat.append(torch.zeros(shape, dtype=v.dtype) if not v.is_floating_point() else torch.randn(shape, dtype=v.dtype))
    args, kwargs = pytree.tree_unflatten(flat, ep.call_spec.in_spec)
    return Inputs(tuple(args), dict(kwargs))


# ---- generated source (a program with checkpoint regions; targets/source.py) ------------------

def _load_written(path: Path, trust_code: bool = False) -> Loaded | None:
    """A directory a registered target wrote and can read back (generated source), or None.

    Reading such a directory may execute code the directory holds (generated source runs its
    ``model.py``), so it needs ``trust_code``; a target whose ``read`` runs no code says so with a
    class attribute ``read_runs_code = False``.
    """
    from .target_infra import registered_targets

    for name, cls in registered_targets().items():
        if not cls.can_read(path):
            continue
        if getattr(cls, "read_runs_code", True) and not trust_code:
            raise SourceError(
                f"{path} is a directory of generated source (written by the {name} target): loading it executes its "
                "Python code, so evo-rewrite did not load it. If you trust it, rerun with --trust-code (Python: "
                "trust_code=True); its code runs only if it is unchanged since evo-rewrite wrote it (the digest "
                f"recorded in {METADATA_FILE}).")
        with quiet():
            program = cls.read(path)
        return Loaded(source=program.source, inputs=program.inputs, program=program)
    return None


# ---- pickle ----------------------------------------------------------------------------------

def _load_pickle(path: Path, allow_pickle: bool) -> Loaded:
    if not allow_pickle:
        try:
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            if "weights_only" in str(exc) or "GLOBAL" in str(exc) or "global" in str(exc):
                raise SourceError(
                    f"{path} is a pickled module: loading it runs code stored in the file, so evo-rewrite did "
                    "not load it. If you trust the file, rerun with --allow-pickle (Python: allow_pickle=True); "
                    "safer: export it once with torch.export.save and pass the .pt2."
                ) from None
            raise SourceError(f"{path}: not a PyTorch file ({_describe_exc(exc)}).") from None
        except Exception as exc:  # noqa: BLE001
            raise SourceError(f"{path}: not a PyTorch file ({_describe_exc(exc)}).") from None
        raise SourceError(f"{path} holds {type(obj).__name__} (tensors or a state dict), not a module. Load it into "
                          "your model in a factory (file.py:factory returning the module) and pass that instead.")
    try:
        with quiet():
            obj = torch.load(str(path), map_location="cpu", weights_only=False)
    except SystemExit as exc:
        raise SourceError(f"{path}: unpickling it called sys.exit({exc.code!r}); evo-rewrite stopped loading it.") from None
    except Exception as exc:  # noqa: BLE001
        raise SourceError(f"{path}: cannot unpickle ({_describe_exc(exc)}). The class of the pickled module must be "
                          "importable here; or pass file.py:factory instead." + _pythonpath_hint(exc)) from None
    if not isinstance(obj, torch.nn.Module):
        raise SourceError(f"{path} holds {type(obj).__name__}, not an nn.Module.")
    return Loaded(source=SourceInfo(kind="pickle", path=str(path), model_class=type(obj).__qualname__), model=obj)


def _pythonpath_hint(exc: BaseException) -> str:
    """For "No module named X": how to make a module in the current directory importable."""
    if not isinstance(exc, ModuleNotFoundError) or not exc.name:
        return ""
    top = exc.name.split(".")[0]
    here = Path.cwd()
    if (here / f"{top}.py").is_file() or (here / top).is_dir():
        return (f" Module {top!r} is in the current directory, which the evo-rewrite command does not import from: "
                f"rerun with PYTHONPATH=. (e.g. PYTHONPATH=. evo-rewrite ...).")
    return (f" Install the package that provides {top!r}, or put its folder on PYTHONPATH (PYTHONPATH=. for the "
            "current directory).")


# ---- factory ---------------------------------------------------------------------------------

def _load_factory(src: str) -> Loaded:
    left, name = src.rsplit(":", 1)
    if left.endswith(".py"):
        file = Path(left)
        if not file.is_file():
            raise SourceError(f"{src}: no such file {left}.")
        mod_name = f"_evo_factory_{abs(hash(str(file.resolve())))}"
        spec = importlib.util.spec_from_file_location(mod_name, file)
        module = importlib.util.module_from_spec(spec)
        sys.modules[mod_name] = module
        try:
            sys.path.insert(0, str(file.resolve().parent))
            spec.loader.exec_module(module)
        except SystemExit as exc:
            raise SourceError(f"{src}: importing {left} called sys.exit({exc.code!r}); a factory's file must not exit "
                              "when imported (guard script code with if __name__ == '__main__').") from None
        except Exception as exc:  # noqa: BLE001
            raise SourceError(f"{src}: importing {left} raised {_describe_exc(exc)}. Fix the file and retry."
                              + _pythonpath_hint(exc)) from None
        finally:
            sys.path.pop(0)
    else:
        try:
            module = importlib.import_module(left)
        except SystemExit as exc:
            raise SourceError(f"{src}: importing module {left!r} called sys.exit({exc.code!r}).") from None
        except Exception as exc:  # noqa: BLE001
            raise SourceError(f"{src}: cannot import module {left!r} ({_describe_exc(exc)})." + _pythonpath_hint(exc)) from None
    fn = getattr(module, name, None)
    if fn is None or not callable(fn):
        raise SourceError(f"{src}: {left} has no callable named {name!r}.")
    try:
        out = fn()
    except SystemExit as exc:
        raise SourceError(f"{src}: the factory called sys.exit({exc.code!r}) instead of returning a module; it must "
                          "return an nn.Module or (module, example_inputs).") from None
    except Exception as exc:  # noqa: BLE001
        raise SourceError(f"{src}: the factory raised {_describe_exc(exc)}. Fix the factory and retry.") from None
    model, inputs = out, None
    if isinstance(out, tuple) and len(out) == 2 and isinstance(out[0], torch.nn.Module):
        model, ex = out
        if isinstance(ex, dict):
            inputs = Inputs((), dict(ex))
        elif isinstance(ex, Inputs):
            inputs = ex
        elif isinstance(ex, (tuple, list)):
            inputs = Inputs(tuple(ex), {})
        elif isinstance(ex, torch.Tensor):
            inputs = Inputs((ex,), {})
        else:
            raise SourceError(f"{src}: the factory returned example inputs of type {type(ex).__name__}; return a "
                              "tuple of positional inputs or a dict of keyword inputs.")
    if not isinstance(model, torch.nn.Module):
        raise SourceError(f"{src}: the factory returned {type(model).__name__}; it must return an nn.Module or "
                          "(module, example_inputs).")
    info = SourceInfo(kind="factory", path=src, model_class=type(model).__qualname__)
    if is_hf_model(model):
        info.hf_config = model.config.to_dict()
        info.hf_class = type(model).__name__
        if inputs is None:
            inputs = hf_example_inputs(model)
    return Loaded(source=info, model=model, inputs=inputs)


# ---- Hugging Face ------------------------------------------------------------------------------

def is_hf_model(model) -> bool:
    return hasattr(model, "config") and type(model).__module__.startswith("transformers")


def _load_hf(path: Path, allow_missing_weights: bool = False) -> Loaded:
    if not (path / "config.json").is_file():
        raise SourceError(f"{path}: a directory without config.json is not a Hugging Face model directory.")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        with quiet():
            import transformers
    except ImportError:
        raise SourceError("reading Hugging Face checkpoints needs transformers: pip install 'evo-rewrite[hf]'") from None
    try:
        with quiet():
            config = transformers.AutoConfig.from_pretrained(str(path), local_files_only=True)
    except Exception as exc:  # noqa: BLE001
        raise SourceError(f"{path}/config.json is not a valid transformers config ({_describe_exc(exc)}).") from None
    archs = getattr(config, "architectures", None) or []
    name = archs[0] if archs and isinstance(archs[0], str) else None
    cls = getattr(transformers, name, None) if name else None
    if cls is not None and not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        raise SourceError(f"{path}/config.json: architectures names {name}, which is not a model class (a tokenizer, "
                          "processor or configuration?); set it to the model class the weights were saved from, "
                          "e.g. BertModel or GPT2LMHeadModel.")
    if cls is None:
        cls = transformers.AutoModel
    try:
        with quiet():
            # dtype="auto": the stored dtype (a bf16 checkpoint stays bf16: half the memory of fp32, and what the
            # model was trained in); transformers reads safetensors memory-mapped, tensor by tensor
            model, info = cls.from_pretrained(str(path), local_files_only=True, attn_implementation="eager",
                                              output_loading_info=True, dtype="auto")
    except Exception as exc:  # noqa: BLE001
        if "mismatched_sizes" in str(exc) or "size mismatch" in str(exc):
            raise SourceError(f"{path}: the stored weights' shapes do not match config.json (transformers refused a "
                              "size mismatch); set config.json to the sizes the weights were saved with.") from None
        raise SourceError(f"{path}: transformers could not load the weights ({_describe_exc(exc)}). The directory "
                          "needs config.json and model.safetensors (or pytorch_model.bin) that match each other.") from None
    missing = sorted(info.get("missing_keys") or ())
    if missing and not allow_missing_weights:
        shown = ", ".join(missing[:6]) + (f" and {len(missing) - 6} more" if len(missing) > 6 else "")
        raise SourceError(f"{path}: the checkpoint lacks {len(missing)} tensor(s) of {type(model).__name__}: {shown}; "
                          "loading it would leave them random. Check that architectures in config.json names the class "
                          "the weights were saved from (not one with an extra head), or rerun with "
                          "--allow-missing-weights (Python: allow_missing_weights=True) to keep them random.")
    info = SourceInfo(kind="hf", path=str(path), model_class=type(model).__qualname__,
                      hf_config=model.config.to_dict(), hf_class=type(model).__name__)
    return Loaded(source=info, model=model, inputs=hf_example_inputs(model, input_names=tokenizer_input_names(path)))


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "tokenizer.model",
                    "spiece.model", "sentencepiece.bpe.model")


def tokenizer_input_names(path: Path) -> list[str] | None:
    """The inputs the checkpoint's own tokenizer produces (``model_input_names``: ``input_ids``,
    ``token_type_ids``, ``attention_mask`` for BERT), or None when the directory has no tokenizer that loads."""
    if not any((path / f).is_file() for f in _TOKENIZER_FILES):
        return None
    try:
        with quiet():
            import transformers

            tok = transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception:  # noqa: BLE001 - no usable tokenizer: the inputs are derived from the config
        return None
    return input_names_of(tok)


def input_names_of(tokenizer) -> list[str] | None:
    """A tokenizer object's ``model_input_names`` (None when it names none)."""
    names = [n for n in (getattr(tokenizer, "model_input_names", None) or []) if isinstance(n, str)]
    return names or None


def hf_example_inputs(model, batch: int = 2, seq: int = 16, *, input_names: list[str] | None = None) -> Inputs:
    """Example inputs of a transformers model (decoder inputs for encoder-decoders).

    ``input_names``: what the model's tokenizer produces (``tokenizer.model_input_names``), so that every one
    of them is an input of the captured program and ``program(**tokenizer(texts))`` works; without a
    tokenizer they are derived from the config (``token_type_ids`` where ``type_vocab_size`` > 1).
    """
    cfg = model.config
    main = getattr(model, "main_input_name", "input_ids")
    g = torch.Generator().manual_seed(0)
    if main == "pixel_values":
        size = getattr(cfg, "image_size", 224)
        size = size[0] if isinstance(size, (list, tuple)) else size
        ch = getattr(cfg, "num_channels", 3)
        return Inputs((), {"pixel_values": torch.randn(batch, ch, size, size, generator=g)})
    text = getattr(cfg, "text_config", None) or cfg
    vocab = getattr(text, "vocab_size", None) or 100
    maxpos = getattr(text, "max_position_embeddings", None) or getattr(text, "n_positions", None) or 512
    seq = max(4, min(seq, int(maxpos) // 2))
    kw = {"input_ids": torch.randint(0, vocab, (batch, seq), generator=g),
          "attention_mask": torch.ones(batch, seq, dtype=torch.long)}
    if input_names is not None:  # the tokenizer's own inputs, those forward takes (masks of ones, segments 0)
        kw = {n: kw[n] if n in kw else torch.zeros(batch, seq, dtype=torch.long)
              for n in input_names if n == "input_ids" or _accepts(model, n)}
        kw.setdefault("input_ids", torch.randint(0, vocab, (batch, seq), generator=g))
    elif (getattr(text, "type_vocab_size", 0) or 0) > 1 and _accepts(model, "token_type_ids"):
        # what a BERT-style tokenizer produces (model(**tok(texts))): the program must accept it
        kw["token_type_ids"] = torch.zeros(batch, seq, dtype=torch.long)
    if getattr(cfg, "is_encoder_decoder", False):
        dseq = max(3, seq // 2)
        kw["decoder_input_ids"] = torch.randint(0, vocab, (batch, dseq), generator=g)
    return Inputs((), kw)


def _accepts(model, name: str) -> bool:
    try:
        import inspect

        return name in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def _vocab_size(model) -> int | None:
    if model is None:
        return None
    sizes = [m.num_embeddings for m in model.modules() if isinstance(m, torch.nn.Embedding)]
    return min(sizes) if sizes else None


def _guess_inputs(model) -> Inputs:
    """A module whose first layer is an embedding takes token ids; otherwise ask for --inputs."""
    vocab = _vocab_size(model)
    if vocab is not None:
        return Inputs((torch.randint(0, vocab, (2, 16), generator=torch.Generator().manual_seed(0)),), {})
    raise SourceError(f"no example inputs for {type(model).__name__}: give them with --inputs, e.g. "
                      "--inputs 'x:float32[2,16,64]' (names are forward's argument names), or return "
                      "(module, example_inputs) from the factory.")
