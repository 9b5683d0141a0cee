import collections
import math

import pytest
import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

import evo_rewrite
from evo_rewrite import PipelineError, zoo

aten = torch.ops.aten
BF16, FP32 = torch.bfloat16, torch.float32
MATMUL = {aten.linear.default, aten.matmul.default, aten.mm.default, aten.bmm.default, aten.addmm.default,
          aten.baddbmm.default, aten.scaled_dot_product_attention.default}


def _call(fn, inputs):
    return fn(*inputs) if isinstance(inputs, tuple) else fn(**inputs)


def _sqnr(ref, new):
    ref, new = ref.double(), new.double()
    return 20 * math.log10(float(ref.norm()) / float((ref - new).norm()))


class _Dtypes(fx.Interpreter):
    """Runs a graph module and records the dtype every node's value has."""

    def __init__(self, gm):
        super().__init__(gm)
        self.dtype = {}

    def run_node(self, n):
        out = super().run_node(n)
        if isinstance(out, torch.Tensor):
            self.dtype[n] = out.dtype
        return out


def _graph_input_dtypes(program):
    """{op packet name: set of tuples of the floating input dtypes} of the rewritten graph, run for real."""
    interp = _Dtypes(program.module)
    flat = pytree.tree_leaves((program.inputs.args, program.inputs.kwargs))
    with torch.no_grad():
        interp.run(*flat, enable_io_processing=False)
    seen = collections.defaultdict(set)
    for n in program.graph.nodes:
        if n.op == "call_function" and hasattr(n.target, "overloadpacket"):
            dts = tuple(interp.dtype[a] for a in n.all_input_nodes
                        if a in interp.dtype and interp.dtype[a].is_floating_point)
            seen[str(n.target.overloadpacket)].add(dts)
    return seen, interp


class _AutocastDtypes(TorchDispatchMode):
    """The floating input dtypes each ATen op receives under torch.autocast (below autocast's casts)."""

    def __init__(self):
        super().__init__()
        self.seen = collections.defaultdict(set)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        dts = tuple(a.dtype for a in pytree.tree_leaves((args, kwargs))
                    if isinstance(a, torch.Tensor) and a.is_floating_point())
        self.seen[str(func.overloadpacket)].add(dts)
        return func(*args, **kwargs)


@pytest.fixture(scope="module", params=["gpt", "encoder"])
def rewritten(request):
    model, inputs = getattr(zoo, request.param)()
    result = evo_rewrite.rewrite(model, "bf16", example_inputs=inputs)
    return request.param, model, inputs, result


def test_dtypes_follow_the_autocast_policy(rewritten):
    name, model, inputs, result = rewritten
    ours, interp = _graph_input_dtypes(result.program)
    # every matmul-class op gets bf16 inputs only, every softmax / layer_norm fp32 only
    for n in result.program.graph.nodes:
        if n.op != "call_function":
            continue
        ins = {interp.dtype[a] for a in n.all_input_nodes if a in interp.dtype and interp.dtype[a].is_floating_point}
        if n.target in MATMUL:
            assert ins == {BF16}, (n.name, ins)
            assert interp.dtype[n] is BF16
        if n.target in (aten.softmax.int, aten.layer_norm.default, aten.native_layer_norm.default):
            assert ins == {FP32}, (n.name, ins)
    assert ours["aten.linear"] == {(BF16, BF16, BF16)} | ({(BF16, BF16)} if name == "gpt" else set())
    assert ours["aten.matmul"] == {(BF16, BF16)}
    assert ours["aten.softmax"] == {(FP32,)}

    rec = _AutocastDtypes()
    with torch.no_grad(), torch.autocast("cpu", dtype=BF16), rec:
        _call(model, inputs)
    ac = rec.seen
    # matmul class: autocast's linear/matmul reach ATen as addmm/mm/bmm, all in bf16, as ours
    for op in ("aten.addmm", "aten.mm", "aten.bmm"):
        assert all(set(d) == {BF16} for d in ac.get(op, ())), (op, ac[op])
    # layer norms run in fp32 under CPU autocast too; the activations between matmuls (gelu) in bf16
    assert {d for ds in ac["aten.native_layer_norm"] for d in ds} == {FP32}
    assert ac["aten.gelu"] == ours["aten.gelu"] == {(BF16,)}
    # softmax: CPU autocast's fp32 list lacks softmax (CUDA's has it); where the input is already fp32
    # (the encoder adds an fp32 mask first) both agree
    if name == "encoder":
        assert ac["aten._softmax"] == ours["aten.softmax"] == {(FP32,)}


def test_sqnr_reaches_autocast(rewritten):
    name, model, inputs, result = rewritten
    with torch.no_grad():
        ref = _call(model, inputs)
        with torch.autocast("cpu", dtype=BF16):
            ac = _call(model, inputs).float()
        out = _call(result.module, inputs)
    ours, theirs = _sqnr(ref, out), _sqnr(ref, ac)
    print(f"{name}: bf16 pass SQNR {ours:.2f} dB, torch.autocast SQNR {theirs:.2f} dB")
    assert ours >= theirs - 1.0
    rec = result.report.passes[0]
    assert rec.verified and result.report.ok
    assert rec.metrics["sqnr_db"] == pytest.approx(ours, abs=0.5)


def test_keep_io_keeps_fp32_outputs_and_notes(rewritten):
    name, model, inputs, result = rewritten
    out = _call(result.module, inputs)
    assert out.dtype is FP32
    rec = result.report.passes[0]
    assert rec.rewrites == (25 if name == "gpt" else 32)
    assert rec.notes["ops per precision"].startswith(f"bf16 (matmul-class): {rec.rewrites}, fp32 (forced): ")
    assert rec.notes["weights stored in bf16"].startswith("32 tensors" if name == "gpt" else "48 tensors")
    tensors = result.program.named_tensors()
    if name == "gpt":
        assert tensors["h.0.attn.c_attn.weight"].dtype is BF16 and tensors["h.0.attn.c_attn.bias"].dtype is BF16
        assert tensors["h.0.ln_1.weight"].dtype is FP32  # feeds layer_norm
        # tied embedding / lm_head: it feeds the embedding too, so it stays fp32 and is cast at the head
        assert all(t.dtype is FP32 for k, t in tensors.items() if "wte" in k or "lm_head" in k)
    else:
        assert tensors["layers.0.query.weight"].dtype is BF16
        assert tensors["emb.weight"].dtype is FP32


def test_keep_io_false_leaves_outputs_in_bf16():
    model, inputs = zoo.gpt()
    result = evo_rewrite.rewrite(model, "bf16(keep_io=false)", example_inputs=inputs)
    assert result.report.ok
    assert _call(result.module, inputs).dtype is BF16


@pytest.mark.parametrize("pipeline", ["flash,bf16", "gqa(kv_heads=2),bf16"])
def test_composes(pipeline):
    model, inputs = zoo.gpt()
    result = evo_rewrite.rewrite(model, pipeline, example_inputs=inputs)
    assert result.report.ok
    assert all(p.verified for p in result.report.passes)
    assert result.report.passes[0].rewrites == 4 and result.report.passes[1].rewrites > 0
    ours, interp = _graph_input_dtypes(result.program)
    if pipeline.startswith("flash"):
        assert ours["aten.scaled_dot_product_attention"] and all(
            set(d) == {BF16} for d in ours["aten.scaled_dot_product_attention"])
    for n in result.program.graph.nodes:
        if n.op == "call_function" and n.target in MATMUL:
            assert interp.dtype[n] is BF16
    assert _call(result.module, inputs).dtype is FP32


def test_model_without_matmul_is_left_alone():
    model = torch.nn.Sequential(torch.nn.LayerNorm(8), torch.nn.GELU())
    result = evo_rewrite.rewrite(model, "bf16", example_inputs=(torch.randn(2, 8),))
    rec = result.report.passes[0]
    assert rec.rewrites == 0
    assert rec.message == "no matmul-class op (linear, matmul, bmm, conv, attention) to run in bf16"
    assert all(t.dtype is FP32 for t in result.program.named_tensors().values())


def test_bad_options():
    with pytest.raises(PipelineError, match=r"option keep_io='maybe' is not valid; allowed: true, false"):
        evo_rewrite.parse_pipeline("bf16(keep_io=maybe)")
    with pytest.raises(PipelineError, match=r"pass 'bf16' has no option 'keepio'"):
        evo_rewrite.parse_pipeline("bf16(keepio=true)")


class _RMSNormMLP(torch.nn.Module):
    """linear -> hand-written RMSNorm (pow, mean, rsqrt) -> linear: the norm's input arrives in bf16."""

    def __init__(self):
        super().__init__()
        self.up, self.down = torch.nn.Linear(16, 32), torch.nn.Linear(32, 8)
        self.scale = torch.nn.Parameter(torch.ones(32))

    def forward(self, x):
        h = self.up(x)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6) * self.scale
        return self.down(h)


def test_hand_written_rms_norm_runs_in_fp32():
    torch.manual_seed(0)
    result = evo_rewrite.rewrite(_RMSNormMLP().eval(), "bf16", example_inputs=(torch.randn(2, 5, 16),))
    assert result.report.ok
    _, interp = _graph_input_dtypes(result.program)
    kinds = {aten.pow.Tensor_Scalar, aten.mean.dim, aten.rsqrt.default}
    found = [n for n in result.program.graph.nodes if n.op == "call_function" and n.target in kinds]
    assert len(found) == 3
    for n in found:
        assert interp.dtype[n.args[0]] is FP32 and interp.dtype[n] is FP32
    assert result.program.get_tensor("scale").dtype is FP32  # feeds an fp32 multiply
    assert result.program.get_tensor("up.weight").dtype is BF16
