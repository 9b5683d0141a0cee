"""The GenAI target's graph rewrite: the exported decoder graph into the shape of GenAI's own builder.

After ``torch.onnx`` export and ORT's fusions, each attention site of a decoder program is one
``com.microsoft.GroupQueryAttention`` (GQA) over (B, S, H·D) inputs, but the graph still carries what the
PyTorch program spelled around it: the split-heads Reshape/Transpose of Q, K and V, opset-23
``RotaryEmbedding`` on Q and K, the merge-heads Reshapes of the output, and one MatMul per projection.
onnxruntime's GQA does all of that itself, so these rules (pattern / check / rewrite, onnxscript's
rewriter) hand it over:

``GqaRotaryInside``
    pattern: GQA(q, k, v, past_k, past_v, seqlens_k, total) where q and k are
    ``Reshape(Transpose(RotaryEmbedding(Transpose(Reshape(proj)))))`` and v is ``Reshape(Reshape(proj))``.
    check:   the projections are (B, S, heads·D); rotary is full-width with the same cos/sin for q and k,
             and those depend on ``position_ids`` alone (so one cache serves every layer).
    rewrite: GQA(q_proj, k_proj, v_proj, past_k, past_v, seqlens_k, total, cos_cache, sin_cache,
             do_rotary=1, rotary_interleaved=<the RotaryEmbedding's>) with ONE shared (L, D/2) cos/sin
             cache pair: the graph's own cos/sin computation evaluated at positions 0..L-1. GQA rotates at
             position past_length + i, which is what GenAI feeds as position_ids (so that input goes).
             ``rotary=False``: the same without the layout ops, rotary kept as 3-D RotaryEmbedding nodes.
``GqaOutputFlat``
    Reshape(Reshape(gqa_out, (0, 0, H, -1)), (B, S, H·D)) → gqa_out.
``GqaPackedQKV``
    GQA(MatMul(x, Wq), MatMul(x, Wk), MatMul(x, Wv), ...) → GQA(MatMul(x, [Wq|Wk|Wv]), None, None, ...)
    (GQA's packed-QKV form; biases packed too).
``PackGateUp``
    Mul(Mul(g, Sigmoid(g)), u) with g = MatMul(x, Wg), u = MatMul(x, Wu) → one MatMul(x, [Wg|Wu]) and a
    Split (``pack_mlp``; on by default: measured a little faster on CPU, see docs/targets/genai.md).
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

__all__ = ["GraphOptions", "GraphCounts", "rewrite_for_genai", "rotary_caches", "MS_DOMAIN"]

MS_DOMAIN = "com.microsoft"
_PERM_BSHD = [0, 2, 1, 3]


@dataclasses.dataclass(frozen=True)
class GraphOptions:
    rotary: bool = True  # rotary embedding inside GroupQueryAttention (one shared cos/sin cache)
    pack_qkv: bool = True  # one Q/K/V MatMul feeding GQA's packed input
    pack_mlp: bool = True  # one gate/up MatMul + Split
    context_length: int = 2048  # rows of the cos/sin cache


@dataclasses.dataclass
class GraphCounts:
    flat_inputs: int = 0  # GQA sites whose Q/K/V lost their Reshape/Transpose
    rotary_inside: int = 0
    flat_outputs: int = 0
    packed_qkv: int = 0
    packed_mlp: int = 0
    removed_inputs: list[str] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)


def _const_ints(v) -> list[int] | None:
    if v is None or v.const_value is None:
        return None
    return [int(x) for x in np.asarray(v.const_value.numpy()).reshape(-1)]


def _is(node, op_type: str, domain: str = "") -> bool:
    return node is not None and node.op_type == op_type and node.domain in ((domain,) if domain else ("", "ai.onnx"))


# ---- the cos/sin cache: the graph's own computation evaluated at positions 0..L-1 -------------------------

def _upstream(values) -> tuple[list, set]:
    """(nodes computing ``values`` in topological order, graph inputs they read)."""
    seen, order, inputs = set(), [], set()

    def visit(v):
        node = v.producer()
        if node is None:
            if v.const_value is None:
                inputs.add(v)
            return
        if id(node) in seen:
            return
        seen.add(id(node))
        for i in node.inputs:
            if i is not None:
                visit(i)
        order.append(node)

    for v in values:
        visit(v)
    return order, inputs


def rotary_caches(model, cos, sin, length: int) -> tuple[np.ndarray, np.ndarray] | str:
    """(cos_cache, sin_cache) of shape (length, D/2): the subgraph computing ``cos``/``sin`` from ``position_ids``
    run in ONNX Runtime at position_ids = [[0, 1, ..., length-1]]; or the reason it cannot be."""
    import onnx
    import onnx_ir as ir
    import onnxruntime as ort

    nodes, inputs = _upstream([cos, sin])
    if {v.name for v in inputs} != {"position_ids"}:
        return f"cos/sin depend on {sorted(v.name for v in inputs)}, not on position_ids alone"
    pos = next(iter(inputs))
    consts = {id(i): i for n in nodes for i in n.inputs if i is not None and i.producer() is None and
              i.const_value is not None}
    graph = onnx.helper.make_graph(
        [ir.serde.serialize_node(n) for n in nodes], "rotary_cache",
        [onnx.helper.make_tensor_value_info(pos.name, onnx.TensorProto.INT64, [1, None])],
        [onnx.helper.make_tensor_value_info(v.name, ir.serde.serialize_value(v).type.tensor_type.elem_type, None)
         for v in (cos, sin)],
        [ir.serde.serialize_tensor(v.const_value) for v in consts.values()])
    opsets = [onnx.helper.make_opsetid(d, v) for d, v in model.opset_imports.items()]
    proto = onnx.helper.make_model(graph, opset_imports=opsets, ir_version=10)
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    c, s = sess.run([cos.name, sin.name], {pos.name: np.arange(length, dtype=np.int64)[None]})
    if c.size % length or c.shape != s.shape:
        return f"cos/sin of shape {c.shape} are not one row per position"
    return c.reshape(length, -1), s.reshape(length, -1)


# ---- the rules ---------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _rules():
    import onnx_ir as ir
    from onnxscript.rewriter import pattern

    from .onnx_rules import rule_classes

    projection = rule_classes()[4]._projection  # PackQKV's: (x, W, b | None) of MatMul(x, W) [+ b]

    def gqa_attrs(node) -> dict:
        return {k: a.value for k, a in node.attributes.items()}

    class GqaRotaryInside(pattern.RewriteRuleClassBase):
        def __init__(self, rotary: bool, caches: dict):
            super().__init__("GqaRotaryInside" if rotary else "GqaFlatInputs", remove_nodes=False)
            self.rotary, self.caches = rotary, caches  # caches: id(cos value) -> (cos_cache, sin_cache) | reason

        @staticmethod
        def _rotated(op, proj, cos, sin, name):
            heads = op.Transpose(op.Reshape(proj, pattern.ANY_VALUE, _allow_other_attributes=True), perm=_PERM_BSHD)
            rot = op.RotaryEmbedding(heads, cos, sin, _allow_other_attributes=True, _outputs=[f"{name}_rot"])
            return op.Reshape(op.Transpose(rot, perm=_PERM_BSHD), pattern.ANY_VALUE, _allow_other_attributes=True,
                              _outputs=[f"{name}_flat"])

        def pattern(self, op, q_proj, k_proj, v_proj, cos, sin, past_k, past_v, seqlens_k, total):
            q = self._rotated(op, q_proj, cos, sin, "q")
            k = self._rotated(op, k_proj, cos, sin, "k")
            v = op.Reshape(op.Reshape(v_proj, pattern.ANY_VALUE, _allow_other_attributes=True), pattern.ANY_VALUE,
                           _allow_other_attributes=True, _outputs=["v_flat"])
            return op.GroupQueryAttention(q, k, v, past_k, past_v, seqlens_k, total, _domain=MS_DOMAIN,
                                          _allow_other_attributes=True, _outputs=["out", "present_k", "present_v"])

        def check(self, context, q_proj, k_proj, v_proj, cos, q_rot, k_rot, q_flat, k_flat, v_flat, out, **_):
            fail = pattern.MatchResult().fail
            gqa = out.producer()
            heads, kv_heads = gqa.attributes.get_int("num_heads"), gqa.attributes.get_int("kv_num_heads")
            for flat in (q_flat, k_flat, v_flat):
                if _const_ints(flat.producer().inputs[1]) != [0, 0, -1]:
                    return fail("a GQA input is not merged back to (B, S, H·D)", flat)
            for proj, n in ((q_proj, heads), (k_proj, kv_heads), (v_proj, kv_heads)):
                if proj.shape is None or len(proj.shape) != 3 or not isinstance(proj.shape[-1], int) or \
                        proj.shape[-1] % n:
                    return fail("a projection is not (B, S, heads·D) with a static width", proj)
            for rot, n in ((q_rot, heads), (k_rot, kv_heads)):
                attrs = rot.producer().attributes
                if attrs.get_int("rotary_embedding_dim", 0) not in (0, q_proj.shape[-1] // heads):
                    return fail("partial rotary", rot)
                split = rot.producer().inputs[0].producer().inputs[0].producer()  # the split-heads Reshape
                shape = _const_ints(split.inputs[1])
                if split.outputs[0].shape is None or len(split.outputs[0].shape) != 4 or \
                        split.outputs[0].shape[2] != n:
                    if shape is None or len(shape) != 4 or shape[2] != n:
                        return fail("the split-heads Reshape does not give (B, S, heads, D)", rot)
            if q_rot.producer().attributes.get_int("interleaved", 0) != k_rot.producer().attributes.get_int(
                    "interleaved", 0):
                return fail("q and k rotate differently", q_rot)
            if self.rotary:
                cache = self.caches.get(id(cos))
                if isinstance(cache, str) or cache is None:
                    return fail(cache or "no rotary cache", cos)
                if cache[0].shape[1] * 2 != q_proj.shape[-1] // heads:
                    return fail("partial rotary (cos cache narrower than D/2)", cos)
                if (q_proj.shape[-1] // heads) % 16:
                    return fail(f"head size {q_proj.shape[-1] // heads}: ONNX Runtime's GroupQueryAttention rotates "
                                "only head sizes that are a multiple of 16", q_proj)
            return True

        def rewrite(self, op, q_proj, k_proj, v_proj, cos, sin, past_k, past_v, seqlens_k, total, q_rot, out, **_):
            gqa, rot = out.producer(), q_rot.producer()
            attrs = gqa_attrs(gqa)
            interleaved = rot.attributes.get_int("interleaved", 0)
            if self.rotary:
                cos_cache, sin_cache = self.caches[id(cos)]
                return op.GroupQueryAttention(q_proj, k_proj, v_proj, past_k, past_v, seqlens_k, total, cos_cache,
                                              sin_cache, **{**attrs, "do_rotary": 1, "rotary_interleaved": interleaved},
                                              _domain=MS_DOMAIN, _outputs=3)
            q = op.RotaryEmbedding(q_proj, cos, sin, interleaved=interleaved, num_heads=attrs["num_heads"])
            k = op.RotaryEmbedding(k_proj, cos, sin, interleaved=interleaved, num_heads=attrs["kv_num_heads"])
            q.shape, q.dtype, k.shape, k.dtype = q_proj.shape, q_proj.dtype, k_proj.shape, k_proj.dtype
            return op.GroupQueryAttention(q, k, v_proj, past_k, past_v, seqlens_k, total, **attrs, _domain=MS_DOMAIN,
                                          _outputs=3)

    class GqaOutputFlat(pattern.RewriteRuleClassBase):
        def __init__(self):
            super().__init__("GqaOutputFlat", remove_nodes=False)

        def pattern(self, op, out, shape_a, shape_b):
            return op.Reshape(op.Reshape(out, shape_a, _allow_other_attributes=True), shape_b,
                              _allow_other_attributes=True, _outputs=["y"])

        def check(self, context, out, shape_a, y, **_):
            fail = pattern.MatchResult().fail
            gqa = out.producer()
            if not _is(gqa, "GroupQueryAttention", MS_DOMAIN) or gqa.outputs[0] is not out:
                return fail("not the output of GroupQueryAttention", out)
            heads = gqa.attributes.get_int("num_heads")
            split = _const_ints(shape_a)
            if split is None or len(split) != 4 or split[:3] != [0, 0, heads]:
                return fail("not a (B, S, H, D) split of the attention output", out)
            query = gqa.inputs[0]
            if y.shape is None or len(y.shape) != 3 or query.shape is None or \
                    [str(d) for d in y.shape[:2]] != [str(d) for d in query.shape[:2]] or \
                    not isinstance(y.shape[2], int) or y.shape[2] % heads:
                return fail("the merge is not back to (B, S, H·D)", y)
            return True

        def rewrite(self, op, out, y, **_):
            return op.Identity(out)

    class GqaPackedQKV(pattern.RewriteRuleClassBase):
        def __init__(self):
            super().__init__("GqaPackedQKV", remove_nodes=False)

        def pattern(self, op, q, k, v, past_k, past_v, seqlens_k, total):
            return op.GroupQueryAttention(q, k, v, past_k, past_v, seqlens_k, total, _allow_other_inputs=True,
                                          _allow_other_attributes=True, _domain=MS_DOMAIN,
                                          _outputs=["out", "present_k", "present_v"])

        def check(self, context, q, k, v, **_):
            fail = pattern.MatchResult().fail
            projs = [projection(x) for x in (q, k, v)]
            if None in projs or not (projs[0][0] is projs[1][0] is projs[2][0]):
                return fail("Q, K and V are not constant-weight projections of one input", q)
            if any(len(x.uses()) != 1 for x in (q, k, v)):
                return fail("a projection is used elsewhere", q)
            if len({p[1].dtype for p in projs}) != 1 or (None in [p[2] for p in projs]) != (projs[0][2] is None):
                return fail("projections differ in dtype or in having a bias", q)
            return True

        def rewrite(self, op, q, k, v, past_k, past_v, seqlens_k, total, out, **_):
            gqa = out.producer()
            projs = [projection(x) for x in (q, k, v)]
            x = projs[0][0]
            w = np.concatenate([p[1].const_value.numpy() for p in projs], axis=1)
            packed = op.MatMul(x, op.initializer(ir.tensor(np.ascontiguousarray(w)), name=f"{gqa.name}_qkv_weight"))
            if projs[0][2] is not None:
                b = np.concatenate([p[2].const_value.numpy() for p in projs])
                packed = op.Add(packed, op.initializer(ir.tensor(b), name=f"{gqa.name}_qkv_bias"))
            packed.dtype = q.dtype
            if q.shape is not None:
                packed.shape = ir.Shape([*q.shape[:-1], w.shape[1]])
            rest = list(gqa.inputs[7:])
            return op.GroupQueryAttention(packed, None, None, past_k, past_v, seqlens_k, total, *rest,
                                          **gqa_attrs(gqa), _domain=MS_DOMAIN, _outputs=3)

    class PackGateUp(pattern.RewriteRuleClassBase):
        def __init__(self):
            super().__init__("PackGateUp", remove_nodes=True)

        def pattern(self, op, x, w_gate, w_up):
            gate = op.MatMul(x, w_gate, _outputs=["gate"])
            return op.Mul(op.Mul(gate, op.Sigmoid(gate)), op.MatMul(x, w_up, _outputs=["up"]), _outputs=["y"])

        def check(self, context, w_gate, w_up, gate, up, **_):
            fail = pattern.MatchResult().fail
            for w in (w_gate, w_up):
                if w.const_value is None or w.shape is None or len(w.shape) != 2:
                    return fail("a weight is not a constant matrix", w)
            if w_gate.shape != w_up.shape or w_gate.dtype != w_up.dtype:
                return fail("gate and up differ in shape", w_gate)
            if len(gate.uses()) != 2 or len(up.uses()) != 1:
                return fail("gate or up is used elsewhere", gate)
            return True

        def rewrite(self, op, x, w_gate, w_up, gate, y, **_):
            w = np.concatenate([w_gate.const_value.numpy(), w_up.const_value.numpy()], axis=1)
            packed = op.MatMul(x, op.initializer(ir.tensor(np.ascontiguousarray(w)), name=f"{y.name}_gate_up_weight"))
            g, u = op.Split(packed, axis=-1, num_outputs=2, _outputs=2)
            for t in (g, u):
                t.shape, t.dtype = gate.shape, gate.dtype
            return op.Mul(op.Mul(g, op.Sigmoid(g)), u)

    return GqaRotaryInside, GqaOutputFlat, GqaPackedQKV, PackGateUp


def _rotary_nodes(model):
    return [n for n in model.graph if _is(n, "RotaryEmbedding") and len(n.inputs) == 3]


def _shared_cache(model, options: GraphOptions, counts: GraphCounts) -> dict:
    """id(cos value) -> (cos_cache, sin_cache) initializers (one pair per distinct cos/sin computation, which is
    one pair for a model with one rotary embedding), or the reason there is none."""
    import onnx_ir as ir

    caches, made = {}, 0
    for node in _rotary_nodes(model):
        cos, sin = node.inputs[1], node.inputs[2]
        if id(cos) in caches:
            continue
        got = rotary_caches(model, cos, sin, options.context_length)
        if isinstance(got, str):
            caches[id(cos)] = got
            counts.notes.append(f"rotary kept outside GroupQueryAttention: {got}")
            continue
        pair = []
        for name, arr in (("cos_cache", got[0]), ("sin_cache", got[1])):
            v = ir.Value(name=name + (f"_{made}" if made else ""), const_value=ir.tensor(np.ascontiguousarray(arr)),
                         shape=ir.Shape(arr.shape), type=ir.TensorType(ir.DataType.from_numpy(arr.dtype)))
            model.graph.register_initializer(v)
            pair.append(v)
        caches[id(cos)] = tuple(pair)
        made += 1
    return caches


def _count(model, op_type: str, **attrs) -> int:
    return sum(1 for n in model.graph if n.op_type == op_type and all(
        n.attributes.get_int(k, 0) == v for k, v in attrs.items()))


def rewrite_for_genai(model, options: GraphOptions) -> GraphCounts:
    """Apply the rules to an onnx_ir model in place (see the module docstring); return what fired."""
    import onnx_ir as ir
    import onnxscript.optimizer
    from onnxscript.rewriter import pattern

    rotary_rule, output_rule, pack_qkv_rule, pack_mlp_rule = _rules()
    counts = GraphCounts()
    caches = _shared_cache(model, options, counts) if options.rotary else {}
    counts.flat_inputs = pattern.RewriteRuleSet([rotary_rule.rule(options.rotary, caches)]).apply_to_model(model)
    counts.rotary_inside = _count(model, "GroupQueryAttention", do_rotary=1)
    if options.rotary:  # the sites GQA cannot rotate: flat inputs, rotary kept as RotaryEmbedding
        left = pattern.RewriteRuleSet([rotary_rule.rule(False, {})]).apply_to_model(model)
        counts.flat_inputs += left
        if left:
            heads = [n for n in model.graph if _is(n, "GroupQueryAttention", MS_DOMAIN) and
                     not n.attributes.get_int("do_rotary", 0)]
            d = heads[0].inputs[3].shape[-1] if heads and heads[0].inputs[3].shape is not None else "?"
            counts.notes.append(f"rotary kept outside GroupQueryAttention at {left} sites (head size {d}: ONNX "
                                "Runtime's GroupQueryAttention rotates only head sizes that are a multiple of 16)"
                                if isinstance(d, int) and d % 16 else
                                f"rotary kept outside GroupQueryAttention at {left} sites")
    counts.flat_outputs = pattern.RewriteRuleSet([output_rule.rule()]).apply_to_model(model)
    if options.pack_qkv:
        counts.packed_qkv = pattern.RewriteRuleSet([pack_qkv_rule.rule()]).apply_to_model(model)
    if options.pack_mlp:
        counts.packed_mlp = pattern.RewriteRuleSet([pack_mlp_rule.rule()]).apply_to_model(model)
    onnxscript.optimizer.optimize(model)
    ir.passes.common.RemoveUnusedNodesPass()(model)
    for v in list(model.graph.inputs):
        if v.name == "position_ids" and not v.uses():
            model.graph.inputs.remove(v)
            counts.removed_inputs.append(v.name)
    ir.passes.common.RemoveUnusedNodesPass()(model)
    for name in [n for n, v in model.graph.initializers.items() if not v.uses() and v not in model.graph.outputs]:
        del model.graph.initializers[name]
    return counts
