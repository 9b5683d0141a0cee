"""ONNX translations of the ``fuse`` operators (``rewriter/fused_ops.py``), for ``torch.onnx.export``.

One recognition, two targets: the ``fuse`` pass finds the subgraphs once; here each operator becomes
ONNX Runtime's fused operator where one exists, and plain ONNX where none does.

| operator | ONNX |
|---|---|
| ``rms_norm`` | opset 23 ``RMSNormalization`` → ORT's ``SimplifiedLayerNormalization`` (scale = offset + w) |
| ``add_rms_norm`` | ``Add`` + ``RMSNormalization`` → ``com.microsoft.SkipSimplifiedLayerNormalization`` (output and the sum) |
| ``gated_act`` | ``Mul(Gelu(a), b)`` / ``Mul(Mul(a, Sigmoid(a)), b)``, which ORT's fusions take from there |
| ``rotary``, ``rotary_pair`` | opset-23 ``RotaryEmbedding`` per tensor: (B, H, S, D) input, cos/sin caches (B, S, D/2) cut from the (B or 1, 1, S, D) tables |
| ``linear_cross_entropy`` | ``MatMul`` (+ ``Add``) → ``SoftmaxCrossEntropyLoss`` |

Norms without a weight, and casting modes other than fp32 arithmetic, are exported exactly as well:
the translation works on the program's dtypes (ONNX export of these programs is fp32).

Use: ``torch.onnx.export(..., custom_translation_table={**evo_rewrite.ops.onnx_translations(),
**fuse_translations()})`` — :func:`translation_table` returns that merged table.
"""

from __future__ import annotations

from evo_rewrite import fused_ops as ops

__all__ = ["fuse_translations", "translation_table", "export_onnx", "to_ort_norms"]

MS_DOMAIN = "com.microsoft"


def fuse_translations() -> dict:
    """``custom_translation_table`` entries for the six ``fuse`` operators."""
    import onnx_ir as ir
    from onnxscript import opset23 as op


    def _scale(weight, offset):
        return weight if not offset else op.Add(weight, op.CastLike(op.Constant(value_float=float(offset)), weight))

    def _ones_like_last(x):
        last = op.Shape(x, start=-1)
        return op.CastLike(op.ConstantOfShape(last, value=ir.tensor([1.0], dtype=ir.DataType.FLOAT)), x)

    def rms_norm(x, weight=None, eps=1e-6, offset=0.0, casting="llama"):
        scale = _ones_like_last(x) if weight is None else _scale(weight, offset)
        # opset 23's RMSNormalization; export_onnx (and the ONNX target's ort form) renames it to ORT's
        # SimplifiedLayerNormalization (onnx_rules.rms_norm_to_ort), which has no ONNX schema to emit it by
        return op.RMSNormalization(x, scale, axis=-1, epsilon=float(eps), stash_type=1)

    def add_rms_norm(a, b, weight=None, eps=1e-6, offset=0.0, casting="llama"):
        scale = _ones_like_last(a) if weight is None else _scale(weight, offset)
        # Add + RMSNormalization here; export_onnx fuses the pair into SkipSimplifiedLayerNormalization
        total = op.Add(a, b)
        return op.RMSNormalization(total, scale, axis=-1, epsilon=float(eps), stash_type=1), total

    def gated_act(a, b, act="silu"):
        if act == "silu":
            h = op.Mul(a, op.Sigmoid(a))
        else:
            h = op.Gelu(a, approximate="tanh" if act == "gelu_tanh" else "none")
        return op.Mul(h, b)

    def _cache(t, half, interleaved):
        # (B or 1, 1, S, D) -> (B or 1, S, D/2): the distinct angles (rotate-half repeats them, interleaved pairs them)
        t = op.Squeeze(t, op.Constant(value_ints=[1]))
        if interleaved:
            return op.Slice(t, op.Constant(value_ints=[0]), op.Constant(value_ints=[2 * half]),
                            op.Constant(value_ints=[-1]), op.Constant(value_ints=[2]))
        return op.Slice(t, op.Constant(value_ints=[0]), op.Constant(value_ints=[half]), op.Constant(value_ints=[-1]))

    def _rotary_one(x, cos, sin, interleaved):
        width = x.shape[-1] if x.shape is not None else None
        if not isinstance(width, int):
            raise ValueError("rotary: the rotated width must be static for ONNX RotaryEmbedding")
        half = width // 2
        batch = op.Shape(x, start=0, end=1)
        seq_half = op.Concat(op.Shape(x, start=2, end=3), op.Constant(value_ints=[half]), axis=0)
        shape = op.Concat(batch, seq_half, axis=0)  # (B, S, D/2): caches per batch row
        c = op.Expand(_cache(cos, half, interleaved), shape)
        s = op.Expand(_cache(sin, half, interleaved), shape)
        return op.RotaryEmbedding(x, op.CastLike(c, x), op.CastLike(s, x), interleaved=int(interleaved))

    def rotary(x, cos, sin, interleaved=False):
        return _rotary_one(x, cos, sin, interleaved)

    def rotary_pair(q, k, cos, sin, interleaved=False):
        return _rotary_one(q, cos, sin, interleaved), _rotary_one(k, cos, sin, interleaved)

    def linear_cross_entropy(hidden, weight, bias=None, target=None, ignore_index=-100, reduction="mean",
                             upcast=True):
        logits = op.MatMul(hidden, op.Transpose(weight, perm=[1, 0]))
        if bias is not None:
            logits = op.Add(logits, bias)
        vocab = op.Shape(weight, start=0, end=1)
        logits = op.Reshape(logits, op.Concat(op.Constant(value_ints=[-1]), vocab, axis=0))
        if upcast:
            logits = op.Cast(logits, to=ir.DataType.FLOAT)
        labels = op.Reshape(target, op.Constant(value_ints=[-1]))
        loss = op.SoftmaxCrossEntropyLoss(logits, labels, ignore_index=int(ignore_index), reduction=reduction)
        return loss[0] if isinstance(loss, (tuple, list)) else loss

    return {ops.RMS_NORM: rms_norm, ops.ADD_RMS_NORM: add_rms_norm, ops.GATED_ACT: gated_act, ops.ROTARY: rotary,
            ops.ROTARY_PAIR: rotary_pair, ops.LINEAR_CROSS_ENTROPY: linear_cross_entropy}


def to_ort_norms(model) -> dict:
    """RMSNormalization → SimplifiedLayerNormalization, and Add + it → SkipSimplifiedLayerNormalization; counts."""
    from onnxscript.rewriter.ort_fusions.skip_normalization import fuse_skip_rms_normalization

    from .onnx_rules import rms_norm_to_ort

    renamed = rms_norm_to_ort(model)
    return {"SimplifiedLayerNormalization": renamed, "SkipSimplifiedLayerNormalization": fuse_skip_rms_normalization(model)}


def translation_table() -> dict:
    """Every evo_rewrite operator's translation: ``ops.onnx_translations()`` and :func:`fuse_translations`."""
    from evo_rewrite.ops import onnx_translations

    return {**onnx_translations(), **fuse_translations()}


def export_onnx(program, path: str, opset: int = 23, ort_names: bool = True) -> str:
    """Export a (fused) Program to ``path`` with the fused operators translated; return the path.

    A plain export for tests and studies; the ONNX target (``targets/onnx.py``) adds its attention
    lowering and checks on top of the same translation table.
    """
    import torch

    from evo_rewrite.targets.pytorch import export_program

    ep = export_program(program)
    onnx_program = torch.onnx.export(ep, (), dynamo=True, opset_version=opset, optimize=True, verbose=False,
                                     report=False, verify=False, custom_translation_table=translation_table())
    if ort_names:
        to_ort_norms(onnx_program.model)
    onnx_program.save(str(path))
    return str(path)
