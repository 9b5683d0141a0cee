"""`checkpoint`: same outputs and gradients, recomputation in backward, minimal budget sets, composition,
clear errors, and a source directory that keeps its regions through evo_rewrite.load."""

import itertools
import json

import pytest
import torch
import torch.nn as nn

import evo_rewrite
from evo_rewrite import OutputError, PassNotApplicable, PipelineError, zoo
from evo_rewrite.cli import main
from evo_rewrite.pass_infra import module_paths
from evo_rewrite.passes.checkpoint_memory import inputs_at, profile
from evo_rewrite.regions import find_regions, region_modules, regions_of


def _grads(module, x):
    module.zero_grad(set_to_none=True)
    out = module(x)
    out = out["logits"] if isinstance(out, dict) else out
    out.float().pow(2).mean().backward()
    return out.detach(), {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


def _saved_for_backward(module, x) -> int:
    """How many tensors autograd saves for backward in one forward (checkpointed regions save none)."""
    count = 0

    def pack(t):
        nonlocal count
        count += 1
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        module(x)
    return count


def _region_calls(module):
    """Count calls of each region's forward: once in forward, once more when backward recomputes it."""
    calls = {p: 0 for p in region_modules(module)}
    for p, gm in region_modules(module).items():
        gm.register_forward_pre_hook(lambda m, a, p=p: calls.__setitem__(p, calls[p] + 1))
    return calls


@pytest.fixture(scope="module")
def gpt():
    return zoo.gpt(n_layer=4)


def test_outputs_and_gradients_match_and_backward_recomputes(gpt):
    model, inputs = gpt
    result = evo_rewrite.rewrite(model, "checkpoint", example_inputs=inputs, strict=True)
    rec = result.report.passes[0]
    assert rec.rewrites == 4 and rec.verified and rec.metrics["max_abs_error"] == 0.0
    assert rec.notes["regions"] == "h.0, h.1, h.2, h.3 (4 of 4 blocks)"
    assert regions_of(result.module) == ("h.0", "h.1", "h.2", "h.3")
    assert result.module.code.count("torch.utils.checkpoint") == 0  # regions are called through their runners
    assert sum(line.strip().startswith("checkpoint_h_") for line in result.module.code.splitlines()) == 4

    x = torch.randint(0, 256, (3, 11))  # another size than the example
    ref_out, ref_grads = _grads(model, x)
    calls = _region_calls(result.module)
    out, grads = _grads(result.module, x)
    torch.testing.assert_close(out, ref_out, rtol=0, atol=0)
    # the rewritten module names weights by module path, as the original does (lm_head is tied to wte)
    assert set(grads) <= set(ref_grads) and len(grads) == len({id(p) for p in model.parameters()})
    for name, g in grads.items():
        torch.testing.assert_close(g, ref_grads[name], rtol=1e-6, atol=1e-7)
    assert calls == {p: 2 for p in ("h.0", "h.1", "h.2", "h.3")}  # forward, then recomputed in backward

    plain = evo_rewrite.prepare(model, inputs).module
    assert _saved_for_backward(result.module, x) < _saved_for_backward(plain, x)


@pytest.mark.slow
def test_every_and_module_globs(gpt):
    model, inputs = gpt
    r = evo_rewrite.rewrite(model, "checkpoint(every=2)", example_inputs=inputs, strict=True)
    assert regions_of(r.module) == ("h.0", "h.2") and r.report.passes[0].rewrites == 2
    r = evo_rewrite.rewrite(model, "checkpoint(modules=[h.*.mlp, h.3])", example_inputs=inputs, strict=True)
    assert regions_of(r.module) == ("h.0.mlp", "h.1.mlp", "h.2.mlp", "h.3")  # outermost match wins
    assert list(r.program.annotations.checkpoint.paths) == ["h.0.mlp", "h.1.mlp", "h.2.mlp", "h.3"]
    # a second checkpoint adds to the regions and skips what is already wrapped
    again = evo_rewrite.rewrite(r.program, "checkpoint", strict=True)
    rec = again.report.passes[0]
    assert rec.rewrites == 3 and [s["module"] for s in rec.skipped] == ["h.3"]
    assert regions_of(again.module) == ("h.0", "h.1", "h.2", "h.3")


def test_no_repeated_blocks_is_reported_not_guessed():
    class One(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(8, 16), nn.Linear(16, 8)

        def forward(self, x):
            return self.b(torch.relu(self.a(x)))

    r = evo_rewrite.rewrite(One(), "checkpoint", example_inputs=(torch.randn(2, 4, 8),))
    rec = r.report.passes[0]
    assert rec.rewrites == 0 and "no repeated blocks" in rec.message and not regions_of(r.module)
    r = evo_rewrite.rewrite(One(), "checkpoint(modules=[a])", example_inputs=(torch.randn(2, 4, 8),), strict=True)
    assert regions_of(r.module) == ("a",)


class _Uneven(nn.Module):
    """Four blocks, two narrow and two wide MLPs: blocks 1 and 3 hold most of the activations."""

    def __init__(self, d=16, widths=(16, 256, 16, 256)):
        super().__init__()
        self.emb = nn.Embedding(50, d)
        self.blocks = nn.ModuleList(nn.Sequential(nn.LayerNorm(d), nn.Linear(d, w), nn.GELU(), nn.Linear(w, d))
                                    for w in widths)
        self.head = nn.Linear(d, 50)

    def forward(self, ids):
        x = self.emb(ids)
        for b in self.blocks:
            x = x + b(x)
        return self.head(x)


def test_budget_picks_fewest_blocks_on_uneven_model_and_estimate_matches_measured():
    torch.manual_seed(0)
    model, ids = _Uneven(), torch.randint(0, 50, (2, 8))
    program = evo_rewrite.prepare(model, (ids,))
    at = inputs_at(program, batch=4, seq=64)
    prof = profile(program, at)
    base = prof.bytes()
    blocks = ["blocks.0", "blocks.1", "blocks.2", "blocks.3"]
    est = {s: prof.bytes(find_regions(program.graph, list(s))) for n in range(5) for s in itertools.combinations(blocks, n)}
    budget = (est[("blocks.1", "blocks.3")] + est[("blocks.1",)]) // 2  # two wide blocks suffice, one does not
    assert min(len(s) for s, b in est.items() if b <= budget) == 2
    r = evo_rewrite.rewrite(program, f"checkpoint(budget={budget}, batch=4, seq=64)", strict=True)
    rec = r.report.passes[0]
    assert regions_of(r.module) == ("blocks.1", "blocks.3") and rec.rewrites == 2
    assert rec.notes["budget"].endswith("estimated") and base > budget
    meta = r.program.annotations.checkpoint.estimate
    assert meta["estimate_bytes_after"] == est[("blocks.1", "blocks.3")] <= budget == meta["budget_bytes"]

    # measured: what autograd saves outside the regions, the inputs checkpoint keeps, and the output
    x = at.args[0]
    storages = {}

    def keep(t):
        if not isinstance(t, nn.Parameter):
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    def keep_inputs(module, args):
        for a in args:
            if isinstance(a, torch.Tensor):
                keep(a)

    for gm in region_modules(r.module).values():
        gm.register_forward_pre_hook(keep_inputs)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        out = r.module(x)
    keep(out)
    measured = sum(b for p, b in storages.items() if p not in params)
    assert abs(measured - meta["estimate_bytes_after"]) <= 0.1 * measured


@pytest.mark.slow
def test_composes_with_gqa_flash_bf16_in_any_order(gpt):
    model, inputs = gpt
    for pipeline in ["gqa(kv_heads=2),flash,checkpoint(every=2),bf16", "checkpoint,flash,bf16"]:
        r = evo_rewrite.rewrite(model, pipeline, example_inputs=inputs)
        assert r.report.ok, r.report.table()
        by_name = {p.name: p for p in r.report.passes}
        assert by_name["flash"].rewrites == 4 and by_name["bf16"].rewrites > 0  # later passes see every node
        want = ("h.0", "h.2") if "every=2" in pipeline else ("h.0", "h.1", "h.2", "h.3")
        assert regions_of(r.module) == want
        calls = _region_calls(r.module)
        out = r.module(torch.randint(0, 256, (2, 9)))
        out.float().sum().backward()
        assert all(c == 2 for c in calls.values())


@pytest.mark.parametrize("text,msg", [
    ("checkpoint(every=0)", r"pass 'checkpoint': every must be >= 1"),
    ("checkpoint(every=2, budget=1GB)", r"pass 'checkpoint': give one of every, modules and budget, not every and budget"),
    ("checkpoint(budget=lots)", r"budget='lots' is not a memory size .*give bytes \(3e9\) or a size with a unit"),
    ("checkpoint(budget=-1GB)", r"budget='-1GB' is not a memory size"),
    ("checkpoint(seq=0)", r"seq must be >= 1, got 0"),
    ("checkpoint(every=two)", r"option every='two' is not valid; expected int"),
])
def test_bad_options_fail_at_parse_time(text, msg):
    with pytest.raises(PipelineError, match=msg):
        evo_rewrite.parse_pipeline(text)


@pytest.mark.parametrize("text,msg", [
    ("checkpoint(modules=[decoder.*])", r"modules=\['decoder\.\*'\] matches no module of the program; module paths look like: wte"),
    ("checkpoint(budget=1KB)", r"the budget 1 KB cannot be met on arg0:int64\[2, 16\]: with all 4 blocks checkpointed the "
                               r"estimated activation memory is .* Raise the budget or lower batch/seq"),
    ("checkpoint(budget=1GB, batch=1)", r"batch \(dimension 0\) 1 is outside the range the program was captured for"),
])
def test_options_that_do_not_fit_the_model(gpt, text, msg):
    model, inputs = gpt
    with pytest.raises(PassNotApplicable, match=msg):
        evo_rewrite.rewrite(model, text, example_inputs=inputs)


@pytest.mark.slow
def test_source_directory_round_trip_keeps_regions(gpt, tmp_path):
    model, inputs = gpt
    r = evo_rewrite.rewrite(model, "flash,checkpoint(every=2)", example_inputs=inputs, strict=True)
    with pytest.raises(OutputError, match=r"x\.pt2: a program with activation-checkpoint regions is written as a "
                                          r"directory .*give a directory path, e\.g\. .*/x"):
        r.save(tmp_path / "x.pt2")
    from evo_rewrite.targets.pytorch import save_pt2

    with pytest.raises(OutputError, match=r"which a \.pt2 would silently drop \(torch\.export inlines them\)"):
        save_pt2(r.program, tmp_path / "x.pt2")
    out = r.save(tmp_path / "ckpt")
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["evo_rewrite.json", "inputs.safetensors",
                                                                      "model.py", "model.safetensors"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left behind
    src = (tmp_path / "ckpt" / "model.py").read_text()
    assert "class Region_h_0(torch.nn.Module)" in src and "class Region_h_2(torch.nn.Module)" in src
    assert src.count("torch.utils.checkpoint.checkpoint(") == 2 and "use_reentrant = False" in src
    assert src.count("torch.ops.aten.scaled_dot_product_attention") == 4
    meta = json.loads((tmp_path / "ckpt" / "evo_rewrite.json").read_text())
    assert meta["regions"] == ["h.0", "h.2"] and meta["applied"] == ["flash", "checkpoint(every=2)"]

    loaded = evo_rewrite.load(out, trust_code=True)
    p = loaded.program
    assert loaded.source.kind == "generated" and regions_of(p.module) == ("h.0", "h.2")
    assert p.applied == ["flash", "checkpoint(every=2)"]
    assert any("h.1.attn" in module_paths(n) for n in p.graph.nodes)  # provenance below the blocks is back
    x = torch.randint(0, 256, (3, 10))
    ref_out, ref_grads = _grads(model, x)
    calls = _region_calls(p.module)
    out_, grads = _grads(p.module, x)
    torch.testing.assert_close(out_, ref_out, rtol=1e-5, atol=1e-5)
    tied = {"lm_head.weight": "wte.weight"}  # flash dropped the unused wte read; the head's weight is the same tensor
    for name, g in grads.items():
        torch.testing.assert_close(g, ref_grads[tied.get(name, name)], rtol=1e-4, atol=1e-6)
    assert calls == {"h.0": 2, "h.2": 2}
    flat = evo_rewrite.prepare(model, inputs).module
    assert _saved_for_backward(p.module, x) < _saved_for_backward(flat, x)

    # the directory is again a source: another pass, and the regions are still there
    again = evo_rewrite.rewrite(out, "checkpoint(modules=[h.1])", strict=True, trust_code=True)
    assert regions_of(again.module) == ("h.0", "h.1", "h.2")
    with pytest.raises(OutputError, match="refusing to overwrite the source .*ckpt"):
        again.save(out)


@pytest.mark.slow
def test_generated_model_runs_without_evo_rewrite(gpt, tmp_path):
    """model.py builds and trains the model on its own: the checkpoint calls are in its source."""
    import importlib.util

    model, inputs = gpt
    out = evo_rewrite.rewrite(model, "checkpoint(every=2)", example_inputs=inputs, strict=True).save(tmp_path / "m")
    spec = importlib.util.spec_from_file_location("generated_model", f"{out}/model.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    built = mod.load()
    assert isinstance(getattr(built.h, "0"), mod.Region_h_0) and built.lm_head.weight is built.wte.weight
    meta = json.loads(open(f"{out}/evo_rewrite.json").read())
    assert meta["aliases"] == {"lm_head.weight": "wte.weight"}  # the tied head is stored once
    x = torch.randint(0, 256, (2, 12))
    calls = {"n": 0}
    getattr(built.h, "0").register_forward_pre_hook(lambda m, a: calls.__setitem__("n", calls["n"] + 1))
    out_, grads = _grads(built, x)
    ref_out, ref_grads = _grads(model, x)
    torch.testing.assert_close(out_, ref_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grads["h.0.mlp.c_fc.weight"], ref_grads["h.0.mlp.c_fc.weight"], rtol=1e-4, atol=1e-6)
    assert calls["n"] == 2


@pytest.mark.slow
def test_cli_default_output_is_a_directory_and_onnx_inlines(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code = main(["evo_rewrite.zoo:gpt", "--passes", "checkpoint(every=2)", "-q"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert (tmp_path / "gpt.rewritten" / "model.py").is_file() and "wrote    gpt.rewritten" in out
    assert regions_of(evo_rewrite.load("gpt.rewritten", trust_code=True).program.module) == ("h.0", "h.2")
    code = main(["evo_rewrite.zoo:gpt", "--passes", "checkpoint(every=2)", "-o", "g.pt2", "-q"])
    _, err = capsys.readouterr()
    assert code == 5 and "give a directory path, e.g. g" in err and not (tmp_path / "g.pt2").exists()
    # ONNX is for inference: export interprets the flat graph, so the regions are simply inlined
    code = main(["gpt.rewritten", "--trust-code", "--target", "onnx", "-o", "g.onnx", "-q"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "fused attention operators / attention sites: 4 / 4" in out and (tmp_path / "g.onnx").is_file()


@pytest.mark.slow
def test_hf_llama_gradients_and_regions():
    from hf_configs import build

    model = build("llama").train()
    ids = torch.randint(3, 128, (2, 12))
    r = evo_rewrite.rewrite(model, "flash,checkpoint", example_inputs={"input_ids": ids}, strict=True)
    assert regions_of(r.module) == ("model.layers.0", "model.layers.1")
    ref = model(input_ids=ids).logits
    ref.pow(2).mean().backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    calls = _region_calls(r.module)
    out = r.module(input_ids=ids)["logits"]
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    out.pow(2).mean().backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref_grads[n], rtol=1e-3, atol=1e-6)
    assert calls == {"model.layers.0": 2, "model.layers.1": 2}
