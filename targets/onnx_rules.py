"""onnxscript rewrite rules for the ONNX target (pattern / check / rewrite).

``AttentionToOrt`` turns the standard ``Attention`` nodes that ``torch.onnx.export`` emits into ONNX
Runtime's ``MultiHeadAttention`` / ``GroupQueryAttention``; ``PackQKV`` turns self-attention whose
Q/K/V are projections of one input into ``com.microsoft.Attention`` with one packed weight;
``ReshapePairIdentity`` and ``RmsNormToOrt`` (with :func:`merge_equal_shapes` and onnx-ir's CSE) clean up
around them; ``RotaryCacheBatch`` and ``AttentionMaskRows`` repair what torch.onnx emits and ORT's CPU
kernels reject. The rule classes are built on first use so that onnxscript loads only when ONNX is wanted.
"""

from __future__ import annotations

import functools

import numpy as np

__all__ = ["eliminate_common_subexpressions", "lower_attention_to_ort", "merge_equal_shapes", "pack_qkv",
           "remove_reshape_pairs", "repair_for_ort", "rms_norm_to_ort", "rule_classes", "static_dim", "MS_DOMAIN"]

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
        check:   4-D Q/K/V with static head counts; no QK output; GQA (grouped K/V, or a softcap, which
                 only GQA has) only for self-attention (its K/V sequence must be the query's) with equal
                 head dims.
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
            if node.attributes.get_int("qk_matmul_output_mode", 0):
                return fail("Attention with a QK output", node)
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
            if (hk != hq or node.attributes.get_float("softcap", 0.0)) and (not _same_dim(sq, sk) or dq != dv):
                return fail("grouped K/V or a softcap for cross-attention or with a different value head size "
                            "(GroupQueryAttention, the only contrib operator with both, needs self-attention)", node)
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
            softcap = node.attributes.get_float("softcap", 0.0)
            if softcap:
                attrs["softcap"] = softcap
            if hk == hq and not softcap:
                out_BSD = op.MultiHeadAttention(query_BSD, key_BSD, value_BSD, None, None, bias, num_heads=hq,
                                                unidirectional=causal, _domain=MS_DOMAIN, **attrs)
            else:
                # no KV cache: every row sees the whole (new) sequence; seqlens_k = S - 1 per batch row
                seq_1 = op.Shape(query_BHSD, start=2, end=3)
                total = op.Cast(op.Squeeze(seq_1), to=ir.DataType.INT32)
                batch_1 = op.Shape(query_BHSD, start=0, end=1)
                one = op.Constant(value=ir.tensor(np.array(1, dtype=np.int32)))
                seqlens_k = op.Expand(op.Sub(total, one), batch_1)
                out_BSD, _, _ = op.GroupQueryAttention(
                    query_BSD, key_BSD, value_BSD, None, None, seqlens_k, total, None, None, None, bias,
                    num_heads=hq, kv_num_heads=hk, causal=causal, _domain=MS_DOMAIN, _outputs=3, **attrs)
            # contrib operators have no ONNX shape inference: give the output its shape so that the
            # split-heads / merge-heads Reshape pairs around it can be recognised and dropped
            out_BSD.shape = ir.Shape([query_BHSD.shape[0], query_BHSD.shape[2], hq * dv])
            out_BSD.dtype = query_BHSD.dtype
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
        m_shape = [1] * (4 - rank) + list(mask.shape)
        if rank < 4:
            mask = op.Unsqueeze(mask, op.Constant(value_ints=list(range(4 - rank))))
        sq, sk = query_BHSD.shape[2], key_BHkvSD.shape[2]
        if not (_same_dim(m_shape[2], sq) and _same_dim(m_shape[3], sk)):
            ones = op.Constant(value_ints=[1, 1])
            s_q = op.Shape(query_BHSD, start=2, end=3)
            s_k = op.Shape(key_BHkvSD, start=2, end=3)
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
            batch_1 = op.Shape(x, start=0, end=1)
            rest = op.Shape(cos, start=1, end=3)
            shape = op.Concat(batch_1, rest, axis=0)
            return op.RotaryEmbedding(x, op.Expand(cos, shape), op.Expand(sin, shape), **dict(node.attributes))

    class ReshapePairIdentity(pattern.RewriteRuleClassBase):
        """Cleanup: Reshape(Reshape(x)) that gives back x's own shape (the layout around fused operators).

        The ORT contrib operators take (B, S, H·D); the model's projections already are (B, S, H·D),
        reshaped to heads for the exported Attention node. Once the Transposes cancel, a split-heads
        Reshape followed by a merge-heads Reshape is left on each input and on the output.
        pattern: Reshape(Reshape(x, _), _). check: the result's shape equals x's, every dimension known
        (static, or the same named symbol). rewrite: x.
        """

        def __init__(self):
            super().__init__("ReshapePairIdentity", remove_nodes=False)

        def pattern(self, op, x, shape_a, shape_b):
            return op.Reshape(op.Reshape(x, shape_a, _allow_other_attributes=True), shape_b,
                              _allow_other_attributes=True, _outputs=["y"])

        def check(self, context, x, y, **_):
            fail = pattern.MatchResult().fail
            if x.shape is None or y.shape is None or len(x.shape) != len(y.shape):
                return fail("shapes unknown or of different rank", y)
            for a, b in zip(x.shape, y.shape):
                if isinstance(a, int) or isinstance(b, int):
                    if a != b:
                        return fail("a static dimension differs", y)
                elif a.value is None or b.value is None or a.value != b.value:
                    return fail("a symbolic dimension differs or is unnamed", y)
            return True

        def rewrite(self, op, x, **_):
            return op.Identity(x)

    class PackQKV(pattern.RewriteRuleClassBase):
        """MultiHeadAttention whose Q, K and V are projections of one input → ORT's ``Attention``.

        ``com.microsoft.Attention`` takes the input and the three projections packed into one weight
        (and one bias), so one GEMM replaces three MatMul + Add pairs — ORT's fastest path for encoders.
        pattern: MultiHeadAttention(q, k, v, ..., attention_bias) (self-attention).
        check:   each of q, k, v is MatMul(x, W) or MatMul(x, W) + b with the same x, constant 2-D W and
                 1-D b — or the three are one Split of such a projection (nanoGPT's c_attn, GPT-2's Conv1D
                 as a 2-D Gemm); no key padding mask or KV cache; only the first output used.
        rewrite: Attention(x, [Wq | Wk | Wv], [bq | bk | bv], attention_bias) with the same heads, scale
                 and causality (``qkv_hidden_sizes`` when the widths differ).
        """

        def __init__(self):
            super().__init__("PackQKV", remove_nodes=True)

        def pattern(self, op, query, key, value):
            return op.MultiHeadAttention(query, key, value, _allow_other_inputs=True, _allow_other_attributes=True,
                                         _domain=MS_DOMAIN, _outputs=["out"])

        @staticmethod
        def _projection(v):
            """(x, W, b or None) when ``v`` is MatMul(x, W) [+ b] with constant W (D, N) and b (N,)."""
            node = v.producer()
            bias = None
            if node is not None and node.op_type == "Add" and node.domain in ("", "ai.onnx"):
                a, b = node.inputs
                mm, bias = (a, b) if a.producer() is not None and a.producer().op_type == "MatMul" else (b, a)
                if bias.const_value is None or bias.shape is None or len(bias.shape) != 1:
                    return None
                node = mm.producer()
            if node is None or node.op_type != "MatMul" or node.domain not in ("", "ai.onnx"):
                return None
            x, w = node.inputs
            if w.const_value is None or w.shape is None or len(w.shape) != 2:
                return None
            if bias is not None and bias.shape[0] != w.shape[1]:
                return None
            return x, w, bias

        @classmethod
        def _split_projection(cls, query, key, value):
            """(x, W (D, N), b (N,), widths) as arrays when Q, K, V are the three outputs, in order, of one
            Split of a projection of x: MatMul(x, W) [+ b], or a 2-D Gemm between reshapes (GPT-2's Conv1D)."""
            node = query.producer()
            if node is None or node.op_type != "Split" or len(node.outputs) != 3 or \
                    [query, key, value] != list(node.outputs) or any(v.shape is None for v in node.outputs):
                return None
            packed = node.inputs[0]
            if packed.shape is None or node.attributes.get_int("axis", 0) not in (-1, len(packed.shape) - 1):
                return None
            widths = [v.shape[-1] for v in node.outputs]
            if not all(isinstance(w, int) for w in widths):
                return None
            proj = cls._projection(packed)
            if proj is not None:
                return (*cls._arrays(*proj), widths)
            reshape = packed.producer()  # Reshape(Gemm(Reshape(x, (B·S, D)), W, b), (B, S, N))
            if reshape is None or reshape.op_type != "Reshape" or reshape.inputs[0].producer() is None:
                return None
            gemm = reshape.inputs[0].producer()
            if gemm.op_type != "Gemm" or gemm.attributes.get_int("transA", 0) or \
                    gemm.attributes.get_float("alpha", 1.0) != 1.0 or gemm.attributes.get_float("beta", 1.0) != 1.0:
                return None
            flat, w = gemm.inputs[0], gemm.inputs[1]
            bias = gemm.inputs[2] if len(gemm.inputs) > 2 else None
            inner = flat.producer()
            if inner is None or inner.op_type != "Reshape" or w.const_value is None or len(w.shape) != 2:
                return None
            if bias is not None and (bias.const_value is None or bias.shape is None or len(bias.shape) != 1):
                return None
            x = inner.inputs[0]
            if x.shape is None or len(x.shape) != 3 or not all(_same_dim(a, b) for a, b in zip(x.shape[:2], packed.shape[:2])):
                return None
            return (*cls._arrays(x, w, bias, trans_b=bool(gemm.attributes.get_int("transB", 0))), widths)

        @staticmethod
        def _arrays(x, w, bias, trans_b: bool = False):
            """(x, W as a (D, N) array, b as an (N,) array, zeros when the projection has none)."""
            weight = w.const_value.numpy()
            weight = weight.T if trans_b else weight
            return x, weight, bias.const_value.numpy() if bias is not None else np.zeros(weight.shape[1], weight.dtype)

        def _projections(self, query, key, value):
            """(x, weights (D, N) each, biases (N,) each) of the three projections, or None."""
            split = self._split_projection(query, key, value)
            if split is not None:
                x, weight, bias, widths = split
                if weight.shape[1] != sum(widths):
                    return None
                cuts = np.cumsum(widths)[:-1]
                return x, np.split(weight, cuts, axis=1), np.split(bias, cuts)
            projs = [self._projection(v) for v in (query, key, value)]
            if None in projs or not (projs[0][0] is projs[1][0] is projs[2][0]):
                return None
            arrays = [self._arrays(*p) for p in projs]
            return projs[0][0], [a[1] for a in arrays], [a[2] for a in arrays]

        def check(self, context, query, key, value, out, **_):
            node = out.producer()
            fail = pattern.MatchResult().fail
            ins = list(node.inputs) + [None] * (8 - len(node.inputs))
            if any(v is not None for v in (ins[3], ins[4], ins[6], ins[7])):
                return fail("MultiHeadAttention with a packed bias, key padding mask or KV cache", node)
            if any(o.uses() for o in node.outputs[1:]):
                return fail("present K/V outputs are used", node)
            found = self._projections(query, key, value)
            if found is None:
                return fail("Q, K and V are not constant-weight projections of one input", node)
            x, weights, _ = found
            if x.shape is None or len(x.shape) != 3:
                return fail("the projected input is not (B, S, D)", node)
            if len({w.dtype for w in weights}) != 1 or len({w.shape[0] for w in weights}) != 1:
                return fail("projection weights differ in dtype or input width", node)
            return True

        def rewrite(self, op, query, key, value, out, **_):
            node = out.producer()
            x, weights, biases = self._projections(query, key, value)
            widths = [w.shape[1] for w in weights]
            w = op.initializer(ir.tensor(np.ascontiguousarray(np.concatenate(weights, axis=1))),
                               name=f"{node.name}_qkv_weight")
            b = op.initializer(ir.tensor(np.concatenate(biases)), name=f"{node.name}_qkv_bias")
            attrs = {k: a.value for k, a in node.attributes.items() if k in ("num_heads", "scale", "unidirectional",
                                                                             "mask_filter_value")}
            if len(set(widths)) > 1:
                attrs["qkv_hidden_sizes"] = widths
            bias = node.inputs[5] if len(node.inputs) > 5 else None
            packed = op.Attention(x, w, b, None, None, bias, _domain=MS_DOMAIN, **attrs)
            packed.shape, packed.dtype = out.shape, out.dtype
            return packed

    class RmsNormToOrt(pattern.RewriteRuleClassBase):
        """ONNX ``RMSNormalization`` (opset 23) → ONNX Runtime's ``SimplifiedLayerNormalization``.

        torch.onnx emits opset 23's RMSNormalization for ``rms_norm``; ORT runs it, but its fusions
        (and onnxscript's SkipSimplifiedLayerNormalization fusion of the residual Add) know only its own
        SimplifiedLayerNormalization, the same computation under ORT's name.
        pattern: RMSNormalization(x, scale). check: none. rewrite: SimplifiedLayerNormalization(x, scale)
        with the same axis, epsilon and stash_type.
        """

        def __init__(self):
            super().__init__("RmsNormToOrt", remove_nodes=True)

        def pattern(self, op, x, scale):
            return op.RMSNormalization(x, scale, _allow_other_attributes=True, _outputs=["y"])

        def rewrite(self, op, x, scale, y, **_):
            attrs = {k: a.value for k, a in y.producer().attributes.items()}
            out = op.SimplifiedLayerNormalization(x, scale, **attrs)
            out.shape, out.dtype = y.shape, y.dtype
            return out

    return AttentionToOrt, RotaryCacheBatch, AttentionMaskRows, ReshapePairIdentity, PackQKV, RmsNormToOrt


def remove_reshape_pairs(model) -> int:
    """Drop Reshape pairs that give back their input's shape; return the count."""
    from onnxscript.rewriter import pattern

    return pattern.RewriteRuleSet([_rule_class()[3].rule()]).apply_to_model(model)


def pack_qkv(model) -> int:
    """MultiHeadAttention over three projections of one input → packed ``com.microsoft.Attention``; the count."""
    from onnxscript.rewriter import pattern

    return pattern.RewriteRuleSet([_rule_class()[4].rule()]).apply_to_model(model)


def rms_norm_to_ort(model) -> int:
    """RMSNormalization → ORT's SimplifiedLayerNormalization (so ORT's norm fusions apply); the count."""
    from onnxscript.rewriter import pattern

    return pattern.RewriteRuleSet([_rule_class()[5].rule()]).apply_to_model(model)


def merge_equal_shapes(model) -> int:
    """Use one ``Shape`` node for every tensor whose (sliced) shape is the same, symbol for symbol.

    The rules read sizes per site (``Shape(q, start=0, end=1)``: the batch); every layer's query has the same
    symbolic batch and sequence dimensions, so one node can serve all and common-subexpression elimination
    then merges what is computed from it. Dimensions must be static or named symbols (torch.export's).
    """
    seen, merged = {}, 0
    outputs = set(model.graph.outputs)
    for node in list(model.graph):
        if node.op_type != "Shape" or node.domain not in ("", "ai.onnx") or node.outputs[0] in outputs:
            continue
        shape = node.inputs[0].shape
        if shape is None:
            continue
        start, end = node.attributes.get_int("start", 0), node.attributes.get_int("end", len(shape))
        dims = list(shape)[slice(start, end)]
        if any(not isinstance(d, int) and d.value is None for d in dims):
            continue
        key = tuple(d if isinstance(d, int) else str(d.value) for d in dims) + (len(dims),)
        if key in seen:
            node.outputs[0].replace_all_uses_with(seen[key])
            merged += 1
        else:
            seen[key] = node.outputs[0]
    return merged


def eliminate_common_subexpressions(model) -> None:
    """Merge nodes that compute the same thing (the per-site shape arithmetic the rules add)."""
    import onnx_ir.passes.common as common

    merge_equal_shapes(model)
    cse = getattr(common, "CommonSubexpressionEliminationPass", None)
    if cse is not None:  # onnx-ir versions before it: the shape arithmetic is only repeated, not wrong
        cse()(model)


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

    _, rotary, mask_rows, *_ = _rule_class()
    return {"rotary_caches": pattern.RewriteRuleSet([rotary.rule()]).apply_to_model(model),
            "attention_masks": pattern.RewriteRuleSet([mask_rows.rule()]).apply_to_model(model)}


# --------------------------------------------------------------------------------------------
# Program → onnx_ir model
# --------------------------------------------------------------------------------------------


def rule_classes():
    """(AttentionToOrt, RotaryCacheBatch, AttentionMaskRows, ReshapePairIdentity, PackQKV, RmsNormToOrt)."""
    return _rule_class()
