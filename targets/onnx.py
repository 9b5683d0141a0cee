"""ONNX target: a ``.onnx`` model for ONNX Runtime with every attention site one fused operator.

How a Program becomes ONNX:

1. Attention must be fused first. For a program that still holds matmul → softmax → matmul attention
   (no ``flash`` in its pipeline, or soft-capped sites plain ``flash`` leaves) the target asks for
   ``flash(softcap=true)`` (``OnnxTarget.prepare``), which the pass manager runs, verified like any pass: soft-capped sites (Gemma2) become
   ``evo_rewrite::softcap_attention`` nodes (rewriter/ops.py). Sites ``flash`` cannot express at all
   stay unfused and are reported with the reason.
2. ``evo_rewrite.targets.pytorch.export_program`` re-exports the program with its symbolic batch and sequence
   dimensions, and ``torch.onnx.export(dynamo=True, opset_version=23)`` lowers each
   ``scaled_dot_product_attention`` call (``enable_gqa`` included) to one ONNX ``Attention`` node
   whose K/V keep their grouped head count, and each softcap_attention node (through a custom
   translation) to one ``Attention`` node with its ``softcap`` attribute.
3. ``attention="onnx"`` keeps those nodes. ``attention="ort"`` rewrites each into ONNX Runtime's
   contrib operator: ``com.microsoft.MultiHeadAttention`` where K/V have as many heads as Q,
   ``com.microsoft.GroupQueryAttention`` (``kv_num_heads`` = the grouped count, ``softcap``) where
   they have fewer or the scores are capped. The rewrite is an onnxscript rule (pattern / check /
   rewrite, :class:`AttentionToOrt`); onnxscript's optimizer then folds the layout transposes it
   leaves next to the model's own, the head split / merge Reshape pairs go (``remove_reshape_pairs``),
   self-attention whose Q/K/V are projections of one input becomes ``com.microsoft.Attention`` with
   the three weights packed (``pack_qkv``), RMSNormalization becomes ORT's SimplifiedLayerNormalization,
   and onnxscript's ``optimize_for_ort`` fuses norms and activations (SkipLayerNormalization, BiasGelu).
   ``attention="onnx"`` stays standard ONNX throughout.
4. ``dtype="fp16"`` converts with ONNX Runtime's own ``float16`` tool (inputs and outputs stay
   fp32). ONNX Runtime's CPU execution provider has no fp16 kernel for most operators (MatMul,
   Add, LayerNormalization, the attention operators) and runs them in fp32 behind casts it
   inserts at load time; the report lists them (``fp32_ops``): on CPU fp16 halves the file, not
   the arithmetic. bf16 is refused (almost no CPU kernels).
5. The model is written to a temporary directory beside the output (weights as external data when
   asked, or automatically above :data:`EXTERNAL_DATA_AUTO_BYTES`), loaded in ONNX Runtime
   (CPUExecutionProvider), run at the example size and at another size against the PyTorch
   program, and only then moved into place (``evo_rewrite.target_infra.emit``).
"""

from __future__ import annotations

import collections
import dataclasses
import math
import os
import re
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable, ClassVar

import numpy as np
import torch
import torch.utils._pytree as pytree

from evo_rewrite.attention import SDPA_OPS, find_attention
from evo_rewrite.errors import OutputError, RewriteError, UsageError, VerificationError
from evo_rewrite.ops import SOFTCAP_ATTENTION
from evo_rewrite.program import Program
from evo_rewrite.target_infra import Target, TargetReport, emit, register_target
from evo_rewrite.verify import compare_outputs

from .onnx_fuse import translation_table
from .onnx_rules import (MS_DOMAIN, eliminate_common_subexpressions, lower_attention_to_ort, pack_qkv, remove_reshape_pairs,
                         repair_for_ort, rms_norm_to_ort, rule_classes, static_dim)

__all__ = ["OnnxTarget", "save_onnx", "to_onnx", "OnnxReport", "AttentionToOrt", "ATTENTION_FORMS", "DEFAULT_ATTENTION",
           "DTYPES", "EXTERNAL_DATA_AUTO_BYTES", "OPSET"]

OPSET = 23
# "onnx": the standard ONNX Attention operator; "ort": com.microsoft MultiHeadAttention / GroupQueryAttention
ATTENTION_FORMS = ("onnx", "ort")
DEFAULT_ATTENTION = "ort"  # measured fastest on ORT's CPU EP (README, "ONNX target")
DTYPES = ("fp32", "fp16")
# protobuf cannot hold a model above 2 GiB; weights above this go to an external data file by default
EXTERNAL_DATA_AUTO_BYTES = 1536 * 2**20
PROVIDER = "CPUExecutionProvider"
# max |Δ| / max |ref| between ORT and the PyTorch program (fp32 program); fp16 is judged against fp32
ORT_TOLERANCE = {"fp32": 1e-4, "fp16": 2e-2}
# the ort form keeps a standard Attention node where no contrib operator fits (grouped cross-attention)
FUSED_OPS = {"onnx": {("", "Attention")},
             "ort": {(MS_DOMAIN, "MultiHeadAttention"), (MS_DOMAIN, "GroupQueryAttention"), (MS_DOMAIN, "Attention"),
                     ("", "Attention")}}


@dataclasses.dataclass(kw_only=True)
class OnnxReport(TargetReport):
    """What the ONNX target wrote and how it checked it (``to_dict()`` lands in the report's targets)."""

    attention: str = DEFAULT_ATTENTION  # the requested form: "onnx" or "ort"
    dtype: str = "fp32"
    opset: int = OPSET
    ort_version: str = ""
    provider: str = PROVIDER
    attention_sites: int = 0  # attention sites in the program (fused or not)
    fused: int = 0  # attention operators in the ONNX graph
    fused_ops: dict[str, int] = dataclasses.field(default_factory=dict)  # e.g. {"GroupQueryAttention": 2}
    kv_heads: list[dict] = dataclasses.field(default_factory=list)  # per fused operator: node, op, heads, kv_heads
    unfused: list[dict] = dataclasses.field(default_factory=list)  # attention sites left as matmul/softmax: module, reason
    flash_applied: int = 0  # sites the target's prepare pipeline fused (program had no flash)
    op_counts: dict[str, int] = dataclasses.field(default_factory=dict)
    checks: list[dict] = dataclasses.field(default_factory=list)  # per input set: inputs, max_abs_error, max_rel_error
    tolerance: float = 0.0
    fp32_ops: list[str] = dataclasses.field(default_factory=list)  # fp16: "op count" the EP runs in fp32 (no kernel)
    external_data: str | None = None
    user_inputs: list[str] = dataclasses.field(default_factory=list)  # the ONNX graph's input names

    @property
    def max_rel_error(self) -> float:
        return max((c["max_rel_error"] for c in self.checks), default=0.0)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["max_rel_error"] = self.max_rel_error
        return d

    def fold_prepared(self, records: list) -> None:
        super().fold_prepared(records)
        for rec in records:
            self.flash_applied += rec.rewrites if rec.verified else 0
            reasons = {s["node"]: s["reason"] for s in rec.skipped}
            for u in self.unfused:
                u["reason"] = (f"flash was rolled back: {rec.failure}" if not rec.verified
                               else reasons.get(u["node"], u["reason"]))
        if self.external_data:
            self.external_data = str(Path(self.path).parent / Path(self.external_data).name)

    def lines(self) -> list[str]:
        fused = ", ".join(f"{op} {n}" for op, n in self.fused_ops.items()) or "none"
        kv = sorted({(h["heads"], h["kv_heads"]) for h in self.kv_heads}, key=str)
        lines = [f"    {self.attention} attention, {self.dtype}, opset {self.opset}, ONNX Runtime {self.ort_version} "
                 f"({self.provider})",
                 f"    fused attention operators / attention sites: {self.fused} / {self.attention_sites} ({fused})"
                 + (f"; heads/kv_heads {', '.join(f'{h}/{k}' for h, k in kv)}" if kv else "")]
        if self.flash_applied:
            lines.append(f"    flash run by the target first: {self.flash_applied} sites fused")
        for u in self.unfused[:4]:
            lines.append(f"    not fused {u['module'] or u['node']}: {u['reason']}")
        for c in self.checks:
            lines.append(f"    ORT vs PyTorch on {c['inputs']}: max abs err {c['max_abs_error']:.2e}, "
                         f"max rel err {c['max_rel_error']:.2e} (tolerance {self.tolerance:g})")
        top = list(self.op_counts.items())[:10]
        lines.append(f"    operators ({sum(self.op_counts.values())}): " + ", ".join(f"{k} {v}" for k, v in top)
                     + (", ..." if len(self.op_counts) > 10 else ""))
        return lines + [f"    note: {n}" for n in self.notes]


def __getattr__(name):
    if name == "AttentionToOrt":
        return rule_classes()[0]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _output_names(program: Program) -> list[str] | None:
    """Readable graph output names from the program's output pytree (``logits``, ``last_hidden_state``)."""
    with torch.no_grad():
        out = program(program.inputs)
    flat, _ = pytree.tree_flatten_with_path(out)
    names = []
    for path, leaf in flat:
        if not isinstance(leaf, torch.Tensor):
            continue
        key = "".join(c if c.isalnum() or c == "_" else "_" for c in pytree.keystr(path)).strip("_")
        names.append(key or f"output_{len(names)}")
    return names if len(set(names)) == len(names) else None


def _contiguous_as_clone(ep) -> None:
    """``contiguous()`` → ``clone(contiguous_format)`` in the exported graph.

    torch.onnx decomposes under ``backed_size_oblivious``, where ``contiguous()`` of a transposed
    (B, S, H, D) attention output can be judged a no-op, and the ``reshape`` after it then fails as
    a ``view`` (T5 after ``flash``). A clone always copies; in ONNX it is an Identity the optimizer drops.
    """
    aten = torch.ops.aten
    for n in list(ep.graph.nodes):
        if n.op == "call_function" and n.target is aten.contiguous.default:
            n.target, n.kwargs = aten.clone.default, {"memory_format": torch.contiguous_format}
        # the same for a flatten of permuted heads after a fused attention call (whose output strides
        # torch.onnx's decomposition sees differently): copy first
        elif n.op == "call_function" and n.target in (aten.flatten.using_ints, aten.view.default, aten.reshape.default,
                                                      aten._unsafe_view.default) and \
                getattr(n.args[0], "target", None) in (aten.permute.default, aten.transpose.int):
            with ep.graph.inserting_before(n):
                n.args = (ep.graph.call_function(aten.clone.default, (n.args[0],),
                                                 {"memory_format": torch.contiguous_format}), *n.args[1:])
            if n.target in (aten.view.default, aten._unsafe_view.default):
                n.target = aten.reshape.default
    ep.graph_module.recompile()


def to_onnx(program: Program, *, attention: str = DEFAULT_ATTENTION) -> tuple[Any, dict]:
    """Export a (fused) program to an onnx_ir Model with ``attention`` lowered; return (model, facts)."""
    import onnxscript.optimizer

    from evo_rewrite.targets.pytorch import export_program

    ep = export_program(program)
    _contiguous_as_clone(ep)
    user_inputs = list(ep.graph_signature.user_inputs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import logging

        quiet = logging.getLogger("torch.onnx")
        level = quiet.level
        quiet.setLevel(logging.ERROR)
        try:
            onnx_program = torch.onnx.export(ep, (), dynamo=True, opset_version=OPSET, optimize=True, verbose=False,
                                             report=False, verify=False, custom_translation_table=translation_table())
        except Exception as exc:  # noqa: BLE001 - exporter failures are the model's, say which op
            raise VerificationError(f"torch.onnx.export cannot export this program: {_export_failure(exc)}; "
                                    "nothing was written (--target pytorch writes this program)") from None
        finally:
            quiet.setLevel(level)
    model = onnx_program.model
    fold_weight_casts(model)
    fold_weight_transposes(model)
    sdpa = sum(1 for n in program.graph.nodes if n.op == "call_function"
               and (n.target in SDPA_OPS or n.target is SOFTCAP_ATTENTION))
    exported_attention = sum(1 for n in model.graph if n.op_type == "Attention" and n.domain == "")
    lowered, packed, ort_fusions = 0, 0, {}
    if attention == "ort":  # before the repairs: the rule reads the masks' shapes, which a repair's Expand hides
        from onnxscript.rewriter.ort_fusions import optimize_for_ort

        lowered = lower_attention_to_ort(model)
        onnxscript.optimizer.optimize(model)  # folds Transpose∘Transpose around the new ops
        remove_reshape_pairs(model)  # then the split-heads / merge-heads Reshape pairs between them
        onnxscript.optimizer.optimize(model)
        packed = pack_qkv(model)  # self-attention with Q/K/V projections of one input: one packed GEMM
        rms_norm_to_ort(model)
        onnxscript.optimizer.optimize(model)
        # onnxscript's ORT fusions for the rest (SkipLayerNormalization, BiasGelu, ...); its attention
        # fusions find nothing left to fuse
        model, counts = optimize_for_ort(model)
        ort_fusions = {k: v for k, v in counts.items() if v}
    repaired = repair_for_ort(model)
    # the rules and repairs compute the same shapes once per site (sequence lengths, expanded caches)
    eliminate_common_subexpressions(model)
    onnxscript.optimizer.optimize(model)
    for name, value in list(model.graph.initializers.items()):  # weights whose every read was folded or repacked
        if not value.uses() and not value.is_graph_output() and not value.is_graph_input():
            model.graph.initializers.pop(name)
    names = _output_names(program)
    if names and len(names) == len(model.graph.outputs):
        taken = {v.name for v in model.graph.inputs}
        if not taken & set(names):
            for v, name in zip(model.graph.outputs, names):
                v.name = name
    name_dims(model)
    model.producer_name, model.producer_version = "evo-rewrite", __import__("evo_rewrite").__version__
    return model, {"sdpa": sdpa, "exported_attention": exported_attention, "lowered": lowered, "packed": packed,
                   "repaired": repaired,
                   "ort_fusions": ort_fusions,
                   "user_inputs": user_inputs}


# inputs a Hugging Face tokenizer makes alongside input_ids: always of its (batch, sequence) shape
_TOKEN_SHAPED = ("input_ids", "attention_mask", "token_type_ids", "position_ids")


def name_dims(model) -> dict[str, str]:
    """Name the graph's symbolic dimensions after what they are, not export's symbols (``s18``, ``s41``):
    ``batch`` for the first dimension of every input, ``sequence`` for the second of the main input and of
    the inputs a tokenizer makes with it, ``past_sequence`` / ``total_sequence`` for a decoder's cache and
    mask, ``<input>_dim<d>`` for the others. Expressions over them
    (``s41 + 1``) are renamed too, on every value of the graph. Returns {old: new}."""
    import onnx_ir as ir

    renames: dict[str, str] = {}
    # a decoder's mask spans the past and the new tokens: not the sequence of input_ids
    cached = any("past" in v.name for v in model.graph.inputs)
    for i, v in enumerate(model.graph.inputs):
        for d, dim in enumerate(v.shape.dims if v.shape is not None else ()):
            if not isinstance(dim, ir.SymbolicDim) or not isinstance(dim.value, str) or dim.value in renames:
                continue
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", dim.value):
                continue  # an expression: renamed through its symbols
            token_shaped = i == 0 or v.name in _TOKEN_SHAPED and not (cached and v.name == "attention_mask")
            renames[dim.value] = ("batch" if d == 0 else "sequence" if d == 1 and token_shaped
                                  else "past_sequence" if d == 2 and "past" in v.name
                                  else "total_sequence" if d == 1 and v.name == "attention_mask"
                                  else f"{v.name}_dim{d}")
    if not renames:
        return renames
    pattern = re.compile(r"\b(" + "|".join(map(re.escape, renames)) + r")\b")

    def rename(value) -> None:
        shape = value.shape
        if shape is None:
            return
        dims, changed = [], False
        for dim in shape.dims:
            if isinstance(dim, ir.SymbolicDim) and isinstance(dim.value, str) and pattern.search(dim.value):
                dim, changed = ir.SymbolicDim(pattern.sub(lambda m: renames[m.group(1)], dim.value)), True
            dims.append(dim)
        if changed:
            value.shape = ir.Shape(dims)

    for v in [*model.graph.inputs, *model.graph.outputs]:
        rename(v)
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        for v in node.outputs:
            rename(v)
    return renames


_TRANSLATING = re.compile(r"Error when translating node %(\S+) .*?target=([\w.:]+)")


def _export_failure(exc: BaseException) -> str:
    """The operator torch.onnx could not translate and why, from its chain of exceptions.

    torch.onnx wraps the cause in several layers ("Failed to convert the exported program ... step 3/3");
    the useful parts are the node it was translating and the innermost message.
    """
    chain, seen, cur = [], set(), exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        chain.append(cur)
        cur = cur.__cause__ or cur.__context__
    op = None
    for e in chain:
        m = _TRANSLATING.search(str(e))
        if m:
            op = (m.group(2), m.group(1))
    root = next((line.strip() for e in reversed(chain) for line in str(e).splitlines() if line.strip()),
                type(chain[-1]).__name__)
    root = re.sub(r"\x1b\[[0-9;]*m", "", root)[:300]
    if op is None:
        return root
    return f"operator {op[0]} (node {op[1]}) cannot be translated: {root}"


# --------------------------------------------------------------------------------------------
# fp16, writing, checking
# --------------------------------------------------------------------------------------------

def _cast_weight(src, dtype: np.dtype):
    """The tensor ``src`` (a torch.onnx TorchTensor or any onnx-ir tensor) as a numpy array of ``dtype``."""
    import onnx_ir as ir

    raw = getattr(src, "raw", None)
    if isinstance(raw, torch.Tensor):
        arr = raw.detach().cpu().to(torch.float32).numpy()
    else:
        arr = np.asarray(src.numpy()).astype(np.float32)
    return ir.Tensor(arr.astype(dtype, copy=False))


def fold_weight_casts(model) -> int:
    """``Cast(bf16/fp16 initializer) -> fp32`` (how an fp32-computing program reads its bf16 weights) becomes one
    fp32 initializer whose data is made only when it is read or written (an onnx-ir ``LazyTensor``), so the model
    holds no fp32 copy of its weights; the low-precision initializer goes when nothing else reads it.
    Returns how many casts were folded."""
    import functools

    import onnx_ir as ir

    low = (ir.DataType.BFLOAT16, ir.DataType.FLOAT16)
    folded = 0
    for node in list(model.graph):
        if node.op_type != "Cast" or node.domain not in ("", "ai.onnx"):
            continue
        src, out = node.inputs[0], node.outputs[0]
        to = node.attributes.get_int("to", None)
        if (src is None or not src.is_initializer() or src.const_value is None or src.dtype not in low
                or to != ir.DataType.FLOAT or out.is_graph_output()):
            continue
        _replace_by_lazy_initializer(model, node, functools.partial(_cast_weight, src.const_value, np.float32),
                                     ir.DataType.FLOAT, list(src.const_value.shape))
        folded += 1
    return folded


def _replace_by_lazy_initializer(model, node, make, dtype, shape) -> None:
    """Replace ``node`` (one output, first input an initializer) by an initializer of its output's name whose
    values ``make()`` computes only when read or written; drop the input initializer when nothing else reads it."""
    import onnx_ir as ir

    src, out = node.inputs[0], node.outputs[0]
    lazy = ir.LazyTensor(make, dtype=dtype, shape=ir.Shape(shape), name=out.name)
    new = ir.Value(name=None, shape=ir.Shape(shape), type=ir.TensorType(dtype), const_value=lazy)
    ir.convenience.replace_all_uses_with(out, new)
    model.graph.remove(node, safe=True)
    new.name = out.name
    out.name = None
    model.graph.register_initializer(new)
    if not src.uses() and not src.is_graph_output():
        model.graph.initializers.pop(src.name)


def _transposed(src, perm: tuple[int, ...]):
    import onnx_ir as ir

    return ir.Tensor(np.ascontiguousarray(np.transpose(src.numpy(), perm)))


def fold_weight_transposes(model) -> int:
    """``Transpose(initializer)`` (how an exported ``linear`` reads its weight) becomes the transposed initializer,
    made lazily like :func:`fold_weight_casts`'s: onnxscript's optimizer folds these only below its size limit,
    and ONNX Runtime would otherwise fold each one when a session starts, holding every weight twice.
    Returns how many were folded."""
    import functools


    folded = 0
    for node in list(model.graph):
        if node.op_type != "Transpose" or node.domain not in ("", "ai.onnx"):
            continue
        src, out = node.inputs[0], node.outputs[0]
        if src is None or not src.is_initializer() or src.const_value is None or out.is_graph_output():
            continue
        shape = list(src.const_value.shape)
        perm_attr = node.attributes.get("perm")
        perm = tuple(perm_attr.as_ints()) if perm_attr is not None else tuple(reversed(range(len(shape))))
        new_shape = [shape[p] for p in perm]
        _replace_by_lazy_initializer(model, node, functools.partial(_transposed, src.const_value, perm), src.dtype,
                                     new_shape)
        folded += 1
    return folded


# initializers at least this large go to the external data file (smaller ones stay in the model, where ORT's
# fp16 converter converts them itself)
EXTERNAL_MIN_BYTES = 1024
_ALIGN = 4096  # each external tensor starts on a page, so ONNX Runtime can map it


def _nbytes(value) -> int:
    """Bytes of an initializer from its type and shape (a lazy initializer is not evaluated)."""
    return int(value.dtype.itemsize * math.prod(int(d) for d in value.const_value.shape))


def _initializer_bytes(model) -> int:
    return sum(_nbytes(v) for v in model.graph.initializers.values() if v.const_value is not None and v.dtype)


def write_streamed(model, path: Path, data_name: str | None, dtype: str) -> int:
    """Write ``model`` to ``path`` in ``dtype`` (fp32 or fp16), weights in ``data_name`` beside it (or inside the
    model when None); return the bytes written. Nothing holds the model's weights twice: the graph is serialized
    with references in place of the large initializers, converted to fp16 there (ONNX Runtime's ``float16`` tool,
    inputs and outputs kept fp32; it retypes the referenced initializers without reading them), and the weights are
    then made, cast and appended one at a time (fp16 with the same clamping as that tool)."""
    import onnx
    import onnx_ir as ir

    sources = {}
    if data_name is not None:
        for value in model.graph.initializers.values():
            t = value.const_value
            if t is None or value.dtype is None:
                continue
            nbytes = _nbytes(value)
            if nbytes < EXTERNAL_MIN_BYTES:
                continue
            sources[value.name] = t
            value.const_value = ir.ExternalTensor(data_name, 0, nbytes, value.dtype, shape=t.shape, name=value.name,
                                                  base_dir=str(path.parent))
    try:
        proto = ir.serde.serialize_model(model)
    finally:
        for name, t in sources.items():
            model.graph.initializers[name].const_value = t
    if dtype == "fp16":
        proto = _to_fp16(proto)
    written = 0
    if data_name is not None:
        from onnxruntime.transformers.float16 import convert_np_to_float16

        np_of = {onnx.TensorProto.FLOAT: np.float32, onnx.TensorProto.FLOAT16: np.float16}
        with open(path.parent / data_name, "wb") as f:
            for init in proto.graph.initializer:
                if init.name not in sources:
                    continue
                src = sources[init.name]
                want = np_of.get(init.data_type)
                if want is None:  # integer and other initializers: as they are
                    arr = np.ascontiguousarray(src.numpy())
                else:
                    arr = _cast_weight(src, np.float32).numpy()
                    if want is np.float16:
                        arr = convert_np_to_float16(arr)
                data = np.ascontiguousarray(arr).tobytes()
                del arr
                offset = f.tell()
                pad = -offset % _ALIGN
                f.write(b"\0" * pad)
                offset += pad
                f.write(data)
                del init.external_data[:]
                for k, v in (("location", data_name), ("offset", str(offset)), ("length", str(len(data)))):
                    init.external_data.add(key=k, value=v)
                init.data_location = onnx.TensorProto.EXTERNAL
                del data
            written = f.tell()
    try:
        blob = proto.SerializeToString()
    except ValueError as exc:  # protobuf's 2 GiB limit
        raise OutputError(f"cannot write {path.name} as one file ({exc}); use external data "
                          "(onnx(external_data=true) / --onnx-external-data)") from None
    path.write_bytes(blob)
    return written + len(blob)


def _to_fp16(proto):
    """fp16 weights and activations with ONNX Runtime's own converter; inputs and outputs stay fp32.

    The converter reads each converted initializer's array only for its shape (``make_value_info_from_tensor``);
    for initializers held as references to data not written yet, the shape is taken from ``dims`` instead (the
    same value), for the duration of the call."""
    import onnx
    from onnxruntime.transformers import float16 as f16

    by_dims = lambda t: onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))  # noqa: E731
    saved, f16.make_value_info_from_tensor = f16.make_value_info_from_tensor, by_dims
    try:
        return f16.convert_float_to_float16(proto, keep_io_types=True, disable_shape_infer=True)
    finally:
        f16.make_value_info_from_tensor = saved


def _fp32_on_ep(path: str, tmpdir: str) -> list[str]:
    """Operators the execution provider runs in fp32 behind casts it inserts (no fp16 kernel), e.g. MatMul.

    ORT's InsertCastTransformer does this silently at session creation; the optimized model it saves
    shows the casts (``InsertedPrecisionFreeCast_*``) and so which operators lack an fp16 kernel.
    """
    import onnx
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    opts.optimized_model_filepath = os.path.join(tmpdir, "ort_optimized.onnx")
    ort.InferenceSession(path, opts, providers=[PROVIDER])
    model = onnx.load(opts.optimized_model_filepath, load_external_data=False)
    os.unlink(opts.optimized_model_filepath)
    inserted = {o for n in model.graph.node if n.op_type == "Cast" and n.name.startswith("InsertedPrecisionFreeCast")
                for o in n.output}
    kept = collections.Counter(n.op_type for n in model.graph.node
                               if n.op_type != "Cast" and any(i in inserted for i in n.input))
    return [f"{op} {n}" for op, n in kept.most_common()]


def _initializer_bytes(model) -> int:
    total = 0
    for v in model.graph.initializers.values():
        if v.const_value is not None:
            total += v.const_value.nbytes
    return total


def _feeds(program: Program, inputs, user_inputs: list[str], session) -> dict[str, np.ndarray]:
    flat = [t for t in pytree.tree_leaves((inputs.args, inputs.kwargs))]
    wanted = {i.name for i in session.get_inputs()}
    feeds = {}
    for name, t in zip(user_inputs, flat):
        if name in wanted and isinstance(t, torch.Tensor):
            feeds[name] = t.detach().cpu().numpy()
    missing = wanted - set(feeds)
    if missing:
        raise RewriteError(f"the ONNX model has inputs {sorted(missing)} that the program's inputs do not provide")
    return feeds


def as_float32(program: Program) -> Program:
    """A bf16 program as one that computes in fp32, which ONNX Runtime's CPU execution provider runs: the
    verification shadow (``evo_rewrite.verify.shadow_program``) with its weights shared, so each bf16 weight
    is cast to fp32 where the graph reads it (no fp32 copy of the model in memory) and floating inputs and
    the dtypes the graph names are cast up. In the exported ONNX each such cast of a weight becomes an fp32
    initializer that is computed only while it is written (:func:`fold_weight_casts`). Other programs as they are."""
    from evo_rewrite.verify import shadow_program, upcast_inputs

    if not any(t.dtype == torch.bfloat16 for t in program.named_tensors().values()):
        return program
    built = shadow_program(program, share_weights=True)
    if built is None or built[1] != torch.bfloat16:
        return program
    sp, low, high = built
    return dataclasses.replace(sp, inputs=upcast_inputs(program.inputs, low, high))


def _check(path: str, program: Program, user_inputs: list[str], dtype: str,
           large: bool = False) -> tuple[list[dict], float, str]:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if large:  # a model with external data: no prepacked second copy of every MatMul weight for a two-input check
        opts.add_session_config_entry("session.disable_prepacking", "1")
    try:
        session = ort.InferenceSession(path, opts, providers=[PROVIDER])
    except Exception as exc:  # noqa: BLE001
        raise VerificationError(f"ONNX Runtime {ort.__version__} ({PROVIDER}) cannot load the exported model: "
                                f"{str(exc).splitlines()[0][:400]}") from None
    tol = ORT_TOLERANCE[dtype]
    checks = []
    for inputs in [program.inputs, program.second_inputs()]:
        if inputs is None:
            continue
        with torch.no_grad():
            ref = [t for t in pytree.tree_leaves(program(inputs)) if isinstance(t, torch.Tensor)]
        try:
            got = session.run(None, _feeds(program, inputs, user_inputs, session))
        except RewriteError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise VerificationError(f"ONNX Runtime fails to run the exported model on {inputs.describe()}: "
                                    f"{str(exc).splitlines()[0][:400]}") from None
        got_t = [torch.from_numpy(np.asarray(g)) for g in got]
        got_t = [g.to(r.dtype) if r.is_floating_point() else g for g, r in zip(got_t, ref)]
        metrics, problem, _ = compare_outputs(ref, got_t)
        if problem or metrics.get("nonfinite_mismatch") or metrics.get("max_rel_error", 0.0) > tol:
            why = problem or ("NaN/inf differ" if metrics.get("nonfinite_mismatch") else
                              f"max relative error {metrics['max_rel_error']:.3g} > {tol:g}")
            raise VerificationError(f"the ONNX model ({dtype}) does not reproduce the PyTorch program in ONNX Runtime "
                                    f"{ort.__version__} ({PROVIDER}) on {inputs.describe()}: {why}; nothing was written")
        checks.append({"inputs": inputs.describe(), "max_abs_error": metrics.get("max_abs_error", 0.0),
                       "max_rel_error": metrics.get("max_rel_error", 0.0)})
    return checks, tol, ort.__version__


def _validate(attention: str, dtype: str, external_data) -> None:
    if attention not in ATTENTION_FORMS:
        raise UsageError(f"unknown ONNX attention form {attention!r}; choose one of {', '.join(ATTENTION_FORMS)} "
                         "(onnx: the standard Attention operator, ort: com.microsoft MultiHeadAttention / "
                         "GroupQueryAttention)")
    if dtype in ("bf16", "bfloat16"):
        raise UsageError("dtype bf16 is not offered: ONNX Runtime's CPU execution provider has bf16 kernels for "
                         "almost no operator, so the model would run in fp32 behind casts; use fp16 or fp32")
    if dtype not in DTYPES:
        raise UsageError(f"unknown ONNX dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    if external_data not in (None, True, False):
        raise UsageError(f"external_data must be True, False or None (automatic above "
                         f"{EXTERNAL_DATA_AUTO_BYTES // 2**20} MiB), not {external_data!r}")


@register_target
@dataclasses.dataclass(frozen=True)
class OnnxTarget(Target):
    """An .onnx model for ONNX Runtime, every attention site one fused operator, checked in ONNX Runtime."""

    name: ClassVar[str] = "onnx"
    summary: ClassVar[str] = ("ONNX for ONNX Runtime: attention as MultiHeadAttention/GroupQueryAttention (ort) or "
                              "the ONNX Attention operator (onnx); checked in ONNX Runtime at two sizes")
    suffix: ClassVar[str] = ".onnx"

    attention: str = DEFAULT_ATTENTION  # ort | onnx
    dtype: str = "fp32"  # fp32 | fp16
    external_data: bool | None = None  # weights in <OUT>.data; None: automatic above 1.5 GiB

    def __post_init__(self):
        _validate(self.attention, self.dtype, self.external_data)

    def dtype_advice(self, dtype: str) -> str | None:
        if dtype == "bfloat16":
            return ("ONNX Runtime's CPU execution provider has no bf16 kernels for MatMul and most operators, so the "
                    "check would fail inside it; drop bf16 and write --target 'onnx(dtype=fp16)' (half precision that "
                    "ONNX Runtime runs), or keep bf16 with --target pytorch on a runtime that has bf16 kernels")
        return None

    def validate(self, program: Program | None, out: Path | None = None) -> None:
        # a program loaded in bf16 is cast to fp32 by write() (see as_float32). A program made bf16 by the `bf16`
        # pass is refused, here and at parse time (dtype_advice): the cast would undo that pass, so the user would
        # get nothing from it while believing they had a bf16 model
        if program is None or not any(a.split("(")[0] == "bf16" for a in program.applied):
            return None
        if any(t.dtype == torch.bfloat16 for t in program.named_tensors().values()):
            raise UsageError(f"the program holds bfloat16 weights ({', '.join(program.applied)}), which target "
                             f"'{self.spec()}' cannot run: {self.dtype_advice('bfloat16')}")
        return None

    def prepare(self, program: Program) -> str:
        pending = [r for r in find_attention(program.module) if r.site is not None and not r.site.fused]
        return "flash(softcap=true)" if pending else ""

    def write(self, program: Program, path: Path) -> OnnxReport:
        program = as_float32(program)

        model, facts = to_onnx(program, attention=self.attention)
        notes = []
        if facts["exported_attention"] != facts["sdpa"]:
            notes.append(f"torch.onnx lowered {facts['exported_attention']} of {facts['sdpa']} SDPA calls to Attention")
        if facts["packed"]:
            notes.append(f"{facts['packed']} self-attention sites take their Q/K/V projections packed into one weight "
                         "(com.microsoft.Attention)")
        if facts["ort_fusions"]:
            notes.append("onnxscript optimize_for_ort: " + ", ".join(f"{k} {v}" for k, v in facts["ort_fusions"].items()))
        if facts["repaired"]["rotary_caches"]:
            notes.append(f"{facts['repaired']['rotary_caches']} RotaryEmbedding nodes got their batch-1 cos/sin caches "
                         "expanded to the batch (onnxscript's opset-23 rotary fusion leaves them at batch 1, which ONNX "
                         "Runtime rejects)")
        if facts["repaired"]["attention_masks"] and self.attention == "onnx":
            notes.append(f"{facts['repaired']['attention_masks']} Attention masks expanded over the query axis (ONNX "
                         "Runtime's CPU Attention kernel does not broadcast them)")
        nbytes = _initializer_bytes(model)  # in fp32: the fp16 file is about half
        external = self.external_data if self.external_data is not None else nbytes > EXTERNAL_DATA_AUTO_BYTES
        data_name = f"{path.name}.data" if external else None
        counts = collections.Counter(_op_name(n) for n in model.graph)
        fused_nodes = [n for n in model.graph if (_domain(n), n.op_type) in FUSED_OPS[self.attention]]
        unfused = [{"module": r.module, "node": r.node.name, "reason": "left unfused by flash"}
                   for r in find_attention(program.module) if r.site is not None and not r.site.fused]
        left_as_attention = counts.get("Attention", 0)
        if self.attention == "ort" and left_as_attention:
            notes.append(f"{left_as_attention} Attention nodes have no ORT contrib equivalent and stay standard Attention")
        write_streamed(model, path, data_name, self.dtype)
        del model
        return OnnxReport(
            attention=self.attention, dtype=self.dtype, attention_sites=_attention_sites(program),
            fused=len(fused_nodes), fused_ops=dict(collections.Counter(_fused_name(n) for n in fused_nodes)),
            kv_heads=[_heads(n) for n in fused_nodes], unfused=unfused, op_counts=dict(counts.most_common()),
            external_data=data_name, notes=notes, user_inputs=facts["user_inputs"])

    def check(self, program: Program, path: Path, report: OnnxReport) -> None:
        program = as_float32(program)  # the ONNX model is checked against the program it was written from
        report.checks, report.tolerance, report.ort_version = _check(str(path), program, report.user_inputs, self.dtype,
                                                                        large=bool(report.external_data))
        if self.dtype == "fp16" and report.external_data:
            report.notes.append(f"fp16 on {PROVIDER}: weights are stored in fp16; ONNX Runtime runs operators that have "
                                "no fp16 kernel (MatMul among them) in fp32 behind casts it inserts (not listed for a "
                                "model with external data: listing them needs a second session)")
        elif self.dtype == "fp16":
            with tempfile.TemporaryDirectory(dir=path.parent) as scratch:
                report.fp32_ops = _fp32_on_ep(str(path), scratch)
            if report.fp32_ops:
                report.notes.append(f"fp16 on {PROVIDER}: weights are stored in fp16, but ONNX Runtime has no fp16 "
                                    "kernel for these operators and runs them in fp32 behind casts it inserts: "
                                    + ", ".join(report.fp32_ops))


def save_onnx(program: Program, path: str | os.PathLike, *, attention: str = DEFAULT_ATTENTION, dtype: str = "fp32",
              external_data: bool | None = None, log: Callable[[str], None] | None = None) -> OnnxReport:
    """Write ``program`` as ONNX to ``path`` (atomically, checked in ONNX Runtime at two sizes).

    ``attention``: ``"ort"`` (MultiHeadAttention / GroupQueryAttention, the default) or ``"onnx"``
    (the opset-23 Attention operator). ``dtype``: ``"fp32"`` or ``"fp16"``. ``external_data``: weights
    in ``<name>.data`` beside the model (True), inside it (False), or automatic (None: external above
    1.5 GiB). Raises UsageError for bad options, OutputError for an unwritable path and
    VerificationError when ONNX Runtime does not reproduce the program.
    """
    return emit(program, OnnxTarget(attention or DEFAULT_ATTENTION, dtype, external_data), path, log=log)


def _attention_sites(program: Program) -> int:
    """Attention sites of the program, fused or not (soft-capped ones are evo_rewrite::softcap_attention nodes)."""
    return (sum(1 for r in find_attention(program.module) if r.site is not None)
            + sum(1 for n in program.graph.nodes if n.op == "call_function" and n.target is SOFTCAP_ATTENTION))


def _fused_name(node) -> str:
    """The operator's name in reports; ORT's contrib ``Attention`` (packed Q/K/V projection) is told apart."""
    return "Attention(packed QKV)" if node.op_type == "Attention" and _domain(node) == MS_DOMAIN else node.op_type


def _heads(node) -> dict:
    a = node.attributes
    if node.op_type == "Attention" and _domain(node) != MS_DOMAIN:
        q, k = node.inputs[0].shape, node.inputs[1].shape
        heads = q[1] if q is not None and len(q) == 4 else a.get_int("q_num_heads", None)
        kv = k[1] if k is not None and len(k) == 4 else a.get_int("kv_num_heads", None)
    else:
        heads = a.get_int("num_heads", None)
        kv = a.get_int("kv_num_heads", heads)
    return {"node": node.name, "op": _fused_name(node), "heads": static_dim(heads), "kv_heads": static_dim(kv)}


def _domain(node) -> str:
    return "" if node.domain in ("", "ai.onnx") else node.domain


def _op_name(node) -> str:
    """``MatMul`` for standard operators, ``com.microsoft.MultiHeadAttention`` for contrib ones."""
    return f"{_domain(node)}.{node.op_type}" if _domain(node) else node.op_type
