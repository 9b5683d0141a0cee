import os

import pytest
import torch

import rewriter
from hf_configs import build
from rewriter import PipelineError, zoo
from rewriter import repeated_blocks

MATRIX = 64 * 192 + 64 * 64 + 64 * 256 + 256 * 64  # matrices of one zoo.gpt block


@pytest.fixture(scope="module")
def hf_programs():
    return {arch: rewriter.prepare(build(arch)) for arch in ("bert", "llama")}


def _run(source, spec, inputs=None, **kw):
    result = rewriter.rewrite(source, spec, example_inputs=inputs, **kw)
    return result, result.report.passes[0]


def _weights_read(program):
    """get_attr target of the weight of every aten.linear, by the module path of the linear."""
    out = {}
    for n in program.graph.nodes:
        if n.target is torch.ops.aten.linear.default and n.args[1].op == "get_attr":
            out.setdefault(rewriter.module_path(n), []).append(n.args[1].target)
    return out


# -- analysis ---------------------------------------------------------------------------------------

def test_repeated_blocks_found(gpt_program, hf_programs):
    (g,) = repeated_blocks(gpt_program)
    assert g.container == "h" and g.indices == (0, 1, 2, 3)
    assert g.names[:3] == ("ln_1.weight", "ln_1.bias", "attn.c_attn.weight") and g.blocks[2].path == "h.2"
    assert [(g.container, g.indices) for g in repeated_blocks(hf_programs["bert"])] == [("bert.encoder.layer", (0, 1))]
    assert [(g.container, g.indices) for g in repeated_blocks(hf_programs["llama"])] == [("model.layers", (0, 1))]


class _Block(torch.nn.Module):
    def __init__(self, act):
        super().__init__()
        self.fc, self.act = torch.nn.Linear(8, 8), act

    def forward(self, x):
        return self.act(self.fc(x))


class _Odd(torch.nn.Module):
    """Three blocks of equal parameter shapes; block 1 applies ReLU where 0 and 2 apply GELU."""

    def __init__(self):
        super().__init__()
        self.blocks = torch.nn.ModuleList([_Block(torch.nn.ReLU() if i == 1 else torch.nn.GELU()) for i in range(3)])

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return x


def test_blocks_of_other_structure_are_not_grouped():
    program = rewriter.prepare(_Odd().eval(), (torch.randn(2, 8),))
    (g,) = repeated_blocks(program)
    assert g.container == "blocks" and g.indices == (0, 2)


# -- share-layers -----------------------------------------------------------------------------------

@pytest.mark.parametrize("spec,sets,tied,saved,skipped", [
    ("share-layers", "h.[0,1,2,3]", 4, 3, []),
    ("share-layers(strategy=every)", "h.[0,1], h.[2,3]", 4, 2, []),
    ("share-layers(strategy=cycle,k=2)", "h.[0,2], h.[1,3]", 4, 2, []),
    ("share-layers(strategy=every,k=3)", "h.[0,1,2]", 3, 2, ["h.3"]),
])
def test_strategies_on_gpt(gpt_program, spec, sets, tied, saved, skipped):
    result, rec = _run(gpt_program, spec)
    assert rec.verified and rec.rewrites == tied and rec.notes["shared sets"] == sets
    assert [s["module"] for s in rec.skipped] == skipped
    before, after = result.report.model_before["parameters"], result.report.model_after["parameters"]
    assert before - after == saved * MATRIX  # matrices shared, vectors (norms, biases) kept per block
    reads = _weights_read(result.program)
    for members in sets.split(", "):
        idx = members[3:-1].split(",")
        assert len({reads[f"h.{i}.attn.c_attn"][0] for i in idx}) == 1  # one tensor per set
    assert reads["h.0.attn.c_attn"][0].startswith("shared_layers.h.")
    assert "h.0.ln_1.bias" in result.program.named_tensors()
    assert 0.8 < rec.metrics["cosine"] < 1.0  # lossy, and reported


def test_mean_and_first_init(gpt_program):
    model = gpt_program
    ws = [model.get_tensor(f"h.{i}.mlp.c_fc.weight") for i in range(4)]
    result, _ = _run(model, "share-layers(init=mean)")
    torch.testing.assert_close(result.program.get_tensor("shared_layers.h.0.mlp.c_fc.weight"), torch.stack(ws).mean(0))
    result, _ = _run(model, "share-layers(init=first,vectors=share,what=ffn)")
    torch.testing.assert_close(result.program.get_tensor("shared_layers.h.0.mlp.c_fc.weight"), ws[0])
    assert "h.3.mlp.c_fc.bias" not in result.program.named_tensors()  # vectors shared too
    assert "h.3.attn.c_attn.weight" in result.program.named_tensors()  # attention untouched


@pytest.mark.parametrize("arch,half", [("gpt", 32), ("bert", 16), ("llama", 16)])
def test_full_rank_residual_is_exact(arch, half, gpt_program, hf_programs):
    program = gpt_program if arch == "gpt" else hf_programs[arch]
    result, rec = _run(program, "share-layers(rank=256)", thresholds=rewriter.Thresholds(min_sqnr_db=80))
    assert rec.verified and rec.rewrites == len(repeated_blocks(program)[0].blocks)
    assert rec.metrics["max_rel_error"] < 1e-4
    assert rec.notes["residual parameters"] > 0
    _, low = _run(program, f"share-layers(rank={half})")
    _, none = _run(program, "share-layers")
    assert none.metrics["sqnr_db"] < low.metrics["sqnr_db"] < rec.metrics["sqnr_db"]


def test_first_block_needs_no_residual_with_init_first(gpt_program):
    _, rec = _run(gpt_program, "share-layers(rank=4,init=first)")
    assert rec.notes["residual parameters"] == 3 * 4 * (192 + 64 + 64 + 64 + 256 + 64 + 64 + 256)


@pytest.mark.parametrize("arch,what,shared,kept", [
    ("bert", "attention", "attention.self.query.weight", "intermediate.dense.weight"),
    ("bert", "ffn", "intermediate.dense.weight", "attention.output.dense.weight"),
    ("llama", "attention", "self_attn.k_proj.weight", "mlp.up_proj.weight"),
    ("llama", "ffn", "mlp.down_proj.weight", "self_attn.o_proj.weight"),
])
def test_what_is_shared(hf_programs, arch, what, shared, kept):
    result, rec = _run(hf_programs[arch], f"share-layers(what={what})")
    layer = "bert.encoder.layer" if arch == "bert" else "model.layers"
    names = result.program.named_tensors()
    assert rec.verified and rec.rewrites == 2
    assert f"{layer}.1.{shared}" not in names and f"shared_layers.{layer}.0.{shared}" in names
    assert f"{layer}.1.{kept}" in names


def test_no_repeated_blocks_is_reported():
    _, rec = _run(build("albert"), "share-layers")  # ALBERT: one layer used twice already
    assert rec.rewrites == 0 and rec.message.startswith("no repeated blocks")
    _, rec = _run(torch.nn.Linear(4, 4), "share-layers", (torch.randn(2, 4),))
    assert rec.rewrites == 0 and rec.message.startswith("no repeated blocks")
    _, rec = _run(zoo.gpt(n_layer=2)[0], "share-layers(strategy=cycle,k=2)", zoo.gpt(n_layer=2)[1])
    assert rec.rewrites == 0 and rec.message == "no set of two or more blocks to share"
    assert {s["module"] for s in rec.skipped} == {"h.0", "h.1"}


def test_bad_options():
    with pytest.raises(PipelineError, match=r"k must be >= 2 for strategy=every, got 1"):
        rewriter.parse_pipeline("share-layers(strategy=every,k=1)")
    with pytest.raises(PipelineError, match=r"rank must be >= 0 \(0: no per-layer residual\), got -1"):
        rewriter.parse_pipeline("share-layers(rank=-1)")
    with pytest.raises(PipelineError, match=r"option strategy='sequence' is not valid; allowed: all, every, cycle"):
        rewriter.parse_pipeline("share-layers(strategy=sequence)")
    with pytest.raises(PipelineError, match=r"rank must be given and >= 1 \(the inner size E"):
        rewriter.parse_pipeline("factorize-embeddings")


def test_saved_file_stores_shared_tensors_once(gpt_program, tmp_path):
    base = rewriter.rewrite(gpt_program, "")
    shared = rewriter.rewrite(gpt_program, "share-layers")
    base.save(tmp_path / "a.pt2")
    shared.save(tmp_path / "b.pt2")
    claimed = shared.report.model_before["weight_bytes"] - shared.report.model_after["weight_bytes"]
    assert claimed == 3 * MATRIX * 4
    dropped = os.path.getsize(tmp_path / "a.pt2") - os.path.getsize(tmp_path / "b.pt2")
    assert abs(dropped - claimed) < 0.05 * claimed, (dropped, claimed)
    state = torch.export.load(tmp_path / "b.pt2").state_dict
    assert "shared_layers.h.0.attn.c_attn.weight" in state and "h.1.attn.c_attn.weight" not in state


def test_gradients_and_optimizer_step():
    model, inputs = zoo.gpt()
    result, _ = _run(model, "share-layers", inputs)
    params = dict(result.module.named_parameters())
    w = params["shared_layers.h.0.attn.c_attn.weight"]
    x = torch.randint(0, 256, (2, 8))
    result.module(x).square().mean().backward()
    # reference: the original model with every block's matrices set to the shared ones, untied (and its
    # biases set to the refit ones)
    names = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    with torch.no_grad():
        for i, blk in enumerate(model.h):
            for n in names:
                blk.get_submodule(n).weight.copy_(params[f"shared_layers.h.0.{n}.weight"])
                blk.get_submodule(n).bias.copy_(params[f"h.{i}.{n}.bias"])
    model.zero_grad()
    model(x).square().mean().backward()
    per_layer = [blk.attn.c_attn.weight.grad for blk in model.h]
    assert all(g.abs().sum() > 0 for g in per_layer)  # every layer contributes ...
    torch.testing.assert_close(w.grad, sum(per_layer), rtol=1e-4, atol=1e-6)  # ... to the one shared tensor
    # one optimizer step updates one tensor, which every block then reads
    before = w.detach().clone()
    assert sum(p.shape == (192, 64) for p in result.module.parameters()) == 1
    torch.optim.SGD(result.module.parameters(), lr=0.1).step()
    assert not torch.equal(w.detach(), before)
    assert set(t for ts in _weights_read(result.program).values() for t in ts if "c_attn" in t) == {
        "shared_layers.h.0.attn.c_attn.weight"}


# -- factorize-embeddings ---------------------------------------------------------------------------

def test_factorize_tied_embedding(gpt_program):
    result, rec = _run(gpt_program, "factorize-embeddings(rank=64)", thresholds=rewriter.Thresholds(min_sqnr_db=80))
    assert rec.verified and rec.rewrites == 1 and rec.metrics["max_rel_error"] < 1e-4
    assert rec.notes["wte.weight"] == "256x64 -> 256x64 · 64x64; tied output head: 1; rank too high to save parameters"
    result, rec = _run(gpt_program, "factorize-embeddings(rank=16)")
    before, after = result.report.model_before["parameters"], result.report.model_after["parameters"]
    assert before - after == 256 * 64 - 16 * (256 + 64)  # the tied head adds nothing
    names = result.program.named_tensors()
    assert names["wte.weight_a"].shape == (256, 16) and names["wte.weight_b"].shape == (16, 64)
    assert "lm_head.weight" not in names and "wte.weight" not in names
    targets = [n.target for n in result.program.graph.nodes if n.op == "get_attr" and n.target.startswith("wte")]
    assert sorted(targets) == ["wte.weight_a", "wte.weight_b"]  # embedding and head read the same factors


def test_factorize_untied_and_hf(hf_programs):
    result, rec = _run(hf_programs["llama"], "factorize-embeddings(rank=8)")
    assert rec.rewrites == 1 and rec.notes["model.embed_tokens.weight"] == "128x32 -> 128x8 · 8x32"
    assert "lm_head.weight" in result.program.named_tensors()  # not tied: left alone
    result, rec = _run(hf_programs["bert"], "factorize-embeddings(rank=32)", thresholds=rewriter.Thresholds(min_sqnr_db=80))
    assert rec.verified and rec.metrics["max_rel_error"] < 1e-4
    assert "tied output head: 1" in rec.notes["bert.embeddings.word_embeddings.weight"]
    _, rec = _run(torch.nn.Linear(4, 4), "factorize-embeddings(rank=2)", (torch.randn(2, 4),))
    assert rec.rewrites == 0 and rec.message.startswith("no token embedding")
