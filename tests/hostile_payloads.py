"""Builders of hostile sources, for tests: each returns what to pass as SOURCE (a path or a spec).

Every payload that executes touches ``marker`` (a path the caller gives) when it runs, so a test
asserts ``not marker.exists()`` to prove the payload did not run. The builders need only torch,
evo_rewrite and (for the Hugging Face ones) transformers and safetensors.

    good_pt2(dir)                               a valid .pt2 of zoo.gpt(n_layer=1), written by evo-rewrite
    pt2_pickled_weight(dir, marker)             a weight entry marked use_pickle whose payload runs when unpickled
    pt2_pickled_constant(dir, marker)           a constant entry marked use_pickle
    pt2_pickled_sample_inputs(dir, marker)      sample inputs that only the unsafe unpickler reads
    pt2_sympy_payload(dir, marker)              a shape expression that runs code under sympy.sympify
    pt2_guards_payload(dir, marker)             export guards (Python source) that run code in ep.module()
    pt2_target_payload(dir)                     a node whose target resolves to torch.os.system
    pt2_aoti_entry(dir)                         a compiled-code entry (AOTInductor)
    pt2_truncated(dir) / pt2_bad_crc(dir)       damaged archives
    pt2_metadata(dir, text)                     evo_rewrite.json replaced by ``text`` (e.g. "[1, 2]")
    generated_dir(dir)                          a generated-source directory (zoo.gpt(n_layer=2) with checkpoints)
    generated_dir_tampered(dir, marker)         ... whose model.py was changed after it was written
    generated_dir_disguised(dir, marker)        ... that also holds a config.json (looks like a HF checkpoint)
    generated_dir_redigested(dir, marker)       ... tampered, with the digest in evo_rewrite.json updated too
    hf_dir(dir) / hf_missing_tensors(dir) / hf_extra_head(dir) / hf_tokenizer_architecture(dir) /
    hf_wrong_shapes(dir)                        tiny Hugging Face checkpoints
    factory_file(dir, body, marker)             ``file.py:factory`` whose factory runs ``body``
    factory_sys_exit(dir, marker)               a factory that calls sys.exit(0)
    factory_uncapturable(dir)                   a factory whose forward has data-dependent control flow
    pickled_module_cwd(dir, marker)             a pickled module whose class lives in DIR/<name>.py only
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import sys
import textwrap
import zipfile
from pathlib import Path

import torch

__all__ = [
    "Touch", "good_pt2", "pt2_pickled_weight", "pt2_pickled_constant", "pt2_pickled_sample_inputs",
    "pt2_sympy_payload", "pt2_guards_payload", "pt2_target_payload", "pt2_aoti_entry", "pt2_truncated",
    "pt2_bad_crc", "pt2_metadata", "rewrite_zip", "generated_dir", "generated_dir_tampered",
    "generated_dir_disguised", "generated_dir_redigested", "hf_dir", "hf_missing_tensors", "hf_extra_head",
    "hf_tokenizer_architecture", "hf_wrong_shapes", "factory_file", "factory_sys_exit", "factory_uncapturable",
    "pickled_module_cwd", "tree_digest",
]


class Touch:
    """Unpickling this object creates ``marker`` (``open(marker, "a")``): proof that a pickle ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "a"))


def tree_digest(path) -> str:
    """SHA-256 over every file under ``path`` (or of the file): to assert no source byte changed."""
    p = Path(path)
    h = hashlib.sha256()
    files = [p] if p.is_file() else sorted(q for q in p.rglob("*") if q.is_file())
    for f in files:
        h.update(str(f.relative_to(p) if f != p else f.name).encode())
        h.update(f.read_bytes())
    return h.hexdigest()


# ---- .pt2 ---------------------------------------------------------------------------------------

def good_pt2(directory, name: str = "good.pt2") -> Path:
    """A valid .pt2 of ``zoo.gpt(n_layer=1)`` written by evo-rewrite (cached per directory)."""
    import evo_rewrite
    from evo_rewrite import zoo

    out = Path(directory) / name
    if not out.exists():
        model, inputs = zoo.gpt(n_layer=1)
        evo_rewrite.rewrite(model, "", example_inputs=inputs).save(out)
    return out


def rewrite_zip(src, dst, change) -> Path:
    """Copy the zip ``src`` to ``dst``; ``change(relative_name, data) -> bytes | None`` edits (None drops) entries.

    ``change`` may also return extra entries: call it with ``(None, None)`` last; it returns a dict
    {relative_name: bytes} to add.
    """
    src, dst = Path(src), Path(dst)
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        root = zin.namelist()[0].split("/", 1)[0]
        for info in zin.infolist():
            rel = info.filename.split("/", 1)[1]
            data = change(rel, zin.read(info))
            if data is not None:
                zout.writestr(info.filename, data)
        for rel, data in (change(None, None) or {}).items():
            zout.writestr(f"{root}/{rel}", data)
    return dst


def _torch_bytes(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def pt2_pickled_weight(directory, marker, name: str = "pickled_weight.pt2") -> Path:
    """A weight entry marked use_pickle; its bytes unpickle to Touch(marker)."""
    directory = Path(directory)

    def change(rel, data):
        if rel is None:
            return None
        if rel == "data/weights/model_weights_config.json":
            cfg = json.loads(data)
            fqn = next(iter(cfg["config"]))
            cfg["config"][fqn]["use_pickle"] = True
            cfg["config"][fqn]["path_name"] = "weight_pickled"
            return json.dumps(cfg).encode()
        return data

    out = rewrite_zip(good_pt2(directory), directory / name, change)
    with zipfile.ZipFile(out, "a") as z:
        root = z.namelist()[0].split("/", 1)[0]
        z.writestr(f"{root}/data/weights/weight_pickled", _torch_bytes(Touch(marker)))
    return out


def pt2_pickled_constant(directory, marker, name: str = "pickled_constant.pt2") -> Path:
    """A constant entry marked use_pickle; its bytes unpickle to Touch(marker)."""
    directory = Path(directory)

    def change(rel, data):
        if rel is None:
            return {"data/constants/tensor_pickled": _torch_bytes(Touch(marker))}
        if rel == "data/constants/model_constants_config.json":
            return json.dumps({"config": {"evil": {"path_name": "tensor_pickled", "is_param": False,
                                                     "use_pickle": True, "tensor_meta": None}}}).encode()
        return data

    return rewrite_zip(good_pt2(directory), directory / name, change)


def pt2_pickled_sample_inputs(directory, marker, name: str = "pickled_inputs.pt2") -> Path:
    """Sample inputs the safe unpickler refuses (torch.export.load then retries with the unsafe one)."""
    directory = Path(directory)

    def change(rel, data):
        if rel == "data/sample_inputs/model.pt":
            return _torch_bytes(((Touch(marker),), {}))
        return data

    return rewrite_zip(good_pt2(directory), directory / name, change)


def _edit_model_json(directory, name, edit) -> Path:
    directory = Path(directory)

    def change(rel, data):
        if rel == "models/model.json":
            return json.dumps(edit(json.loads(data))).encode()
        return data

    return rewrite_zip(good_pt2(directory), directory / name, change)


def pt2_sympy_payload(directory, marker, name: str = "sympy_payload.pt2") -> Path:
    """A shape expression that, evaluated by sympy.sympify, opens ``marker``."""
    code = f"Integer(len(str(open({str(marker)!r}, 'a'))))"

    def edit(m):
        text = json.dumps(m)
        first = text.index('"expr_str": "') + len('"expr_str": "')
        end = text.index('"', first)
        expr = json.loads('"' + text[first:end] + '"')
        new = f"Add({expr}, Mul(Integer(0), {code}))"
        return json.loads(text[:first] + json.dumps(new)[1:-1] + text[end:])

    return _edit_model_json(directory, name, edit)


def pt2_guards_payload(directory, marker, name: str = "guards_payload.pt2") -> Path:
    """Export guards are Python source that ``ep.module()`` executes: one opens ``marker``."""

    def edit(m):
        m["guards_code"] = list(m.get("guards_code") or []) + [f"open({str(marker)!r}, 'a') is not None"]
        return m

    return _edit_model_json(directory, name, edit)


def pt2_target_payload(directory, name: str = "target_payload.pt2") -> Path:
    """A node whose target the loader resolves by attribute path to ``torch.os.system``."""

    def edit(m):
        for node in m["graph_module"]["graph"]["nodes"]:
            if str(node.get("target", "")).startswith("torch.ops.aten.gelu"):
                node["target"] = "torch.os.system"
                break
        return m

    return _edit_model_json(directory, name, edit)


def pt2_aoti_entry(directory, name: str = "aoti.pt2") -> Path:
    """An archive with an AOTInductor entry (a shared library torch.export.load would load)."""
    directory = Path(directory)

    def change(rel, data):
        if rel is None:
            return {"data/aotinductor/model/model.so": b"\x7fELF not really"}
        return data

    return rewrite_zip(good_pt2(directory), directory / name, change)


def pt2_truncated(directory, name: str = "truncated.pt2", keep: float = 0.5) -> Path:
    directory = Path(directory)
    data = good_pt2(directory).read_bytes()
    out = directory / name
    out.write_bytes(data[: int(len(data) * keep)])
    return out


def pt2_bad_crc(directory, name: str = "bad_crc.pt2") -> Path:
    """One byte of a stored weight flipped: the archive opens, the entry fails its CRC."""
    directory = Path(directory)
    src = good_pt2(directory)
    data = bytearray(src.read_bytes())
    with zipfile.ZipFile(src) as z:
        info = next(i for i in z.infolist() if "/data/weights/weight_" in i.filename and i.file_size > 64)
    off = info.header_offset
    name_len = int.from_bytes(data[off + 26:off + 28], "little")
    extra_len = int.from_bytes(data[off + 28:off + 30], "little")
    start = off + 30 + name_len + extra_len
    data[start + 10] ^= 0xFF
    out = directory / name
    out.write_bytes(bytes(data))
    return out


def pt2_metadata(directory, text: str, name: str = "bad_metadata.pt2") -> Path:
    """The evo_rewrite.json entry replaced by ``text`` (e.g. a JSON list)."""
    directory = Path(directory)

    def change(rel, data):
        return text.encode() if rel == "extra/evo_rewrite.json" else data

    return rewrite_zip(good_pt2(directory), directory / name, change)


# ---- generated source ---------------------------------------------------------------------------

def generated_dir(directory, name: str = "generated") -> Path:
    """A generated-source directory written by evo-rewrite (zoo.gpt(n_layer=2), checkpoint every block)."""
    import evo_rewrite
    from evo_rewrite import zoo

    out = Path(directory) / name
    if not out.exists():
        model, inputs = zoo.gpt(n_layer=2)
        evo_rewrite.rewrite(model, "checkpoint(every=1)", example_inputs=inputs, strict=True).save(out)
    return out


def _copy_fresh(src: Path, out: Path) -> Path:
    """Copy the directory ``src`` to ``out``, replacing what a previous call left there."""
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(src, out)
    return out


def _payload_line(marker) -> str:
    return f"\nopen({str(marker)!r}, 'a').close()  # injected\n"


def generated_dir_tampered(directory, marker, name: str = "tampered") -> Path:
    """model.py changed after evo-rewrite wrote it (its recorded digest no longer matches)."""
    out = Path(directory) / name
    _copy_fresh(generated_dir(directory), out)
    with open(out / "model.py", "a") as f:
        f.write(_payload_line(marker))
    return out


def generated_dir_disguised(directory, marker, name: str = "disguised") -> Path:
    """A tampered generated directory that also holds a config.json, as a Hugging Face checkpoint does."""
    out = generated_dir_tampered(directory, marker, name)
    (out / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    return out


def generated_dir_redigested(directory, marker, name: str = "redigested") -> Path:
    """A tampered generated directory whose evo_rewrite.json digest was updated to match (runs only with consent)."""
    out = generated_dir_tampered(directory, marker, name)
    meta = json.loads((out / "evo_rewrite.json").read_text())
    meta["model_sha256"] = hashlib.sha256((out / "model.py").read_bytes()).hexdigest()
    (out / "evo_rewrite.json").write_text(json.dumps(meta))
    return out


# ---- Hugging Face ---------------------------------------------------------------------------------

def _bert_config(**kw):
    import transformers

    return transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                   intermediate_size=64, max_position_embeddings=64, **kw)


def hf_dir(directory, name: str = "hf") -> Path:
    """A tiny BertModel checkpoint (config.json + model.safetensors)."""
    import transformers

    out = Path(directory) / name
    if not out.exists():
        torch.manual_seed(0)
        transformers.BertModel(_bert_config()).save_pretrained(out)
    return out


def _edit_safetensors(path: Path, edit) -> None:
    from safetensors.torch import load_file, save_file

    tensors = edit(load_file(str(path)))
    save_file(tensors, str(path), metadata={"format": "pt"})


def hf_missing_tensors(directory, name: str = "hf_missing", drop: tuple[str, ...] = ("encoder.layer.0.output.dense.weight",
                                                                                   "pooler.dense.bias")) -> Path:
    """A BertModel checkpoint with some tensors removed from model.safetensors."""
    out = Path(directory) / name
    _copy_fresh(hf_dir(directory), out)
    _edit_safetensors(out / "model.safetensors", lambda t: {k: v for k, v in t.items() if k not in drop})
    return out


def hf_extra_head(directory, name: str = "hf_extra_head", arch: str = "BertForSequenceClassification") -> Path:
    """BertModel weights with ``architectures`` naming a class that adds a head (its weights are absent)."""
    out = Path(directory) / name
    _copy_fresh(hf_dir(directory), out)
    cfg = json.loads((out / "config.json").read_text())
    cfg["architectures"] = [arch]
    (out / "config.json").write_text(json.dumps(cfg))
    return out


def hf_tokenizer_architecture(directory, name: str = "hf_tokenizer_arch") -> Path:
    """``architectures`` names a tokenizer class, not a model."""
    return hf_extra_head(directory, name, arch="BertTokenizer")


def hf_wrong_shapes(directory, name: str = "hf_wrong_shapes") -> Path:
    """config.json says a hidden size the stored weights do not have."""
    out = Path(directory) / name
    _copy_fresh(hf_dir(directory), out)
    cfg = json.loads((out / "config.json").read_text())
    cfg["intermediate_size"] = 48
    (out / "config.json").write_text(json.dumps(cfg))
    return out


# ---- factories and pickles ------------------------------------------------------------------------

def factory_file(directory, body: str, marker=None, name: str = "hostile_factory.py", factory: str = "make") -> str:
    """Write ``DIR/name`` with ``def make(): <body>`` (touching ``marker`` first when given); return ``file.py:make``."""
    path = Path(directory) / name
    touch = f"    open({str(marker)!r}, 'a').close()\n" if marker is not None else ""
    path.write_text("import sys\nimport torch\nfrom evo_rewrite import zoo\n\n\n"
                    f"def {factory}():\n{touch}{textwrap.indent(textwrap.dedent(body).strip(), '    ')}\n")
    return f"{path}:{factory}"


def factory_sys_exit(directory, marker=None, code: int = 0) -> str:
    """A factory that calls sys.exit(code) instead of returning a module."""
    return factory_file(directory, f"sys.exit({code})", marker, name="exits_factory.py")


def factory_uncapturable(directory) -> str:
    """A factory whose module branches on a tensor's value (neither export nor symbolic_trace capture it)."""
    path = Path(directory) / "uncapturable.py"
    path.write_text(textwrap.dedent("""\
        import torch


        class Branchy(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.lin = torch.nn.Linear(8, 8)

            def forward(self, x):
                y = self.lin(x)
                if y.sum().item() > 0:  # data-dependent control flow
                    return y * 2
                return y


        def make():
            return Branchy(), (torch.randn(2, 4, 8),)
        """))
    return f"{path}:make"


def pickled_module_cwd(directory, marker, module: str = "mygpt_cwd") -> Path:
    """``DIR/model.pt``: a pickled module whose class is defined in ``DIR/<module>.py`` (importable only from DIR).

    Importing ``<module>`` touches ``marker``; the pickle is written in this process with DIR put
    on sys.path for the moment (and taken off again).
    """
    directory = Path(directory)
    src = directory / f"{module}.py"
    src.write_text(textwrap.dedent(f"""\
        import torch

        open({str(marker)!r}, 'a').close()


        class TinyLM(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.emb = torch.nn.Embedding(32, 8)
                self.out = torch.nn.Linear(8, 32)

            def forward(self, idx):
                return self.out(self.emb(idx))
        """))
    out = directory / "model.pt"
    sys.path.insert(0, str(directory))
    try:
        import importlib

        mod = importlib.import_module(module)
        torch.save(mod.TinyLM(), out)
    finally:
        sys.path.remove(str(directory))
        sys.modules.pop(module, None)
    if os.path.exists(marker):
        os.remove(marker)  # building it imported the module; the marker is for what the loader does
    return out
