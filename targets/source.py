"""Source target: a program with checkpoint regions as generated Python source plus safetensors weights.

``torch.export`` inlines non-reentrant ``torch.utils.checkpoint`` regions (a ``.pt2`` would silently
run without them) and strict export of them fails, so a program with checkpoint regions is written
as a directory::

    OUT/
      model.py            generated source: one class per region (Region_h_0: the block's ATen ops,
                          holding the block's weights), the Model class whose forward calls each
                          region through torch.utils.checkpoint.checkpoint(..., use_reentrant=False),
                          and load(directory, device) to build it from the files beside it
      model.safetensors   the weights by module path (a tensor read under several names stored once)
      inputs.safetensors  the example inputs
      evo_rewrite.json    source, applied pipeline, regions, input/output pytree specs, parameter
                          names, aliases, and each node's module provenance (for evo_rewrite.load)

It is written by the ``pytorch`` target through ``evo_rewrite.target_infra.emit``: into a temporary
directory beside OUT, loaded back (``model.py`` executed), run at the example size and at another size
against the program, and only then renamed into place. ``evo_rewrite.json`` also records the SHA-256
of ``model.py`` so the loader can refuse a file changed since it was written.

``evo_rewrite.load(OUT)`` reads it back: it executes ``model.py`` (code evo-rewrite generated at the
user's request; nothing is unpickled), reads the tensors with safetensors, captures the module with
``torch.export`` (which inlines the regions), restores each node's module provenance from
``evo_rewrite.json`` and installs the regions again, so the program trains with recomputation and
is again a source for any pass or target.
"""

from __future__ import annotations

import builtins
import difflib
import hashlib
import importlib.util
import os
from pathlib import Path

import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from torch.fx.graph import CodeGen, _PyTreeCodeGen, _custom_builtins

from evo_rewrite.annotations import METADATA_FILE, read_metadata, write_metadata
from evo_rewrite.errors import OutputError, SourceError, VerificationError
from evo_rewrite.inputs import Inputs
from evo_rewrite.program import Program
from evo_rewrite.regions import find_regions, outline, region_graph, set_regions, slug
from evo_rewrite.sdpa import portable
from evo_rewrite.target_infra import emit

from .paths import check_reproduces

__all__ = ["save_source", "load_source", "is_source_dir", "check_digest", "FORMAT"]

FORMAT = "evo-rewrite-source/1"
MODEL_FILE, WEIGHTS_FILE, INPUTS_FILE = "model.py", "model.safetensors", "inputs.safetensors"


def _safetensors():
    try:
        import safetensors.torch as st
    except ImportError:
        raise OutputError("writing or reading generated source needs safetensors: pip install 'evo-rewrite[hf]' "
                          "(or pip install safetensors)") from None
    return st


# ---- writing --------------------------------------------------------------------------------------

def _imports(globals_: dict, where: str) -> list[str]:
    """Import lines for the globals generated code refers to (torch ops are reached through ``torch``)."""
    lines = []
    for name, obj in globals_.items():
        if name in _custom_builtins:
            continue  # imported in the file header
        if getattr(builtins, name, None) is obj:
            continue
        mod, qual = getattr(obj, "__module__", None), getattr(obj, "__qualname__", "")
        if not mod or "<" in qual or "." in qual:
            raise OutputError(f"cannot write {where} as source: its graph refers to {obj!r}, which has no import path")
        lines.append(f"from {mod} import {qual} as {name}")
    return lines


def _function_source(graph: fx.Graph, where: str) -> tuple[str, list[str]]:
    code = graph.python_code("self")
    return code.src.strip("\n"), _imports(code.globals, where)


def _indent(src: str, n: int = 4) -> str:
    return "\n".join((" " * n + line) if line.strip() else "" for line in src.splitlines())


def generate(program: Program) -> tuple[str, dict]:
    """The text of model.py and the layout facts evo_rewrite.json records (tensor names, specs)."""
    gm = program.module
    regions = find_regions(gm.graph, program.annotations.checkpoint.paths if program.annotations.checkpoint else ())
    classes, imports = [], []
    for r in regions:
        g = region_graph(r, weights_under=r.path)
        g.set_codegen(CodeGen())
        src, imp = _function_source(g, f"region {r.path}")
        imports += imp
        classes.append(f"class Region_{slug(r.path)}(torch.nn.Module):\n"
                       f"    \"\"\"Block {r.path}: run under activation checkpointing; holds the block's weights.\"\"\"\n\n"
                       f"{_indent(src)}\n")

    def call(new: fx.Graph, region, inputs):
        module = new.get_attr(region.path)
        args = [a for a, old in zip(inputs, region.inputs)
                if not (old.op == "get_attr" and old.target.startswith(region.path + "."))]
        return new.call_function(torch.utils.checkpoint.checkpoint, (module, *args),
                                 {"use_reentrant": False, "preserve_rng_state": region.random})

    top = outline(gm.graph, regions, call)
    for n in list(top.nodes):  # weights now held by a region module are read there
        if n.op == "get_attr" and not n.users:
            top.erase_node(n)
    top.set_codegen(_PyTreeCodeGen(getattr(gm.graph._codegen, "pytree_info", None)))
    src, imp = _function_source(top, "the model")
    imports += imp
    header = [
        f"# Generated by evo-rewrite from {program.source.path or program.source.model_class}; "
        f"pipeline: {','.join(program.applied) or '(none)'}; torch {torch.__version__}.",
        f"# Activation-checkpoint regions: {', '.join(r.path for r in regions)}; each runs under "
        "torch.utils.checkpoint, use_reentrant=False.",
        "# Build it with load() (weights from model.safetensors beside this file), or evo_rewrite.load(<this directory>).",
        "import json", "import os", "",
        *dict.fromkeys(["import torch", "import torch.utils.checkpoint",
                        *sorted(b.import_str for b in _custom_builtins.values()), *sorted(imports)]),
    ]
    regions_map = ", ".join(f"{r.path!r}: Region_{slug(r.path)}" for r in regions)
    body = "\n\n\n".join([
        "\n".join(header), *classes,
        f"class Model(torch.nn.Module):\n    \"\"\"The rewritten program; call it like the original model.\"\"\"\n\n{_indent(src)}\n",
        f"REGIONS = {{{regions_map}}}\n_HERE = os.path.dirname(os.path.abspath(__file__))",
        _LOADER,
    ]) + "\n"
    tensors = program.named_tensors()
    first: dict[int, str] = {}
    aliases = {}
    for name, t in tensors.items():
        if id(t) in first:
            aliases[name] = first[id(t)]
        else:
            first[id(t)] = name
    layout = {
        "regions": [r.path for r in regions],
        "tensors": list(tensors),
        "parameters": [n for n, t in tensors.items() if isinstance(t, torch.nn.Parameter)],
        "aliases": aliases,
        "in_spec": pytree.treespec_dumps(gm._in_spec) if getattr(gm, "_in_spec", None) is not None else None,
        "out_spec": pytree.treespec_dumps(gm._out_spec) if getattr(gm, "_out_spec", None) is not None else None,
    }
    return body, layout


_LOADER = '''def load(directory=_HERE, device="cpu"):
    """Build the model from model.safetensors and evo_rewrite.json in ``directory`` (no unpickling)."""
    import torch.utils._pytree as pytree
    from safetensors.torch import load_file

    with open(os.path.join(directory, "evo_rewrite.json")) as f:
        meta = json.load(f)
    stored = load_file(os.path.join(directory, "model.safetensors"), device=str(device))
    model = Model()
    if meta["in_spec"] is not None:
        model._in_spec = pytree.treespec_loads(meta["in_spec"])
    if meta["out_spec"] is not None:
        model._out_spec = pytree.treespec_loads(meta["out_spec"])
    parameters, made = set(meta["parameters"]), {}
    for name in meta["tensors"]:
        *parents, leaf = name.split(".")
        owner, path = model, []
        for part in parents:
            path.append(part)
            if not hasattr(owner, part):
                owner.add_module(part, REGIONS.get(".".join(path), torch.nn.Module)())
            owner = getattr(owner, part)
        key = meta["aliases"].get(name, name)
        if key not in made:
            t = stored[key]
            made[key] = torch.nn.Parameter(t, requires_grad=t.is_floating_point()) if key in parameters else t
        if isinstance(made[key], torch.nn.Parameter):
            owner.register_parameter(leaf, made[key])
        else:
            owner.register_buffer(leaf, made[key])
    for path, cls in REGIONS.items():  # a region whose block holds no weight of its own
        owner = model
        for i, part in enumerate(path.split(".")):
            if not hasattr(owner, part):
                owner.add_module(part, (cls if i == path.count(".") else torch.nn.Module)())
            owner = getattr(owner, part)
    return model'''


def _provenance(program: Program) -> list:
    """(op, nn_module_stack) of every call_function node in graph order, for load to put back."""
    out = []
    for n in program.graph.nodes:
        if n.op == "call_function":
            stack = n.meta.get("nn_module_stack") or {}
            out.append([str(n.target), {k: [v[0], str(v[1])] for k, v in stack.items()}])
    return out


def is_source_dir(path: str | os.PathLike) -> bool:
    p = Path(path)
    return (p / MODEL_FILE).is_file() and (p / METADATA_FILE).is_file()


def write_source(program: Program, out: Path) -> None:
    """Write ``program`` (with its checkpoint regions) as a source directory at ``out`` (a fresh path)."""
    st = _safetensors()
    program = portable(program)  # the source calls portable SDPA; the annotation keeps the backend choice
    text, layout = generate(program)
    tensors = program.named_tensors()
    unique = {n: tensors[n].detach().contiguous() for n in layout["tensors"] if n not in layout["aliases"]}
    flat, in_spec = pytree.tree_flatten((program.inputs.args, program.inputs.kwargs))
    meta = write_metadata(program, **layout, format=FORMAT, inputs_spec=pytree.treespec_dumps(in_spec),
                          inputs_nontensor={str(i): x for i, x in enumerate(flat) if not isinstance(x, torch.Tensor)},
                          provenance=_provenance(program), model_sha256=hashlib.sha256(text.encode()).hexdigest())
    out.mkdir()
    (out / MODEL_FILE).write_text(text)
    st.save_file({k: v.cpu() for k, v in unique.items()}, str(out / WEIGHTS_FILE))
    st.save_file({str(i): x.detach().cpu().contiguous() for i, x in enumerate(flat) if isinstance(x, torch.Tensor)},
                 str(out / INPUTS_FILE))
    (out / METADATA_FILE).write_text(meta)


def check_source(program: Program, directory: Path) -> None:
    """Load the written directory back (its model.py, which this process just generated) and compare."""
    device = next((t.device for t in program.named_tensors().values()), torch.device("cpu"))
    regions = program.annotations.checkpoint.paths if program.annotations.checkpoint else ()
    calls = (directory / MODEL_FILE).read_text().count("torch.utils.checkpoint.checkpoint(")
    if calls != len(regions):
        raise VerificationError(f"the generated source calls checkpoint {calls} times; the program has "
                                f"{len(regions)} regions")
    module = _import_model(directory).load(str(directory), device=device)
    check_reproduces(program, lambda i: module(*i.args, **i.kwargs), "the generated source")


def save_source(program: Program, path: str | os.PathLike, *, check: bool = True) -> str:
    """Write ``program`` (with its checkpoint regions) as a checked source directory at ``path``; return the path."""
    from .pytorch import PyTorchTarget

    return emit(program, PyTorchTarget(), path, directory=True, check=check).path


# ---- reading --------------------------------------------------------------------------------------

def _import_model(directory: Path):
    """Execute model.py (generated by evo-rewrite) as a fresh module."""
    spec = importlib.util.spec_from_file_location("_evo_generated_model", directory / MODEL_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def check_digest(directory: Path, meta: dict) -> None:
    """Refuse a model.py whose SHA-256 is not the one evo-rewrite recorded when it wrote the directory."""
    recorded = meta.get("model_sha256")
    if not isinstance(recorded, str) or not recorded:
        raise SourceError(f"{directory}: {METADATA_FILE} records no digest of {MODEL_FILE}, so evo-rewrite cannot tell "
                          "whether it is the code it wrote; it did not run it. Write the directory again with this "
                          "version of evo-rewrite.")
    try:
        actual = hashlib.sha256((directory / MODEL_FILE).read_bytes()).hexdigest()
    except OSError as exc:
        raise SourceError(f"{directory}: cannot read {MODEL_FILE} ({exc.strerror or exc})") from None
    if actual != recorded:
        raise SourceError(f"{directory}: {MODEL_FILE} was changed after evo-rewrite wrote it (its SHA-256 is not the one "
                          f"recorded in {METADATA_FILE}), so evo-rewrite did not run it, even with --trust-code. "
                          "Write the directory again from its source model.")


def load_source(path: str | os.PathLike):
    """Read a source directory: (Program with its regions, metadata). Raises SourceError for a bad directory.

    Executes ``model.py``: the caller has the user's consent (``trust_code``); the file runs only if
    its SHA-256 is the one ``write_source`` recorded (:func:`check_digest`).
    """
    from evo_rewrite.graph_capture import capture

    directory = Path(path)
    try:
        recorded = read_metadata((directory / METADATA_FILE).read_text(), kind="generated", path=str(directory))
    except (OSError, ValueError, TypeError, AttributeError, KeyError) as exc:
        raise SourceError(f"{directory}: unreadable {METADATA_FILE} ({exc}); rewrite the model again") from None
    meta = recorded.raw
    if meta.get("format") != FORMAT:
        raise SourceError(f"{directory}: {METADATA_FILE} says format {meta.get('format')!r}, expected {FORMAT!r}; "
                          "write it again with this version of evo-rewrite")
    check_digest(directory, meta)
    try:
        st = _safetensors()
        module = _import_model(directory).load(str(directory))
        stored = st.load_file(str(directory / INPUTS_FILE))
    except OutputError as exc:
        raise SourceError(str(exc)) from None
    except Exception as exc:  # noqa: BLE001 - a damaged or hand-edited directory
        raise SourceError(f"{directory}: cannot build the model from {MODEL_FILE} and {WEIGHTS_FILE} "
                          f"({type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''})") from None
    try:
        spec = pytree.treespec_loads(meta["inputs_spec"])
        flat = [stored[str(i)] if str(i) in stored else meta["inputs_nontensor"][str(i)] for i in range(spec.num_leaves)]
        args, kwargs = pytree.tree_unflatten(flat, spec)
    except Exception as exc:  # noqa: BLE001 - a hand-edited evo_rewrite.json or inputs.safetensors
        raise SourceError(f"{directory}: its example inputs cannot be rebuilt from {INPUTS_FILE} and {METADATA_FILE} "
                          f"({type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''})") from None
    inputs = Inputs(tuple(args), dict(kwargs))
    program = capture(module, inputs, source=recorded.source)
    _restore_provenance(program, meta.get("provenance") or [])
    program.applied = recorded.applied
    program.annotations = recorded.annotations
    ann = recorded.annotations.checkpoint
    set_regions(program, ann.paths if ann else tuple(meta.get("regions") or ()), ann.estimate if ann else None)
    return program, meta


def _restore_provenance(program: Program, recorded: list) -> None:
    """Give the recaptured nodes the module provenance the written program had (matched by op sequence)."""
    nodes = [n for n in program.graph.nodes if n.op == "call_function"]
    matcher = difflib.SequenceMatcher(None, [r[0] for r in recorded], [str(n.target) for n in nodes], autojunk=False)
    for a, b, size in matcher.get_matching_blocks():
        for i in range(size):
            stack = recorded[a + i][1]
            nodes[b + i].meta["nn_module_stack"] = {k: (v[0], v[1]) for k, v in stack.items()}
