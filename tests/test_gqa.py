import pytest
import torch

import evo_rewrite
import hf_configs
from hf_configs import build
from evo_rewrite import PassNotApplicable, PipelineError, zoo


def _gqa(model, spec, inputs=None, **kw):
    result = evo_rewrite.rewrite(model, spec, example_inputs=inputs, **kw)
    return result, result.report.passes[0]


def test_unchanged_head_count_is_identity(gpt, gpt_program):
    model, _ = gpt
    result, rec = _gqa(gpt_program, "gqa(kv_heads=4)")
    assert rec.rewrites == 0 and rec.verified
    assert rec.message == "no site needs grouping to 4 K/V heads"
    assert {s["reason"] for s in rec.skipped} == {"already has 4 K/V heads"}
    x = torch.randint(0, 256, (3, 9))
    torch.testing.assert_close(result.module(x), model(x))


@pytest.mark.parametrize("kv", [2, 1])
@pytest.mark.parametrize("factory", ["gpt", "encoder"])
def test_zoo_ratios_shapes_and_kv_cache(factory, kv, request):
    result, rec = _gqa(request.getfixturevalue(f"{factory}_program"), f"gqa(kv_heads={kv})")
    assert rec.rewrites == 4 and rec.verified
    before, after = result.report.model_before, result.report.model_after
    assert after["kv_cache_bytes_per_token"] * 4 // kv == before["kv_cache_bytes_per_token"]
    assert after["parameters"] < before["parameters"]
    if factory == "gpt":  # fused qkv: q rows unchanged, k and v rows shrink
        assert result.program.get_tensor("h.0.attn.c_attn.weight").shape == (64 + 2 * 16 * kv, 64)
    else:
        assert result.program.get_tensor("layers.0.key.weight").shape == (16 * kv, 64)
        assert result.program.get_tensor("layers.0.value.bias").shape == (16 * kv,)
    assert 0.5 < rec.metrics["cosine"] < 1.0  # lossy, and reported


def test_mean_pooling_is_the_papers_conversion(encoder_program):
    result, _ = _gqa(encoder_program, "gqa(kv_heads=2)")
    w = encoder_program.get_tensor("layers.1.key.weight").detach()  # 4 heads x 16 dims
    expected = w.reshape(2, 2, 16, 64).mean(1).reshape(32, 64)
    torch.testing.assert_close(result.program.get_tensor("layers.1.key.weight"), expected)


@pytest.mark.parametrize("arch,kv,sites", [("gpt2", 2, 2), ("bert", 1, 2), ("llama", 1, 2), ("bart", 2, 6), ("phi3", 2, 2)])
def test_hf_models(arch, kv, sites):
    """GPT-2 fused qkv (Conv1D), BERT, Llama with rotary and already GQA (2 -> 1), BART cross-attention, Phi-3 sliced qkv."""
    model = build(arch)
    result, rec = _gqa(model, f"gqa(kv_heads={kv}),flash")
    assert rec.rewrites == sites and rec.verified, rec.failure
    flash = result.report.passes[1]
    assert flash.rewrites == sites and flash.verified  # grouped K/V fuse, GQA-native
    sdpa = [n for n in result.program.graph.nodes if n.target is torch.ops.aten.scaled_dot_product_attention.default]
    assert all(n.args[1].meta["val"].shape[1] == kv for n in sdpa)  # K reaches attention with kv heads
    assert all(n.kwargs.get("enable_gqa") for n in sdpa)
    inputs = result.program.second_inputs()
    out = result.module(*inputs.args, **inputs.kwargs)
    assert all(torch.isfinite(v).all() for v in out.values())


def test_gradients_reach_the_grouped_weights(gpt_program):
    result, _ = _gqa(gpt_program, "gqa(kv_heads=2)")
    w = dict(result.module.named_parameters())["h.0.attn.c_attn.weight"]
    result.module(torch.randint(0, 256, (2, 8))).square().mean().backward()
    assert w.grad is not None and w.grad.shape == (128, 64) and w.grad.abs().sum() > 0


def test_fit_beats_mean():
    model, inputs = zoo.encoder()
    calib = [dict(input_ids=torch.randint(0, 256, (4, 16)), attention_mask=torch.ones(4, 16, dtype=torch.long))]
    _, mean = _gqa(model, "gqa(kv_heads=1)", inputs)
    _, fit = _gqa(model, "gqa(kv_heads=1,method=fit)", inputs, calibration=calib)
    assert fit.notes["fitted sites"] == "4 of 4"
    assert fit.notes["calibration"].startswith("1 calibration batch(es): input_ids:int64[4, 16]")
    assert fit.metrics["sqnr_db"] > mean.metrics["sqnr_db"] + 2


def test_fit_is_exact_under_rotary_when_nothing_is_merged_away():
    """Merging 2 -> 1 heads whose K and V are identical loses nothing, with rotary, for fit."""
    model = build("llama")
    for layer in model.model.layers:
        att = layer.self_attn
        for proj in (att.k_proj, att.v_proj):
            with torch.no_grad():
                proj.weight[8:] = proj.weight[:8]
    result, rec = _gqa(model, "gqa(kv_heads=1,method=fit)")
    assert rec.verified and rec.metrics["max_rel_error"] < 1e-5


def test_kv_heads_that_do_not_divide(gpt_program):
    with pytest.raises(PassNotApplicable, match=r"site h\.0\.attn has 4 K/V heads, which 3 does not divide; valid kv_heads for it: 1, 2, 4"):
        evo_rewrite.rewrite(gpt_program, "gqa(kv_heads=3)")


def test_bad_options():
    assert evo_rewrite.parse_pipeline("gqa")[0].kv_heads == "auto"  # the default
    with pytest.raises(PipelineError, match=r"kv_heads must be auto or an integer >= 1"):
        evo_rewrite.parse_pipeline("gqa(kv_heads=0)")
    with pytest.raises(PipelineError, match=r"option kv_heads='many' is not valid"):
        evo_rewrite.parse_pipeline("gqa(kv_heads=many)")
    with pytest.raises(PipelineError, match=r"option method='median' is not valid; allowed: mean, fit"):
        evo_rewrite.parse_pipeline("gqa(kv_heads=2,method=median)")


def test_sites_it_cannot_group_are_reported():
    result, rec = _gqa(build("qwen3"), "gqa(kv_heads=1)")  # per-head RMSNorm on K (k_norm)
    assert rec.rewrites == 0 and len(rec.skipped) == 2
    assert all(s["reason"].startswith("K projection not found") for s in rec.skipped)
    _, rec = _gqa(torch.nn.Linear(4, 4), "gqa(kv_heads=1)", (torch.randn(2, 4),))
    assert rec.rewrites == 0 and rec.message == "no attention in the model"


def test_hf_checkpoint_output_reloads_with_fewer_kv_heads(tmp_path):
    import transformers
    build("llama").save_pretrained(tmp_path / "src")
    result = evo_rewrite.rewrite(str(tmp_path / "src"), "gqa(kv_heads=1,method=fit),flash")
    out = result.save_hf(tmp_path / "out")
    model = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager")
    assert model.config.num_key_value_heads == 1
    assert model.model.layers[0].self_attn.k_proj.weight.shape == (8, 32)
    inputs = result.program.second_inputs()
    with torch.no_grad():
        got = model(**inputs.kwargs, use_cache=False).logits
        ref = result.module(**inputs.kwargs)["logits"]
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    # the source directory is untouched and a second write to the same place is refused
    assert transformers.AutoConfig.from_pretrained(tmp_path / "src").num_key_value_heads == 2
    with pytest.raises(evo_rewrite.OutputError, match="already exists"):
        result.save_hf(tmp_path / "out")


@pytest.mark.parametrize("stored_as", ["embedding", "head"])
@pytest.mark.slow
def test_hf_checkpoint_of_a_tied_embedding_decoder(tmp_path, stored_as):
    """A causal LM whose LM head is tied to its embedding (SmolLM2, Llama 3.2): the program keeps the tied
    tensor under one name, and the checkpoint holds it under the name transformers expects. Both ways a
    tied checkpoint is stored: save_pretrained (the embedding), safetensors' save_model (the head)."""
    import transformers
    from safetensors.torch import save_model

    cls, config = hf_configs._config("llama")
    config.tie_word_embeddings = True
    torch.manual_seed(0)
    model = cls._from_config(config, attn_implementation="eager").eval()
    src = tmp_path / "src"
    if stored_as == "embedding":
        model.save_pretrained(src)
    else:
        config.architectures = [cls.__name__]
        config.save_pretrained(src)
        save_model(model, str(src / "model.safetensors"), metadata={"format": "pt"})
    result = evo_rewrite.rewrite(str(src), "gqa(kv_heads=1)", cache=True)
    out = result.save_hf(tmp_path / "out")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    assert reloaded.config.num_key_value_heads == 1 and reloaded.config.tie_word_embeddings
    assert reloaded.lm_head.weight.data_ptr() == reloaded.model.embed_tokens.weight.data_ptr()
    torch.testing.assert_close(reloaded.model.embed_tokens.weight, model.model.embed_tokens.weight)
    ids = torch.randint(3, hf_configs.VOCAB, (2, 7), generator=torch.Generator().manual_seed(3))
    grouped = evo_rewrite.rewrite(model, "gqa(kv_heads=1)").module
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids, use_cache=False).logits, grouped(input_ids=ids)["logits"],
                                   rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_hf_checkpoint_refused_when_not_expressible(tmp_path):
    build("bert").save_pretrained(tmp_path / "bert")
    result = evo_rewrite.rewrite(str(tmp_path / "bert"), "gqa(kv_heads=1)")
    with pytest.raises(evo_rewrite.UsageError, match="BertForMaskedLM's config has no num_key_value_heads"):
        result.save_hf(tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_cli_writes_hf_checkpoint_for_hf_source(tmp_path, capsys):
    import transformers

    from evo_rewrite.cli import main

    build("llama").save_pretrained(tmp_path / "src")
    out = tmp_path / "m.pt2"
    # written only when asked for: the .pt2 alone by default
    code = main([str(tmp_path / "src"), "--passes", "gqa(kv_heads=1)", "-o", str(out), "-q"])
    assert code == 0 and sorted(p.name for p in tmp_path.iterdir()) == ["m.pt2", "src"]
    out.unlink()
    code = main([str(tmp_path / "src"), "--passes", "gqa(kv_heads=1)", "-o", str(out), "--hf-output",
                 str(tmp_path / "m-hf"), "-q"])
    assert code == 0, capsys.readouterr().err
    assert f"wrote    {tmp_path / 'm-hf'}" in capsys.readouterr().out
    assert transformers.AutoConfig.from_pretrained(tmp_path / "m-hf").num_key_value_heads == 1
    # --target hf alone writes only the checkpoint
    code = main([str(tmp_path / "src"), "--passes", "gqa(kv_heads=1)", "--target", "hf", "-o", str(tmp_path / "h"), "-q"])
    assert code == 0 and (tmp_path / "h" / "config.json").is_file()
    # a second run refuses before doing any work, and writes nothing
    out.unlink()
    code = main([str(tmp_path / "src"), "--passes", "gqa(kv_heads=1)", "-o", str(out), "--hf-output",
                 str(tmp_path / "m-hf"), "-q"])
    assert code == 5 and "m-hf already exists" in capsys.readouterr().err and not out.exists()


def test_cli_calibration_file(tmp_path, capsys):
    from evo_rewrite.cli import main

    calib = tmp_path / "calib.pt"
    torch.save([{"input_ids": torch.randint(0, 256, (4, 16)), "attention_mask": torch.ones(4, 16, dtype=torch.long)}], calib)
    code = main(["evo_rewrite.zoo:encoder", "--passes", "gqa(kv_heads=2,method=fit)", "--calibration", str(calib),
                 "-o", str(tmp_path / "e.pt2"), "-q"])
    out = capsys.readouterr().out
    assert code == 0 and "calibration: 1 calibration batch(es): input_ids:int64[4, 16]" in out
    (tmp_path / "bad.pt").write_text("not a tensor file")
    code = main(["evo_rewrite.zoo:encoder", "--passes", "gqa(kv_heads=2,method=fit)", "--calibration", str(tmp_path / "bad.pt"),
                 "-o", str(tmp_path / "f.pt2"), "-q"])
    assert code == 2 and "--calibration" in capsys.readouterr().err and not (tmp_path / "f.pt2").exists()


def test_auto_is_the_default_and_chooses_the_fewest_heads_within_the_thresholds():
    """The product's own example: `gqa,flash` runs; with --min-cosine 0.975 on the zoo encoder 2 K/V heads
    pass and 1 does not, so auto keeps 2 and says what 1 would have cost."""
    model, inputs = zoo.encoder()
    result, rec = _gqa(model, "gqa,flash", inputs, thresholds=evo_rewrite.Thresholds(min_cosine=0.975))
    assert rec.spec == "gqa" and rec.rewrites == 4 and rec.verified
    assert rec.notes["kv_heads"].startswith("auto: 4 -> 2, the fewest K/V heads within cosine >= 0.975 on random tokens")
    assert rec.notes["next smaller"].startswith("1 K/V heads would cost cosine 0.9")
    assert "cosine 0.9" in rec.notes["next smaller"] and "< --min-cosine 0.975" in rec.notes["next smaller"]
    assert result.program.get_tensor("layers.0.key.weight").shape == (32, 64)
    assert result.report.passes[1].rewrites == 4  # flash fuses the grouped sites
    assert rec.metrics["cosine"] >= 0.975


def test_auto_loose_thresholds_go_to_one_head():
    model, inputs = zoo.gpt()
    _, rec = _gqa(model, "gqa", inputs, thresholds=evo_rewrite.Thresholds(min_cosine=0.5))
    assert rec.rewrites == 4 and rec.notes["kv_heads"].startswith("auto: 4 -> 1")
    assert rec.notes["next smaller"] == "none: 1 is the fewest count that divides the K/V heads"


def test_auto_with_no_grouping_within_the_default_thresholds_rewrites_nothing(gpt, gpt_program):
    model, _ = gpt
    result, rec = _gqa(gpt_program, "gqa")  # default for auto: cosine >= 0.99, which random-token GPT misses
    assert rec.rewrites == 0 and rec.verified
    assert rec.message.startswith("kv_heads=auto: no grouping stays within cosine >= 0.99 (the default for kv_heads=auto)")
    assert "the mildest, 2 K/V heads, gives cosine 0.9" in rec.message
    x = torch.randint(0, 256, (3, 9))
    torch.testing.assert_close(result.module(x), model(x))


def test_auto_measures_on_held_out_calibration(encoder_program):
    g = torch.Generator().manual_seed(5)
    calib = [dict(input_ids=torch.randint(0, 256, (2, 16), generator=g), attention_mask=torch.ones(2, 16, dtype=torch.long))
             for _ in range(4)]
    _, rec = _gqa(encoder_program.clone(), "gqa(method=fit)", calibration=calib,  # clone: calibration attaches to it
                  thresholds=evo_rewrite.Thresholds(min_cosine=0.5))
    assert rec.rewrites == 4 and "on 1 held-out calibration batch(es)" in rec.notes["kv_heads"]
    assert rec.measured_on.startswith("1 held-out calibration batch(es)")
    assert "measured on" not in rec.notes  # real data: no random-token warning
