"""Decoder programs: a causal LM captured with its KV cache in the graph (rewriter/decoder.py).

What the capture promises: GenAI's input/output names, one program for prefill (past 0) and decode
(new 1), the cache layout as an annotation that matches the graph, logits equal to transformers'
with its DynamicCache at every step; passes keep the layout true (flash leaves it, gqa shrinks it);
a .pt2 keeps it and runs prefill and decode after reloading.
"""

from __future__ import annotations

import pytest
import torch

import hf_configs
import evo_rewrite
from evo_rewrite import PassManager, UsageError, parse_pipeline
from evo_rewrite import decoder as D
from evo_rewrite.annotations import KVCacheLayout, LayerCache

ARCHS = ["llama", "qwen2", "mistral"]


@pytest.fixture(scope="module")
def llama():
    model = hf_configs.build("llama")
    return model, D.capture_decoder(model)


def _prompt(batch=2, seq=6, seed=0):
    return torch.randint(3, hf_configs.VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("arch", ARCHS)
def test_capture_matches_dynamic_cache_at_every_step(arch):
    model = hf_configs.build(arch)
    program = D.capture_decoder(model)
    cfg = model.config
    kv = cfg.num_key_value_heads
    assert program.annotations.kv_cache == KVCacheLayout(
        tuple(LayerCache(kv, hf_configs.HEAD_DIM, "float32") for _ in range(hf_configs.LAYERS)))
    names = [n.name for n in program.placeholders()]
    assert names[:3] == ["input_ids", "attention_mask", "position_ids"]
    assert names[3:] == [f"past_key_values_{i}_{k}" for i in range(hf_configs.LAYERS) for k in ("key", "value")]
    check = D.verify_decoder(program, model, _prompt(), steps=3)
    assert [s["tokens"] for s in check.steps] == [6, 1, 1, 1]
    assert check.max_rel_error <= 1e-5
    assert all(s["top1_agreement"] == 1.0 for s in check.steps)


def test_prefill_and_decode_are_one_program(llama):
    _, program = llama
    layout = program.annotations.kv_cache
    prefill = D.step_inputs(_prompt(1, 4), torch.ones(1, 4, dtype=torch.long), D.empty_past(layout, 1, 0))
    out = program(prefill)
    assert out["logits"].shape == (1, 4, hf_configs.VOCAB)
    assert sorted(out) == ["logits"] + sorted(f"present.{i}.{k}" for i in range(2) for k in ("key", "value"))
    assert out["present.0.key"].shape == (1, 2, 4, hf_configs.HEAD_DIM)
    past = {k.removeprefix("present."): v for k, v in out.items() if k != "logits"}
    step = program(D.step_inputs(torch.tensor([[7]]), torch.ones(1, 5, dtype=torch.long), past))
    assert step["logits"].shape == (1, 1, hf_configs.VOCAB)
    assert step["present.1.value"].shape == (1, 2, 5, hf_configs.HEAD_DIM)


def test_left_padding_matches_transformers(llama):
    model, program = llama
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[1, :2] = 0
    check = D.verify_decoder(program, model, _prompt(), attention_mask=mask, steps=2)
    assert check.max_rel_error <= 1e-5


def test_flash_fuses_attention_over_past_and_new_keys(llama):
    model, program = llama
    new, report = PassManager(parse_pipeline("flash")).run(program)
    rec = report.passes[0]
    assert rec.verified and rec.rewrites == hf_configs.LAYERS
    sdpa = [n for n in new.graph.nodes if n.op == "call_function"
            and n.target is torch.ops.aten.scaled_dot_product_attention.default]
    assert len(sdpa) == hf_configs.LAYERS
    assert new.annotations.kv_cache == program.annotations.kv_cache
    assert D.verify_decoder(new, model, _prompt(), steps=3).max_rel_error <= 1e-5


def test_gqa_shrinks_the_cache(llama):
    model, program = llama
    new, report = PassManager(parse_pipeline("gqa(kv_heads=1)")).run(program)
    rec = report.passes[0]
    assert rec.verified and rec.rewrites == hf_configs.LAYERS
    assert [c.kv_heads for c in new.annotations.kv_cache.layers] == [1, 1]
    assert new.annotations.kv_cache.bytes_per_token() * 2 == program.annotations.kv_cache.bytes_per_token()
    assert D.cache_layout(new) == new.annotations.kv_cache  # the example past follows the annotation
    out = new(D.step_inputs(_prompt(1, 3), torch.ones(1, 3, dtype=torch.long),
                            D.empty_past(new.annotations.kv_cache, 1, 0)))
    assert out["present.0.key"].shape == (1, 1, 3, hf_configs.HEAD_DIM)
    # lossy, so judged by agreement, not equality: it still runs step by step with its own cache
    check = D.verify_decoder(new, model, _prompt(), steps=2, tolerance=10.0)
    assert len(check.steps) == 3


def test_pt2_keeps_the_cache_and_runs_prefill_after_reload(llama, tmp_path):
    import evo_rewrite

    _, program = llama
    path = tmp_path / "lm.pt2"
    evo_rewrite.write(program, path)
    loaded = evo_rewrite.load(path).program
    assert loaded.annotations.kv_cache == program.annotations.kv_cache
    mod = torch.export.load(str(path)).module()  # with export's guards: batch 1 and past 0 are in range
    layout = program.annotations.kv_cache
    prefill = D.step_inputs(_prompt(1, 1), torch.ones(1, 1, dtype=torch.long), D.empty_past(layout, 1, 0))
    torch.testing.assert_close(mod(**prefill.kwargs)["logits"], program(prefill)["logits"])


def test_not_a_causal_lm_is_refused():
    with pytest.raises(UsageError, match=r"needs a causal language model with a KV cache, and BertForMaskedLM is "
                                         r"not one: Hugging Face \*ForCausalLM"):
        D.capture_decoder(hf_configs.build("bert"))


def test_gqa_on_a_multi_head_decoder_keeps_the_grouped_cache_as_output():
    """MHA source (no repeat to resize): gqa inserts the repeat for attention only; present K/V stay grouped."""
    import transformers as T

    from evo_rewrite.decoder import empty_past, step_inputs

    cfg = T.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=4, vocab_size=128, attn_implementation="eager")
    torch.manual_seed(0)
    model = T.LlamaForCausalLM(cfg).eval()
    program = evo_rewrite.prepare(model, cache=True)
    new, report = PassManager(parse_pipeline("gqa(kv_heads=2)")).run(program)
    rec = report.passes[0]
    assert rec.verified and rec.rewrites == 2, rec.failure
    assert [c.kv_heads for c in new.annotations.kv_cache.layers] == [2, 2]
    out = new(step_inputs(torch.randint(0, 128, (1, 3)), torch.ones(1, 3, dtype=torch.long),
                          empty_past(new.annotations.kv_cache, 1, 0)))
    assert out["present.0.key"].shape == (1, 2, 3, 16) and out["present.1.value"].shape == (1, 2, 3, 16)
