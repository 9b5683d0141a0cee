"""onnxscript rewrite rules for the ONNX target (pattern / check / rewrite).

``AttentionToOrt`` turns the standard ``Attention`` nodes that ``torch.onnx.export`` emits into ONNX
Runtime's ``MultiHeadAttention`` / ``GroupQueryAttention``; ``RotaryCacheBatch`` and
``AttentionMaskRows`` repair what torch.onnx emits and ORT's CPU kernels reject. The rule classes are
built on first use so that onnxscript loads only when ONNX is wanted.
"""

from __future__ import annotations

import functools

import numpy as np

__all__ = ["lower_attention_to_ort", "repair_for_ort", "rule_classes", "static_dim", "MS_DOMAIN"]

MS_DOMAIN = "com.microsoft"



def static_dim(dim) -> int | None:
    return dim if isinstance(dim, int) else None


def _same_dim(a, b) -> bool:
    return a is not None and b is not None and str(a) == str(b)


@functools.lru_cache(maxsize=None)
def _rule_class():
    """The rule class, built on first use so that onnxscript loads only when ONNX is wanted."""
    import onnx_ir as ir
    from onnxscript.rewriter import pattern

    class AttentionToOrt(pattern.RewriteRuleClassBase):
        """ONNX ``Attention`` on (B, H, S, D) tensors → ``MultiHeadAttention`` or ``GroupQueryAttention``.

        pattern: one Attention node (mask optional), no KV cache inputs or extra outputs.
        check:   4-D Q/K/V with static head counts; no softcap, no QK output; GQA only for
                 self-attention (its K/V sequence must be the query's) with equal head dims.
        rewrite: (B, H, S, D) → (B, S, H·D) for Q, K and V; the mask as a 4-D additive
                 ``attention_bias``; the fused operator; its (B, S, H·Dv) output back to (B, H, S, Dv).
        """

        def __init__(self):
            super().__init__("AttentionToOrt", remove_nodes=True)

        def pattern(self, op, query_BHSD, key_BHkvSD, value_BHkvSDv):
            return op.Attention(query_BHSD, key_BHkvSD, value_BHkvSDv, _allow_other_inputs=True,
                                _allow_other_attributes=True, _outputs=["out_BHSDv"])

        def check(self, context, query_BHSD, key_BHkvSD, value_BHkvSDv, out_BHSDv, **_):
            node = out_BHSDv.producer()
            fail = pattern.MatchResult().fail
            extra = [v for v in node.inputs[4:] if v is not None]
            if extra or len([o for o in node.outputs if o.uses()]) > 1:
                return fail("Attention with a KV cache or extra outputs", node)
            if node.attributes.get_float("softcap", 0.0) or node.attributes.get_int("qk_matmul_output_mode", 0):
                return fail("Attention with softcap or a QK output", node)
            shapes = [v.shape for v in (query_BHSD, key_BHkvSD, value_BHkvSDv)]
            if any(s is None or len(s) != 4 for s in shapes):
                return fail("Q/K/V are not 4-D (B, H, S, D)", node)
            (_, hq, sq, dq), (_, hk, sk, dk), (_, hv, _, dv) = shapes
            if None in (static_dim(hq), static_dim(hk), static_dim(hv), static_dim(dq), static_dim(dv)):
                return fail("head count or head size is not static", node)
            if hq % hk or hk != hv:
                return fail(f"K/V heads ({hk}) do not divide query heads ({hq})", node)
            causal = node.attributes.get_int("is_causal", 0)
            if causal and not _same_dim(sq, sk):
                return fail("causal attention across sequences of different lengths", node)
            if hk != hq and (not _same_dim(sq, sk) or dq != dv):
                return fail("grouped K/V for cross-attention or with a different value head size "
                            "(GroupQueryAttention needs self-attention)", node)
            mask = node.inputs[3] if len(node.inputs) > 3 else None
            if mask is not None and (mask.shape is None or len(mask.shape) > 4):
                return fail("mask of unknown rank", node)
            return True

        def rewrite(self, op, query_BHSD, key_BHkvSD, value_BHkvSDv, out_BHSDv, **_):
            node = out_BHSDv.producer()
            hq, hk = query_BHSD.shape[1], key_BHkvSD.shape[1]
            dv = value_BHkvSDv.shape[3]
            attrs = {}
            scale = node.attributes.get_float("scale", None)
            if scale is not None:
                attrs["scale"] = scale
            causal = node.attributes.get_int("is_causal", 0)
            to_bsd = op.Constant(value_ints=[0, 0, -1])
            query_BSD, key_BSD, value_BSD = (op.Reshape(op.Transpose(t, perm=[0, 2, 1, 3]), to_bsd)
                                             for t in (query_BHSD, key_BHkvSD, value_BHkvSDv))
            mask = node.inputs[3] if len(node.inputs) > 3 else None
            bias = None
            if mask is not None:
                bias = self._bias(op, mask, query_BHSD, key_BHkvSD)
            if hk == hq:
                out_BSD = op.MultiHeadAttention(query_BSD, key_BSD, value_BSD, None, None, bias, num_heads=hq,
                                                unidirectional=causal, _domain=MS_DOMAIN, **attrs)
            else:
                # no KV cache: every row sees the whole (new) sequence; seqlens_k = S - 1 per batch row
                shape_q = op.Shape(query_BHSD)
                seq_1 = op.Slice(shape_q, op.Constant(value_ints=[2]), op.Constant(value_ints=[3]))
                total = op.Cast(op.Squeeze(seq_1), to=ir.DataType.INT32)
                batch_1 = op.Slice(shape_q, op.Constant(value_ints=[0]), op.Constant(value_ints=[1]))
                one = op.Constant(value=ir.tensor(np.array(1, dtype=np.int32)))
                seqlens_k = op.Expand(op.Sub(total, one), batch_1)
                out_BSD, _, _ = op.GroupQueryAttention(
                    query_BSD, key_BSD, value_BSD, None, None, seqlens_k, total, None, None, None, bias,
                    num_heads=hq, kv_num_heads=hk, causal=causal, _domain=MS_DOMAIN, _outputs=3, **attrs)
            return op.Transpose(op.Reshape(out_BSD, op.Constant(value_ints=[0, 0, hq, dv])), perm=[0, 2, 1, 3])

        @staticmethod
        def _bias(op, mask, query_BHSD, key_BHkvSD):
            """The mask as an additive (B|1, H|1, Sq, Sk) bias, which both contrib operators require."""
            if mask.dtype == ir.DataType.BOOL:  # True: attend
                dtype = query_BHSD.dtype.numpy()
                zero = op.Constant(value=ir.tensor(np.zeros((), dtype=dtype)))
                neg = op.Constant(value=ir.tensor(np.array(-np.inf, dtype=dtype)))
                mask = op.Where(mask, zero, neg)
            return _mask_to_scores(op, mask, query_BHSD, key_BHkvSD)

    class AttentionMaskRows(pattern.RewriteRuleClassBase):
        """Repair: ONNX Runtime's CPU Attention kernel does not broadcast a mask over the query axis.

        The ONNX spec allows any mask broadcastable to (B, H, Sq, Sk); ORT 1.32 requires its last two
        axes to be Sq and Sk, so a (B, 1, 1, Sk) padding mask fails.
        pattern: Attention(q, k, v, mask). check: the mask's last two axes are not known to be (Sq, Sk).
        rewrite: Expand the mask to (…, Sq, Sk).
        """

        def __init__(self):
            super().__init__("AttentionMaskRows", remove_nodes=True)

        def pattern(self, op, query_BHSD, key_BHkvSD, value_BHkvSDv, mask):
            return op.Attention(query_BHSD, key_BHkvSD, value_BHkvSDv, mask, _allow_other_inputs=True,
                                _allow_other_attributes=True, _outputs=["out_BHSDv"])

        def check(self, context, query_BHSD, key_BHkvSD, mask, **_):
            fail = pattern.MatchResult().fail
            producer = mask.producer()
            if producer is not None and producer.op_type == "Expand":
                return fail("mask already expanded", mask)
            if query_BHSD.shape is None or key_BHkvSD.shape is None or len(query_BHSD.shape) != 4:
                return fail("Q/K are not 4-D", query_BHSD)
            if mask.shape is not None and len(mask.shape) == 4 and _same_dim(mask.shape[2], query_BHSD.shape[2]) \
                    and _same_dim(mask.shape[3], key_BHkvSD.shape[2]):
                return fail("mask already has (Sq, Sk)", mask)
            if mask.shape is None or len(mask.shape) > 4:
                return fail("mask of unknown rank", mask)
            return True

        def rewrite(self, op, query_BHSD, key_BHkvSD, value_BHkvSDv, mask, out_BHSDv, **_):
            node = out_BHSDv.producer()
            full = _mask_to_scores(op, mask, query_BHSD, key_BHkvSD)
            return op.Attention(query_BHSD, key_BHkvSD, value_BHkvSDv, full, **dict(node.attributes))

    def _mask_to_scores(op, mask, query_BHSD, key_BHkvSD):
        """A mask of rank ≤ 4 as a 4-D tensor whose last two axes are (Sq, Sk)."""
        rank = len(mask.shape)
        if rank < 4:
            mask = op.Unsqueeze(mask, op.Constant(value_ints=list(range(4 - rank))))
        m_shape = list(mask.shape) if rank == 4 else [1] * (4 - rank) + list(mask.shape)
        sq, sk = query_BHSD.shape[2], key_BHkvSD.shape[2]
        if not (_same_dim(m_shape[2], sq) and _same_dim(m_shape[3], sk)):
            ones = op.Constant(value_ints=[1, 1])
            s_q = op.Slice(op.Shape(query_BHSD), op.Constant(value_ints=[2]), op.Constant(value_ints=[3]))
            s_k = op.Slice(op.Shape(key_BHkvSD), op.Constant(value_ints=[2]), op.Constant(value_ints=[3]))
            mask = op.Expand(mask, op.Concat(ones, s_q, s_k, axis=0))
        return mask

    class RotaryCacheBatch(pattern.RewriteRuleClassBase):
        """Repair: RotaryEmbedding whose cos/sin caches have batch 1 while x has a dynamic batch.

        onnxscript's opset-23 rotary fusion (run inside torch.onnx.export) passes HF's (1, S, D/2)
        caches as they are; ONNX Runtime requires them at x's batch size and fails for batch > 1.
        pattern: RotaryEmbedding(x, cos, sin) without position ids. check: cos batch is 1, x's is not.
        rewrite: Expand cos and sin to (B, S, D/2).
        """

        def __init__(self):
            super().__init__("RotaryCacheBatch", remove_nodes=True)

        def pattern(self, op, x, cos, sin):
            return op.RotaryEmbedding(x, cos, sin, _allow_other_attributes=True, _outputs=["rotated"])

        def check(self, context, x, cos, sin, rotated, **_):
            fail = pattern.MatchResult().fail
            producer = cos.producer()
            if producer is not None and producer.op_type == "Expand":
                return fail("caches already expanded", cos)
            if x.shape is None or x.shape[0] == 1:
                return fail("x has batch 1", x)
            if cos.shape is not None and len(cos.shape) == 3 and _same_dim(cos.shape[0], x.shape[0]):
                return fail("caches already have x's batch", cos)
            return True

        def rewrite(self, op, x, cos, sin, rotated, **_):
            node = rotated.producer()
            batch_1 = op.Slice(op.Shape(x), op.Constant(value_ints=[0]), op.Constant(value_ints=[1]))
            rest = op.Slice(op.Shape(cos), op.Constant(value_ints=[1]), op.Constant(value_ints=[3]))
            shape = op.Concat(batch_1, rest, axis=0)
            return op.RotaryEmbedding(x, op.Expand(cos, shape), op.Expand(sin, shape), **dict(node.attributes))

    return AttentionToOrt, RotaryCacheBatch, AttentionMaskRows


def lower_attention_to_ort(model) -> int:
    """Rewrite every ONNX Attention node of an onnx_ir model into ORT's contrib operators; return the count."""
    from onnxscript.rewriter import pattern

    return pattern.RewriteRuleSet([_rule_class()[0].rule()]).apply_to_model(model)


def repair_for_ort(model) -> dict[str, int]:
    """Fix what torch.onnx emits and ONNX Runtime's CPU kernels reject; return the count per repair.

    ``RotaryCacheBatch``: batch-1 rotary caches expanded to x's batch. ``AttentionMaskRows``: Attention
    masks expanded over the query axis.
    """
    from onnxscript.rewriter import pattern

    _, rotary, mask_rows = _rule_class()
    return {"rotary_caches": pattern.RewriteRuleSet([rotary.rule()]).apply_to_model(model),
            "attention_masks": pattern.RewriteRuleSet([mask_rows.rule()]).apply_to_model(model)}


# --------------------------------------------------------------------------------------------
# Program → onnx_ir model
# --------------------------------------------------------------------------------------------


def rule_classes():
    """(AttentionToOrt, RotaryCacheBatch, AttentionMaskRows)."""
    return _rule_class()
