import pytest
import torch

import evo_rewrite
from evo_rewrite import zoo
from attention_spellings import NEGATIVE, POSITIVE, PaddedEncoder, SoftmaxClassifier, Spelled, kv_heads_for

SDPA = torch.ops.aten.scaled_dot_product_attention.default


def _sdpa_nodes(program):
    return [n for n in program.graph.nodes if n.op == "call_function" and n.target is SDPA]


def _check_grads(model, rewritten_module, x):
    """Gradients of the rewritten program's weights match the original's."""
    model.zero_grad()
    model(x).square().mean().backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()  # the program shares the model's parameter tensors
    params = dict(rewritten_module.named_parameters())
    for p in params.values():
        p.grad = None
    rewritten_module(x).square().mean().backward()
    for name, g in ref.items():
        if name in params and params[name].grad is not None:
            torch.testing.assert_close(params[name].grad, g, rtol=1e-4, atol=1e-5)
    return len(ref)


@pytest.mark.parametrize("spelling,causal", POSITIVE, ids=[p[0] for p in POSITIVE])
def test_fuses_spelling(spelling, causal):
    torch.manual_seed(0)
    model = Spelled(spelling, kv_heads=kv_heads_for(spelling)).eval()
    x = torch.randn(2, 12, 32)
    result = evo_rewrite.rewrite(model, "flash", example_inputs=(x,))
    rec = result.report.passes[0]
    assert rec.rewrites == 1 and rec.verified, rec.failure
    nodes = _sdpa_nodes(result.program)
    assert len(nodes) == 1
    assert not any("softmax" in str(n.target) for n in result.program.graph.nodes)
    assert rec.notes["causal sites"] == int(causal)
    assert nodes[0].args[5] is causal  # is_causal
    if kv_heads_for(spelling) < 4:
        assert nodes[0].kwargs.get("enable_gqa") is True  # K/V stay at their own head count
        assert "expand" not in " ".join(str(n.target) for n in result.program.graph.nodes) or spelling != "gqa_expand"
    # another batch and sequence size
    x2 = torch.randn(3, 7, 32)
    torch.testing.assert_close(result.module(x2), model(x2), rtol=1e-4, atol=1e-5)
    assert _check_grads(model, result.module, x2) > 0


@pytest.mark.parametrize("spelling,reason", NEGATIVE, ids=[n[0] for n in NEGATIVE])
def test_leaves_non_fusable_sites_with_reason(spelling, reason):
    model = Spelled(spelling).eval()
    result = evo_rewrite.rewrite(model, "flash", example_inputs=(torch.randn(2, 12, 32),))
    rec = result.report.passes[0]
    assert rec.rewrites == 0 and rec.verified
    assert len(rec.skipped) == 1 and reason in rec.skipped[0]["reason"]
    assert rec.message == "no attention site can be fused"
    assert _sdpa_nodes(result.program) == []


def test_softmax_that_is_not_attention():
    result = evo_rewrite.rewrite(SoftmaxClassifier().eval(), "flash", example_inputs=(torch.randn(2, 12, 32),))
    rec = result.report.passes[0]
    assert rec.rewrites == 0
    assert "softmax input is not a product of Q and Kᵀ" in rec.skipped[0]["reason"]
    assert rec.skipped[0]["module"] == ""  and rec.skipped[0]["node"] == "softmax"


def test_padding_mask_from_input_stays_a_mask():
    model = PaddedEncoder().eval()
    x, mask = torch.randn(2, 10, 32), torch.ones(2, 10, dtype=torch.long)
    mask[1, 6:] = 0
    result = evo_rewrite.rewrite(model, "flash", example_inputs=(x, mask))
    (node,) = _sdpa_nodes(result.program)
    assert node.args[3] is not None and node.args[5] is False
    m2 = torch.ones(3, 5, dtype=torch.long)
    m2[0, 3:] = 0
    x2 = torch.randn(3, 5, 32)
    torch.testing.assert_close(result.module(x2, m2), model(x2, m2), rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_gpt_zoo_all_layers_causal_and_saved(tmp_path):
    model, inputs = zoo.gpt()
    result = evo_rewrite.rewrite(model, "flash", example_inputs=inputs)
    assert result.report.passes[0].rewrites == 4 and result.report.passes[0].notes["causal sites"] == 4
    assert result.report.model_after["attention_sites"] == 4  # fused sites still count
    path = result.save(tmp_path / "g.pt2")
    ep = torch.export.load(path)
    assert sum(1 for n in ep.graph.nodes if "scaled_dot_product" in str(n.target)) == 4
    x = torch.randint(0, 256, (1, 33))
    torch.testing.assert_close(ep.module()(x), model(x), rtol=1e-4, atol=1e-5)


def test_flash_twice_is_a_no_op():
    model, inputs = zoo.gpt(n_layer=2)
    first = evo_rewrite.rewrite(model, "flash", example_inputs=inputs)
    second = evo_rewrite.rewrite(first.program, "flash")
    assert second.report.passes[0].rewrites == 0
    assert second.report.passes[0].message == "all 2 attention sites are already fused"
    plain = evo_rewrite.rewrite(torch.nn.Linear(4, 4), "flash", example_inputs=(torch.randn(2, 4),))
    assert plain.report.passes[0].message == "no attention in the model"


def test_pin_and_unpin_round_trip_graph():
    """Pinning rewrites SDPA into a backend's own op; unpinning restores portable SDPA (for .pt2)."""
    from evo_rewrite import sdpa as fb  # the pin mechanism lives in the core

    model, inputs = zoo.gpt(n_layer=2)
    program = evo_rewrite.rewrite(model, "flash", example_inputs=inputs).program.clone()
    for node in list(_sdpa_nodes(program)):
        fb.pin(program.graph, node, "efficient")
    assert _sdpa_nodes(program) == []
    assert sum(1 for n in program.graph.nodes if fb.pinned_backend(n) == "efficient") == 2
    chosen = fb.unpin(program.graph)
    program.module.recompile()
    assert chosen == {"h.0.attn": "efficient", "h.1.attn": "efficient"}
    assert len(_sdpa_nodes(program)) == 2 and all(n.args[5] is True for n in _sdpa_nodes(program))
    x = torch.randint(0, 256, (3, 9))
    torch.testing.assert_close(program.module(x), model(x), rtol=1e-4, atol=1e-5)
    assert fb.repin(program.graph, chosen) == 2


@pytest.mark.slow
def test_padding_mask_that_is_causal_when_unpadded_chooses_per_call(monkeypatch):
    """A Llama mask (causal AND padding from attention_mask) is reported as causal-when-unpadded; pinned, the site
    runs SDPA with is_causal=True for a batch without padding and with the mask otherwise; both equal the
    original; portable() gives the plain masked SDPA back (what a .pt2 carries), with the choice recorded."""
    import hf_configs
    from evo_rewrite import sdpa

    model = hf_configs.build("llama").eval()
    ids = torch.randint(0, 64, (2, 12))
    ex = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    result = evo_rewrite.rewrite(model, "flash", example_inputs=ex)
    rec = result.report.passes[0]
    assert rec.notes["causal when unpadded"] == 2 and rec.notes["causal sites"] == 0
    program = result.program.clone()
    nodes = _sdpa_nodes(program)
    assert len(nodes) == 2 and all(n.args[3] is not None for n in nodes)
    for node in nodes:
        sdpa.pin(program.graph, node, sdpa.CAUSAL_IF_UNPADDED)
    program.module.recompile()
    assert _sdpa_nodes(program) == []
    calls = []
    real = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda *a, **k: calls.append(a[5] if len(a) > 5 else k.get("is_causal")) or real(*a, **k))
    ids2 = torch.randint(0, 64, (3, 9))
    full, padded = torch.ones_like(ids2), torch.ones_like(ids2)
    padded[0, :3] = 0  # left padding: the mask is no longer causal
    with torch.no_grad():
        for mask, causal in ((full, True), (padded, False)):
            calls.clear()
            out = program.module(input_ids=ids2, attention_mask=mask)["logits"]
            assert calls == [causal, causal]
            ref = model(input_ids=ids2, attention_mask=mask).logits
            keep = mask.bool()
            torch.testing.assert_close(out[keep], ref[keep], rtol=1e-4, atol=1e-4)
    assert sdpa.pinned_backend(next(n for n in program.graph.nodes if n.target is sdpa.sdpa_causal_if_unpadded)) \
        == sdpa.CAUSAL_IF_UNPADDED
    chosen = sdpa.unpin(program.graph)
    assert set(chosen.values()) == {sdpa.CAUSAL_IF_UNPADDED} and len(chosen) == 2
    assert len(_sdpa_nodes(program)) == 2 and all(n.args[3] is not None and not n.args[5] for n in _sdpa_nodes(program))
    assert sdpa.repin(program.graph, chosen) == 2


def test_is_causal_mask_exact():
    """Only the exact square causal pattern counts: bool and additive forms, every row of the batch."""
    from evo_rewrite.sdpa import is_causal_mask

    tril = torch.ones(5, 5, dtype=torch.bool).tril()
    assert is_causal_mask(tril[None, None].expand(2, 1, 5, 5))
    additive = torch.zeros(2, 1, 5, 5).masked_fill(~tril, torch.finfo(torch.float32).min)
    assert is_causal_mask(additive)
    padded = additive.clone()
    padded[1, ..., 0] = torch.finfo(torch.float32).min  # row 1 masks its first key: padding
    assert not is_causal_mask(padded)
    assert not is_causal_mask(additive.masked_fill(~tril, -1.0))  # a bias, not a mask
    assert not is_causal_mask(torch.zeros(1, 1, 1, 5))  # a decode step: not square


SOFTCAP_FUSABLE = [("softcap", 4), ("softcap_gqa_expand", 2), ("softcap_tril_after", 4)]


@pytest.mark.parametrize("spelling,kv", SOFTCAP_FUSABLE, ids=[s for s, _ in SOFTCAP_FUSABLE])
def test_softcap_fused_when_asked(spelling, kv):
    """flash(softcap=true): tanh soft-capped scores become one evo_rewrite::softcap_attention node."""
    from evo_rewrite.ops import SOFTCAP_ATTENTION

    torch.manual_seed(0)
    model = Spelled(spelling, kv_heads=kv).eval()
    x = torch.randn(2, 12, 32)
    result = evo_rewrite.rewrite(model, "flash(softcap=true)", example_inputs=(x,))
    rec = result.report.passes[0]
    assert rec.rewrites == 1 and rec.verified, rec.failure
    nodes = [n for n in result.program.graph.nodes if n.op == "call_function" and n.target is SOFTCAP_ATTENTION]
    assert len(nodes) == 1 and _sdpa_nodes(result.program) == []
    assert not any(n.target in (torch.ops.aten.tanh.default, torch.ops.aten._softmax.default)
                   for n in result.program.graph.nodes)
    q, k, v, mask, scale, softcap, gqa = nodes[0].args
    assert softcap == pytest.approx(5.0) and scale == pytest.approx(8 ** -0.5) and gqa is (kv < 4)
    assert (mask is None) is ("tril" not in spelling)
    assert "softcap_attention" in rec.notes["soft-capped sites"]
    x2 = torch.randn(3, 7, 32)
    torch.testing.assert_close(result.module(x2), model(x2), rtol=1e-4, atol=1e-5)
    assert _check_grads(model, result.module, x2) > 0  # the operator's autograd formula


def test_softcap_not_fused_by_default_or_after_a_mask():
    """Plain flash leaves soft-capped sites; with softcap=true a mask added before the tanh still blocks it."""
    x = torch.randn(2, 12, 32)
    rec = evo_rewrite.rewrite(Spelled("softcap").eval(), "flash", example_inputs=(x,)).report.passes[0]
    assert rec.rewrites == 0 and "flash(softcap=true)" in rec.skipped[0]["reason"]
    rec = evo_rewrite.rewrite(Spelled("tril_fill_ninf_softcap").eval(), "flash(softcap=true)",
                           example_inputs=(x,)).report.passes[0]
    assert rec.rewrites == 0 and "soft-capped with tanh after a bias" in rec.skipped[0]["reason"]


@pytest.mark.slow
def test_softcap_program_round_trips_as_pt2_in_a_fresh_process(tmp_path):
    """A .pt2 holding evo_rewrite::softcap_attention loads wherever evo_rewrite is imported (the op registers)."""
    import subprocess
    import sys

    torch.manual_seed(0)
    model = Spelled("softcap_tril_after").eval()
    x = torch.randn(2, 12, 32)
    result = evo_rewrite.rewrite(model, "flash(softcap=true)", example_inputs=(x,))
    path = tmp_path / "sc.pt2"
    result.save(str(path))
    x2 = torch.randn(3, 7, 32)
    torch.save({"x": x2, "ref": model(x2).detach()}, tmp_path / "io.pt")
    code = ("import sys, torch, evo_rewrite; d = torch.load(sys.argv[2]); p = evo_rewrite.load(sys.argv[1]).program; "
            "torch.testing.assert_close(p.module(d['x']), d['ref'], rtol=1e-4, atol=1e-5); "
            "assert any('softcap_attention' in str(n.target) for n in p.graph.nodes); print('ok')")
    out = subprocess.run([sys.executable, "-c", code, str(path), str(tmp_path / "io.pt")], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]
