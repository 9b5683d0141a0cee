"""`fuse`: norms, gated MLPs, rotary and LM head + loss as single operators — counts, exactness (outputs and
gradients, fp32 on the CPU), near misses with reasons, .pt2 in a fresh process, ONNX in ONNX Runtime."""

import collections
import subprocess
import sys

import numpy as np
import pytest
import torch

import evo_rewrite
import fuse_models as fm
from evo_rewrite import fused_ops as ops
from evo_rewrite import zoo
from hf_configs import build, main_output

FUSED = set(ops.FUSED_OPS)
# per architecture (2 layers): norm sites, of which with the residual add, gated MLPs, rotated tensors (q and k)
HF_SITES = {
    "llama": dict(norm=5, residual=4, mlp=2, rotary=4),
    "qwen2": dict(norm=5, residual=4, mlp=2, rotary=4),
    "mistral": dict(norm=5, residual=4, mlp=2, rotary=4),
    "gemma": dict(norm=5, residual=4, mlp=2, rotary=4),  # (1 + w) in fp32, gelu tanh
    "phi3": dict(norm=5, residual=4, mlp=2, rotary=4, split=2),  # fused gate_up projection, chunked
    "gpt-neox": dict(norm=0, residual=0, mlp=0, rotary=4, layer_norm=5),  # partial rotary; nn.LayerNorm is one kernel
}
SLOW_HF_SITES = {
    "qwen3": dict(norm=9, residual=4, mlp=2, rotary=4),  # + q/k norms
    "gemma2": dict(norm=9, residual=4, mlp=2, rotary=4),  # + pre/post feed-forward norms
    "gptj": dict(norm=0, residual=0, mlp=0, rotary=4, layer_norm=3),  # interleaved rotary
}


def _fused_nodes(program):
    return collections.Counter(str(n.target).split(".")[-2] for n in program.graph.nodes
                               if n.op == "call_function" and n.target in FUSED)


def _check_counts(rec, want):
    notes = rec.notes
    assert notes.get("norm", 0) == want["norm"]
    assert notes.get("rms_norm with residual add", 0) == want["residual"]
    assert notes.get("mlp", 0) == want["mlp"]
    assert notes.get("rotary", 0) == want["rotary"]
    assert notes.get("mlp (fused gate/up projection)", 0) == want.get("split", 0)
    assert notes.get("already fused", {}).get("layer_norm", 0) == want.get("layer_norm", 0)
    assert rec.rewrites == want["norm"] + want["mlp"] + want["rotary"] + want.get("loss", 0)


def _grads(module, args, params=None):
    params = dict(module.named_parameters()) if params is None else params
    for p in params.values():
        p.grad = None
    out = module(*args)
    out = main_output(out) if not isinstance(out, torch.Tensor) else out
    (out.float().square().mean() if out.dim() else out).backward()
    return {k: p.grad.clone() for k, p in params.items() if p.grad is not None}


def _check_exact(model, result, args, rtol=1e-5, atol=1e-6):
    """Outputs and parameter gradients of the fused program equal the original's (fp32, CPU)."""
    ref, got = model(*args), result.module(*args)
    torch.testing.assert_close(main_output(got) if not isinstance(got, torch.Tensor) else got,
                               main_output(ref) if not isinstance(ref, torch.Tensor) else ref, rtol=rtol, atol=atol)
    g_ref = _grads(model, args)
    g_new = _grads(result.module, args)
    assert g_new and set(g_new) <= set(g_ref) | set(g_new)
    compared = 0
    for name, g in g_new.items():
        key = name if name in g_ref else None
        if key is None:
            continue
        torch.testing.assert_close(g, g_ref[key], rtol=rtol, atol=atol)
        compared += 1
    assert compared >= len(g_new) // 2, (compared, len(g_new))


def _run_hf(arch, want):
    model = build(arch)
    torch.manual_seed(1)
    ids = torch.randint(3, 128, (2, 12))
    result = evo_rewrite.rewrite(model, "fuse", example_inputs={"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    rec = result.report.passes[0]
    assert rec.verified, rec.failure
    _check_counts(rec, want)
    nodes = _fused_nodes(result.program)
    assert nodes["rotary_pair"] * 2 + nodes["rotary"] == want["rotary"]
    assert nodes["gated_act"] == want["mlp"] and nodes["add_rms_norm"] == want["residual"]
    left = {n.target for n in result.program.graph.nodes if n.op == "call_function"}
    assert not left & {torch.ops.aten.rsqrt.default, torch.ops.aten.neg.default, torch.ops.aten.silu.default}
    ids2 = torch.randint(3, 128, (3, 9))
    mask2 = torch.ones_like(ids2)
    ref = model(input_ids=ids2, attention_mask=mask2).logits
    got = main_output(result.module(input_ids=ids2, attention_mask=mask2))
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    # gradients through every fused operator, against the model's own autograd
    params = dict(result.module.named_parameters())
    for p in list(params.values()) + list(model.parameters()):
        p.grad = None
    model(input_ids=ids2, attention_mask=mask2).logits.square().mean().backward()
    g_ref = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    for p in model.parameters():
        p.grad = None
    main_output(result.module(input_ids=ids2, attention_mask=mask2)).square().mean().backward()
    compared = 0
    for name, p in params.items():
        if p.grad is not None and name in g_ref:
            torch.testing.assert_close(p.grad, g_ref[name], rtol=1e-5, atol=1e-6)
            compared += 1
    assert compared >= 10


@pytest.mark.parametrize("arch", list(HF_SITES))
def test_hf_sites_counted_and_exact(arch):
    _run_hf(arch, HF_SITES[arch])


@pytest.mark.slow
@pytest.mark.parametrize("arch", list(SLOW_HF_SITES))
def test_hf_more_architectures(arch):
    _run_hf(arch, SLOW_HF_SITES[arch])


HAND = [  # (flags, expected per kind)
    (dict(norm="llama", act="silu", fused=False, rotary="half"), dict(norm=5, residual=4, mlp=2, rotary=4)),
    (dict(norm="plain", act="gelu", fused=True, rotary="interleaved"), dict(norm=5, residual=4, mlp=2, rotary=4, split=2)),
    (dict(norm="gemma", act="gelu_tanh", fused=False, rotary="half"), dict(norm=5, residual=4, mlp=2, rotary=4)),
    (dict(norm="layer", act="silu", fused=True, rotary="none"), dict(norm=5, residual=0, mlp=2, rotary=0, split=2)),
]


@pytest.mark.parametrize("flags,want", HAND, ids=["llama-swiglu-half", "plain-geglu-interleaved", "gemma-geglu-tanh",
                                                   "layernorm-fused-gate-up"])
def test_hand_written_spellings(flags, want):
    model = fm.tiny_lm(**flags)
    ids = torch.randint(0, fm.VOCAB, (2, 12))
    result = evo_rewrite.rewrite(model, "fuse", example_inputs=(ids,))
    rec = result.report.passes[0]
    assert rec.verified and rec.skipped == [], (rec.failure, rec.skipped)
    _check_counts(rec, want)
    if flags["norm"] == "layer":
        assert rec.notes["hand-written LayerNorm"] == 5
        assert sum(n.target is torch.ops.aten.layer_norm.default for n in result.program.graph.nodes) == 5
    assert not any(n.target in (torch.ops.aten.rsqrt.default, torch.ops.aten.silu.default, torch.ops.aten.neg.default)
                   for n in result.program.graph.nodes)
    _check_exact(model, result, (torch.randint(0, fm.VOCAB, (3, 9)),))


def test_loss_program_fuses_lm_head_and_cross_entropy():
    model = fm.tiny_lm()
    ids, labels = torch.randint(0, fm.VOCAB, (2, 12)), torch.randint(0, fm.VOCAB, (2, 12))
    result = evo_rewrite.rewrite(model, "fuse", example_inputs=(ids, labels))
    rec = result.report.passes[0]
    assert rec.verified and rec.notes["loss"] == 1 and rec.rewrites == 12
    (node,) = [n for n in result.program.graph.nodes if n.target is ops.LINEAR_CROSS_ENTROPY]
    assert node.args[4:] == (-100, "mean", True)
    assert not any(n.target is torch.ops.aten.cross_entropy_loss.default for n in result.program.graph.nodes)
    ids2, labels2 = torch.randint(0, fm.VOCAB, (3, 7)), torch.randint(0, fm.VOCAB, (3, 7))
    labels2[0, :3] = -100  # ignored positions
    _check_exact(model, result, (ids2, labels2))


NEAR_MISSES = [  # (model, inputs, kind that must not fire, reason)
    (fm.EpsFromInput, lambda: (torch.randn(2, 5, fm.HIDDEN), torch.tensor(1e-6)), "norm", "norm: eps is not a constant"),
    (fm.WeightFromInput, lambda: (torch.randn(2, 5, fm.HIDDEN), torch.randn(fm.HIDDEN)), "norm",
     "norm: weight is data-dependent"),
    (fm.LossAndLogits, lambda: (torch.randint(0, fm.VOCAB, (2, 6)),) * 2, "loss",
     "loss: the logits are used elsewhere (e.g. also returned)"),
]


@pytest.mark.parametrize("cls,inputs,kind,reason", NEAR_MISSES, ids=["eps-input", "weight-input", "logits-returned"])
def test_near_miss_is_left_with_its_reason(cls, inputs, kind, reason):
    torch.manual_seed(0)
    result = evo_rewrite.rewrite(cls().eval(), "fuse", example_inputs=inputs())
    rec = result.report.passes[0]
    assert rec.rewrites == 0 and rec.message == "no site can be fused"
    assert [s["reason"] for s in rec.skipped] == [reason]
    assert _fused_nodes(result.program) == {}


def test_near_misses_in_a_model_mlp_and_rotary():
    """An activation also used elsewhere, and a rotation the other way round: left, with reasons; norms still fuse."""
    model = fm.tiny_lm(act="leaky", rotary="swapped")
    ids = torch.randint(0, fm.VOCAB, (2, 12))
    result = evo_rewrite.rewrite(model, "fuse", example_inputs=(ids,))
    rec = result.report.passes[0]
    assert rec.verified and rec.notes.get("mlp", 0) == 0 and rec.notes.get("rotary", 0) == 0 and rec.notes["norm"] == 5
    reasons = collections.Counter(s["reason"] for s in rec.skipped)
    assert reasons == {"rotary: halves are rotated the other way (x₂, −x₁)": 4,
                       "mlp: the activation's output is used elsewhere": 2}
    assert {s["module"] for s in rec.skipped} == {"blocks.0.attn", "blocks.1.attn", "blocks.0.mlp", "blocks.1.mlp"}


def test_residual_sum_with_more_uses_keeps_its_add():
    torch.manual_seed(0)
    model = fm.SharedResidual().eval()
    args = (torch.randn(2, 5, fm.HIDDEN), torch.randn(2, 5, fm.HIDDEN))
    result = evo_rewrite.rewrite(model, "fuse", example_inputs=args)
    rec = result.report.passes[0]
    assert rec.rewrites == 1 and rec.notes["rms_norm"] == 1 and "rms_norm with residual add" not in rec.notes
    assert rec.skipped[0]["reason"] == "norm: the residual sum has 2 other uses; fused the norm without the add"
    assert _fused_nodes(result.program) == {"rms_norm": 1}


@pytest.mark.slow
def test_options_select_kinds_and_fuse_twice_is_a_no_op():
    model = fm.tiny_lm()
    ids = torch.randint(0, fm.VOCAB, (2, 12))
    only_mlp = evo_rewrite.rewrite(model, "fuse(norm=false, rotary=false, loss=false)", example_inputs=(ids,))
    assert only_mlp.report.passes[0].rewrites == 2 and _fused_nodes(only_mlp.program) == {"gated_act": 2}
    no_res = evo_rewrite.rewrite(model, "fuse(residual=false)", example_inputs=(ids,))
    assert _fused_nodes(no_res.program)["rms_norm"] == 5
    first = evo_rewrite.rewrite(model, "fuse", example_inputs=(ids,))
    again = evo_rewrite.rewrite(first.program, "fuse").report.passes[0]
    assert again.rewrites == 0 and again.message == "every site is already fused"


@pytest.mark.slow
def test_zoo_models_norms_are_already_one_kernel():
    """zoo's GPT and encoder use nn.LayerNorm (aten.layer_norm: one kernel already) and ungated MLPs."""
    for factory, norms in ((zoo.gpt, 9), (zoo.encoder, 8)):
        model, inputs = factory(n_layer=4)
        rec = evo_rewrite.rewrite(model, "fuse", example_inputs=inputs).report.passes[0]
        assert rec.rewrites == 0 and rec.notes["already fused"] == {"layer_norm": norms}
        assert rec.message == "every site is already fused"


@pytest.mark.slow
def test_fused_program_round_trips_as_pt2_in_a_fresh_process(tmp_path):
    model = fm.tiny_lm(norm="gemma", rotary="interleaved", fused=True)
    result = evo_rewrite.rewrite(model, "flash,fuse", example_inputs=(torch.randint(0, fm.VOCAB, (2, 12)),))
    path = result.save(tmp_path / "fused.pt2")
    x2 = torch.randint(0, fm.VOCAB, (3, 7))
    torch.save({"x": x2, "ref": model(x2).detach()}, tmp_path / "io.pt")
    code = ("import sys, torch, evo_rewrite; d = torch.load(sys.argv[2]); p = evo_rewrite.load(sys.argv[1]).program; "
            "torch.testing.assert_close(p.module(d['x']), d['ref'], rtol=1e-5, atol=1e-6); "
            "print(sorted({str(n.target) for n in p.graph.nodes if 'evo_rewrite' in str(n.target)}))")
    out = subprocess.run([sys.executable, "-c", code, str(path), str(tmp_path / "io.pt")], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == str(sorted(f"evo_rewrite.{n}.default" for n in ("add_rms_norm", "gated_act", "rms_norm",
                                                                              "rotary_pair")))


@pytest.mark.parametrize("flags,ort_ops", [
    (dict(norm="llama", act="silu", rotary="half"), {"SimplifiedLayerNormalization": 1,
                                                     "SkipSimplifiedLayerNormalization": 4, "RotaryEmbedding": 4}),
    (dict(norm="gemma", act="gelu_tanh", rotary="interleaved"), {"SimplifiedLayerNormalization": 1,
                                                                 "SkipSimplifiedLayerNormalization": 4,
                                                                 "RotaryEmbedding": 4, "Gelu": 2}),
], ids=["llama", "gemma-interleaved"])
@pytest.mark.slow
def test_onnx_maps_the_fused_operators_and_ort_matches(tmp_path, flags, ort_ops):
    import onnx
    import onnxruntime as ort

    from evo_rewrite.targets.onnx_fuse import export_onnx

    model = fm.tiny_lm(**flags)
    ids, labels = torch.randint(0, fm.VOCAB, (2, 12)), torch.randint(0, fm.VOCAB, (2, 12))
    result = evo_rewrite.rewrite(model, "flash,fuse", example_inputs=(ids, labels))
    assert result.report.passes[1].notes["loss"] == 1
    path = export_onnx(result.program, tmp_path / "m.onnx")
    counts = collections.Counter(n.op_type for n in onnx.load(path).graph.node)
    assert {k: counts[k] for k in ort_ops} == ort_ops and counts["SoftmaxCrossEntropyLoss"] == 1
    assert counts["Neg"] == 0 and counts["ReduceMean"] == 0
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    ids2, labels2 = torch.randint(0, fm.VOCAB, (3, 7)), torch.randint(0, fm.VOCAB, (3, 7))
    (loss,) = session.run(None, {i.name: v.numpy() for i, v in zip(session.get_inputs(), (ids2, labels2))})
    np.testing.assert_allclose(loss, model(ids2, labels2).item(), rtol=1e-5)
