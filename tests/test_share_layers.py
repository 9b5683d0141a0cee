import os
import zipfile

import pytest
import torch

import evo_rewrite
from hf_configs import build
from evo_rewrite import PipelineError, zoo
from evo_rewrite import repeated_blocks
from evo_rewrite.passes.share_layers_fit import InputStats, Problem, fit_sets
from evo_rewrite.targets.weights import load_safetensors, save_safetensors

MATRIX = 64 * 192 + 64 * 64 + 64 * 256 + 256 * 64  # matrices of one zoo.gpt block


@pytest.fixture(scope="module")
def hf_programs():
    return {arch: evo_rewrite.prepare(build(arch)) for arch in ("bert", "llama")}


def _run(source, spec, inputs=None, **kw):
    if kw.get("calibration") is not None and isinstance(source, evo_rewrite.Program):
        source = source.clone()  # rewrite() attaches calibration to the program it is given: keep fixtures clean
    result = evo_rewrite.rewrite(source, spec, example_inputs=inputs, **kw)
    return result, result.report.passes[0]


def _weights_read(program):
    """get_attr target of the weight of every aten.linear, by the module path of the linear."""
    out = {}
    for n in program.graph.nodes:
        if n.target is torch.ops.aten.linear.default and n.args[1].op == "get_attr":
            out.setdefault(evo_rewrite.module_path(n), []).append(n.args[1].target)
    return out


# -- analysis ---------------------------------------------------------------------------------------

@pytest.mark.slow
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
    program = evo_rewrite.prepare(_Odd().eval(), (torch.randn(2, 8),))
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


@pytest.mark.parametrize("residual", ["activation", "svd"])
@pytest.mark.parametrize("arch,half", [("gpt", 32), ("bert", 16), ("llama", 16)])
def test_full_rank_residual_is_exact(arch, half, residual, gpt_program, hf_programs):
    program = gpt_program if arch == "gpt" else hf_programs[arch]
    calibration = [program.second_inputs(seed=s) for s in (3, 4)]  # other batches: the fit is not the identity
    spec = f"share-layers(residual={residual},rank=256)"
    result, rec = _run(program, spec, thresholds=evo_rewrite.Thresholds(min_sqnr_db=80), calibration=calibration)
    assert rec.notes["init"] == "fit" and rec.notes["bias"] == "fit"
    assert rec.verified and rec.rewrites == len(repeated_blocks(program)[0].blocks)
    assert rec.metrics["max_rel_error"] < 1e-4
    assert rec.notes["residual parameters"] > 0 and rec.notes["residual"] == residual
    _, low = _run(program, f"share-layers(residual={residual},rank={half})", calibration=calibration)
    _, none = _run(program, "share-layers", calibration=calibration)
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


@pytest.mark.slow
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
        evo_rewrite.parse_pipeline("share-layers(strategy=every,k=1)")
    with pytest.raises(PipelineError, match=r"rank must be >= 0 \(0: no per-layer residual\), got -1"):
        evo_rewrite.parse_pipeline("share-layers(rank=-1)")
    with pytest.raises(PipelineError, match=r"option strategy='sequence' is not valid; allowed: all, every, cycle"):
        evo_rewrite.parse_pipeline("share-layers(strategy=sequence)")
    with pytest.raises(PipelineError, match=r"rank as a fraction of the blocks' parameters must lie in \(0, 1\], got 1.5"):
        evo_rewrite.parse_pipeline("share-layers(rank=1.5)")
    with pytest.raises(PipelineError, match=r"option residual='asvd' is not valid; allowed: auto, activation, svd"):
        evo_rewrite.parse_pipeline("share-layers(residual=asvd)")
    with pytest.raises(PipelineError, match=r"option init='best' is not valid; allowed: auto, fit, mean, first"):
        evo_rewrite.parse_pipeline("share-layers(init=best)")
    with pytest.raises(PipelineError, match=r"rank must be given and >= 1 \(the inner size E"):
        evo_rewrite.parse_pipeline("factorize-embeddings")


def _pt2_entries(path, part):
    with zipfile.ZipFile(path) as z:
        return sum(e.file_size for e in z.infolist() if f"/{part}" in e.filename)


def _pt2_weight_bytes(path):
    return _pt2_entries(path, "data/weights/")


def _pt2_graph_bytes(path):
    return _pt2_entries(path, "models/")


@pytest.mark.parametrize("rank", [0, 4])
@pytest.mark.slow
def test_saved_file_stores_shared_tensors_once(gpt_program, tmp_path, rank):
    base = evo_rewrite.rewrite(gpt_program, "")
    shared = evo_rewrite.rewrite(gpt_program, f"share-layers(rank={rank})")
    residual = shared.report.passes[0].notes.get("residual parameters", 0)
    assert residual == 4 * rank * (192 + 64 + 64 + 64 + 256 + 64 + 64 + 256)
    claimed = shared.report.model_before["weight_bytes"] - shared.report.model_after["weight_bytes"]
    assert claimed == (3 * MATRIX - residual) * 4
    assert shared.report.model_before["parameters"] - shared.report.model_after["parameters"] == claimed // 4
    for ext, save in ((".pt2", lambda r, p: r.save(p)), (".safetensors", lambda r, p: save_safetensors(r.program, p))):
        a, b = tmp_path / f"a{ext}", tmp_path / f"b{ext}"
        save(base, a)
        save(shared, b)
        dropped = os.path.getsize(a) - os.path.getsize(b)
        if ext == ".pt2":
            weights = _pt2_weight_bytes(a) - _pt2_weight_bytes(b)
            assert abs(weights - claimed) < 0.02 * claimed, (weights, claimed)
            if rank:  # the graph grows by the residual's nodes (models/model.json), not by weights
                dropped += _pt2_graph_bytes(b) - _pt2_graph_bytes(a)
        assert abs(dropped - claimed) < 0.05 * claimed, (ext, dropped, claimed)
    state = torch.export.load(tmp_path / "b.pt2").state_dict
    assert "shared_layers.h.0.attn.c_attn.weight" in state and "h.1.attn.c_attn.weight" not in state
    # safetensors: each tensor once, the tied head as an alias; every name the program reads comes back
    assert os.path.getsize(tmp_path / "a.safetensors") - base.report.model_after["weight_bytes"] < 8192  # header only
    state = load_safetensors(tmp_path / "a.safetensors")
    assert state["lm_head.weight"] is state["wte.weight"]  # tied: stored once, read back as one tensor
    state = load_safetensors(tmp_path / "b.safetensors")
    tensors = shared.program.named_tensors()
    assert state.keys() == tensors.keys() and "h.1.attn.c_attn.weight" not in state
    for k, t in tensors.items():
        torch.testing.assert_close(state[k], t.detach(), rtol=0, atol=0)


def test_safetensors_refuses_a_directory(gpt_program, tmp_path):
    with pytest.raises(evo_rewrite.OutputError, match=r"is a directory; give a file name ending in \.safetensors"):
        save_safetensors(gpt_program, tmp_path)


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


# -- calibrated fits --------------------------------------------------------------------------------

def _problem(seed=0, n=4000, d_in=16, d_out=8):
    """Two blocks' weights and inputs with very unequal variance per input direction."""
    g = torch.Generator().manual_seed(seed)
    ws = [torch.randn(d_out, d_in, generator=g, dtype=torch.float64) for _ in range(2)]
    scale = torch.logspace(1, -2, d_in, dtype=torch.float64)
    xs = [torch.randn(n, d_in, generator=g, dtype=torch.float64) * scale + 3.0 for _ in range(2)]  # mean 3
    stats = [InputStats(n, x.sum(0), x.t() @ x) for x in xs]
    return Problem(ws, stats, [True, True]), xs


def _output_error(problem, xs, fit):
    """Σ_b ‖(W_b x + c) − (W̃_b x + c + shift_b)‖² over the tokens: what the block's output loses."""
    total = 0.0
    for w, x, res, shift in zip(problem.weights, xs, fit.residuals, fit.bias_shift):
        approx = fit.shared + (res[0] @ res[1] if res is not None else 0)
        err = x @ (w - approx).t() - (shift if shift is not None else 0)
        total += float(err.pow(2).sum())
    return total


def test_fit_lowers_the_output_error():
    problem, xs = _problem()
    err = {}
    for init, activation, bias in [("mean", False, False), ("mean", False, True), ("fit", False, True),
                                   ("fit", True, True)]:
        for rank in (0, 3):
            (fit,) = fit_sets([problem], init=init, activation=activation, rank=rank, budget=0, refit_bias=bias)
            err[init, activation, bias, rank] = _output_error(problem, xs, fit)
    assert err["mean", False, True, 0] < 0.7 * err["mean", False, False, 0]  # the bias absorbs the inputs' mean
    assert err["fit", False, True, 0] < err["mean", False, True, 0]  # the shared matrix fitted to the inputs
    assert err["fit", True, True, 3] < 0.5 * err["fit", False, True, 3]  # residual fitted to the inputs (ASVD)
    # with the bias shift, the output error has zero mean on the calibration tokens
    (fit,) = fit_sets([problem], init="fit", activation=True, rank=2, budget=0, refit_bias=True)
    for w, x, res, shift in zip(problem.weights, xs, fit.residuals, fit.bias_shift):
        mean_error = (x @ (w - fit.shared - res[0] @ res[1]).t() - shift).mean(0)
        assert mean_error.abs().max() < 1e-9


def test_fit_with_few_tokens_is_the_plain_mean():
    problem, _ = _problem(n=3)  # 3 tokens for 16 inputs: not enough to trust
    (fit,) = fit_sets([problem], init="fit", activation=True, rank=0, budget=0, refit_bias=True)
    torch.testing.assert_close(fit.shared, (problem.weights[0] + problem.weights[1]) / 2)
    assert fit.bias_shift == [None, None]
    problem, _ = _problem(n=8)  # 8 tokens for 16 inputs: fitted, the covariance shrunk toward the identity
    (fit,) = fit_sets([problem], init="fit", activation=True, rank=0, budget=0, refit_bias=True)
    assert not torch.allclose(fit.shared, (problem.weights[0] + problem.weights[1]) / 2)


def test_budget_is_spent_where_the_error_is():
    problem, xs = _problem()
    small, _ = _problem(seed=1)
    small.weights[1] = small.weights[0] + 1e-3 * small.weights[1]  # nearly equal: little to correct
    budget = 10 * (16 + 8)
    fits = fit_sets([problem, small], init="fit", activation=True, rank=0.5, budget=budget, refit_bias=True)
    ranks = [[0 if r is None else r[0].shape[1] for r in f.residuals] for f in fits]
    assert sum(map(sum, ranks)) == 10  # the whole budget, in rank-one terms of 24 parameters
    assert sum(ranks[0]) > sum(ranks[1])


def test_calibration_inputs_are_used_without_padding(hf_programs, gpt_program):
    program = hf_programs["bert"]
    ids = program.second_inputs(seed=5)
    mask = torch.ones_like(ids.kwargs["attention_mask"])
    mask[0, -3:] = 0
    calibration = [evo_rewrite.Inputs(ids.args, {**ids.kwargs, "attention_mask": mask})]
    _, rec = _run(program, "share-layers(rank=2)", calibration=calibration)
    assert (rec.notes["init"], rec.notes["residual"], rec.notes["bias"]) == ("fit", "activation", "fit")
    assert rec.notes["calibration"].startswith("1 calibration batch(es)")
    assert rec.notes["calibration tokens"] == int(mask[:-1].sum())  # the last row is held out for measuring quality
    assert rec.notes["biases refit"] == 2 * 6  # both layers: q, k, v, attention output, intermediate, output
    # without calibration data the defaults are the plain ones; asked for, the fit reads the example inputs
    _, rec = _run(program, "share-layers(rank=2)")
    assert (rec.notes["init"], rec.notes["residual"], rec.notes["bias"]) == ("mean", "svd", "keep")
    assert "calibration" not in rec.notes and "biases refit" not in rec.notes
    _, rec = _run(program, "share-layers(init=fit)")
    assert rec.notes["calibration"] == "the example inputs" and rec.notes["init"] == "fit"
    assert rec.notes["calibration tokens"] == program.inputs.kwargs["input_ids"].numel()
    # without a residual, sets of three or more blocks take the mean (and the bias refit)
    gpt_calibration = [gpt_program.second_inputs(seed=3)]
    _, rec = _run(gpt_program, "share-layers", calibration=gpt_calibration)
    assert (rec.notes["init"], rec.notes["residual"], rec.notes["bias"]) == ("mean", "none", "fit")
    _, rec = _run(gpt_program, "share-layers(strategy=every)", calibration=gpt_calibration)
    assert rec.notes["init"] == "fit"


def test_rank_as_a_parameter_budget(gpt_program):
    block = sum(t.numel() for k, t in gpt_program.named_tensors().items()
                if k.startswith("h.") and isinstance(t, torch.nn.Parameter))  # not the causal-mask buffers
    calibration = [gpt_program.second_inputs(seed=3)]
    result, rec = _run(gpt_program, "share-layers(strategy=every,rank=0.1)", calibration=calibration)
    assert 0.9 * 0.1 * block < rec.notes["residual parameters"] <= 0.1 * block
    assert rec.notes["residual budget"] == f"0.1 x {block:,} block parameters = {int(0.1 * block):,}"
    lo, hi = map(int, rec.notes["residual rank"].split(" ")[0].split(".."))
    assert 0 <= lo < hi
    before, after = result.report.model_before["parameters"], result.report.model_after["parameters"]
    assert before - after == 2 * MATRIX - rec.notes["residual parameters"]


@pytest.mark.slow
def test_calibrated_sharing_beats_plain_sharing_on_minilm():
    """Real weights, held-out text: the defaults (init=fit, residual=activation, bias=fit) against the plain
    mean + weight SVD, both with a 5% residual budget."""
    rm = pytest.importorskip("real_models")
    try:
        model, tok = rm.minilm()
    except rm.MissingModelError as exc:
        pytest.skip(str(exc))
    calibration = rm.minilm_batches(rm.texts("calibration"), batch=16, max_len=64, tokenizer=tok, limit=32)
    held = rm.minilm_batches(rm.texts("eval"), batch=16, max_len=64, tokenizer=tok, limit=16)
    program = evo_rewrite.prepare(model, dict(held[0]))

    def embed(fn):
        h, m = fn(**held[0])["last_hidden_state"], held[0]["attention_mask"].unsqueeze(-1).float()
        return (h * m).sum(1) / m.sum(1)

    with torch.no_grad():
        ref = embed(model)
        cosine = {}
        for spec in ("share-layers(strategy=every,rank=0.05,init=mean,residual=svd,bias=keep)",
                     "share-layers(strategy=every,rank=0.05)"):
            result = evo_rewrite.rewrite(program, spec, calibration=[dict(b) for b in calibration])
            cosine[spec] = float(torch.nn.functional.cosine_similarity(embed(result.module), ref).mean())
    plain, fitted = cosine.values()
    assert fitted > plain + 0.2, cosine


# -- factorize-embeddings ---------------------------------------------------------------------------

def test_factorize_tied_embedding(gpt_program):
    result, rec = _run(gpt_program, "factorize-embeddings(rank=64)", thresholds=evo_rewrite.Thresholds(min_sqnr_db=80))
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
    result, rec = _run(hf_programs["bert"], "factorize-embeddings(rank=32)", thresholds=evo_rewrite.Thresholds(min_sqnr_db=80))
    assert rec.verified and rec.metrics["max_rel_error"] < 1e-4
    assert "tied output head: 1" in rec.notes["bert.embeddings.word_embeddings.weight"]
    _, rec = _run(torch.nn.Linear(4, 4), "factorize-embeddings(rank=2)", (torch.randn(2, 4),))
    assert rec.rewrites == 0 and rec.message.startswith("no token embedding")
