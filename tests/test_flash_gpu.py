"""GPU: backend choice and bf16 numerics of `flash` (skipped without CUDA; run on an H200 by hand)."""

import pytest
import torch

import evo_rewrite
from evo_rewrite import zoo

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
PINNED = {torch.ops.aten._scaled_dot_product_cudnn_attention.default: "cudnn",
          torch.ops.aten._scaled_dot_product_flash_attention.default: "flash",
          torch.ops.aten._scaled_dot_product_efficient_attention.default: "efficient"}


def _gpt_bf16():
    model, (ids,) = zoo.gpt(n_layer=2, d_model=256, n_head=2)  # head dim 128
    return model.to("cuda", torch.bfloat16), ids.cuda()


def test_auto_backend_is_measured_pinned_and_reported():
    model, ids = _gpt_bf16()
    result = evo_rewrite.rewrite(model, "flash", example_inputs=(ids,), device="cuda")
    rec = result.report.passes[0]
    assert rec.verified and rec.rewrites == 2, rec.failure
    per_site = rec.notes["backend_per_site"]
    assert set(per_site) == {"h.0.attn", "h.1.attn"}
    pinned = [PINNED[n.target] for n in result.program.graph.nodes if n.target in PINNED]
    chosen = [b for b in per_site.values() if b != "default"]
    assert sorted(pinned) == sorted(chosen)
    m = next(iter(rec.notes["backend_measurements"].values()))
    # the fastest candidate, or PyTorch's dispatcher when no pinned backend beats it by 3%
    best = min(m["ms"], key=m["ms"].get)
    assert m["chosen"] == best or (m["chosen"] == "default" and m["ms"][best] > 0.97 * m["ms"]["default"])
    x = torch.randint(0, 256, (3, 45), device="cuda")
    with torch.no_grad():
        ref, got = model(x).float(), result.module(x).float()
    assert (ref - got).abs().max() / ref.abs().max() < 3e-2


def test_explicit_backend_and_pt2_round_trip(tmp_path):
    model, ids = _gpt_bf16()
    result = evo_rewrite.rewrite(model, "flash(backend=flash)", example_inputs=(ids,), device="cuda")
    assert result.report.ok
    assert sum(1 for n in result.program.graph.nodes if PINNED.get(n.target) == "flash") == 2
    path = result.save(tmp_path / "g.pt2")
    # the .pt2 holds portable SDPA (the flash op cannot be serialized) and records the choice ...
    ep = torch.export.load(path)
    assert sum(1 for n in ep.graph.nodes if n.target is torch.ops.aten.scaled_dot_product_attention.default) == 2
    # ... which loading it on CUDA pins again
    loaded = evo_rewrite.load(path, device="cuda")
    assert sum(1 for n in loaded.program.graph.nodes if PINNED.get(n.target) == "flash") == 2
    x = torch.randint(0, 256, (3, 45), device="cuda")
    with torch.no_grad():
        ref, got = model(x).float(), loaded.program.module(x).float()
    assert (ref - got).abs().max() / ref.abs().max() < 3e-2


def test_backend_that_cannot_take_a_mask_is_refused():
    from attention_spellings import PaddedEncoder

    model = PaddedEncoder().to("cuda", torch.bfloat16).eval()
    x = torch.randn(2, 16, 32, device="cuda", dtype=torch.bfloat16)
    mask = torch.ones(2, 16, dtype=torch.long, device="cuda")
    with pytest.raises(evo_rewrite.PassNotApplicable, match=r"flash\(backend=flash\) cannot serve site .*attention mask"):
        evo_rewrite.rewrite(model, "flash(backend=flash)", example_inputs=(x, mask), device="cuda")


def test_bf16_hf_llama_flash_matches():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=2,
                                   num_key_value_heads=1, vocab_size=128, attn_implementation="eager", use_cache=False)
    model = transformers.LlamaForCausalLM(cfg).to("cuda", torch.bfloat16).eval()
    result = evo_rewrite.rewrite(model, "flash", device="cuda")
    rec = result.report.passes[0]
    assert rec.verified and rec.rewrites == 2, rec.failure
    assert rec.metrics["max_rel_error"] < 3e-2


def test_llama_padding_mask_runs_causal_when_unpadded_and_round_trips(tmp_path):
    """A HF Llama's mask depends on attention_mask: on CUDA the sites choose per call (is_causal without padding),
    outputs equal the original with and without padding, and a reloaded .pt2 chooses the same way."""
    import hf_configs
    from evo_rewrite import sdpa

    model = hf_configs.build("llama").to("cuda", torch.bfloat16).eval()
    ids = torch.randint(0, 64, (2, 16), device="cuda")
    result = evo_rewrite.rewrite(model, "flash", example_inputs={"input_ids": ids, "attention_mask": torch.ones_like(ids)},
                                 device="cuda")
    rec = result.report.passes[0]
    assert rec.verified and rec.notes["causal when unpadded"] == 2, rec.failure
    assert set(rec.notes["backend_per_site"].values()) == {sdpa.CAUSAL_IF_UNPADDED}
    path = result.save(tmp_path / "l.pt2")
    loaded = evo_rewrite.load(path, device="cuda")
    for module in (result.module, loaded.program.module):
        assert sum(1 for n in module.graph.nodes if n.target is sdpa.sdpa_causal_if_unpadded) == 2
        x = torch.randint(0, 64, (3, 21), device="cuda")
        for mask in (torch.ones_like(x), torch.ones_like(x).index_fill_(1, torch.tensor([0, 1], device="cuda"), 0)):
            with torch.no_grad():
                ref = model(input_ids=x, attention_mask=mask).logits.float()
                got = module(input_ids=x, attention_mask=mask)["logits"].float()
            keep = mask.bool()
            assert (ref[keep] - got[keep]).abs().max() / ref.abs().max() < 3e-2
