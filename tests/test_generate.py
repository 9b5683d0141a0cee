"""evo_rewrite.generate: greedy tokens equal transformers' generate for exact pipelines (rewriter/generate.py)."""

from __future__ import annotations

import pytest
import torch

import hf_configs
import evo_rewrite
from evo_rewrite import UsageError
from evo_rewrite.generate import decoder_program

NEW = 10


def _ids(batch=2, seq=7, seed=0):
    return torch.randint(3, hf_configs.VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def llama():
    model = hf_configs.build("llama")
    return model, decoder_program(model)


@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_greedy_equals_transformers(llama, cache):
    model, program = llama
    ids = _ids()
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding in the second row
    for m in (None, mask):
        ref = model.generate(ids, attention_mask=torch.ones_like(ids) if m is None else m, max_new_tokens=NEW,
                             do_sample=False)
        got = evo_rewrite.generate(program, ids, max_new_tokens=NEW, attention_mask=m, cache=cache)
        assert got.shape == (2, 7 + NEW)
        assert torch.equal(got, ref)


def test_qwen2_module_in_tokens_out():
    model = hf_configs.build("qwen2")
    ids = _ids(1, 5, seed=3)
    ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW, do_sample=False)
    assert torch.equal(evo_rewrite.generate(model, ids, max_new_tokens=NEW), ref)


def test_pt2_round_trip_after_flash_reproduces_transformers(llama, tmp_path):
    model, program = llama
    result = evo_rewrite.rewrite(program, "flash")
    assert result.report.ok and result.report.passes[0].rewrites == hf_configs.LAYERS
    path = tmp_path / "lm.pt2"
    result.save(path)
    ids = _ids(seed=5)
    ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW, do_sample=False)
    assert torch.equal(evo_rewrite.generate(str(path), ids, max_new_tokens=NEW), ref)


def test_gqa_program_generates_with_the_smaller_cache(llama):
    _, program = llama
    result = evo_rewrite.rewrite(program, "gqa(kv_heads=1)")
    layout = result.program.annotations.kv_cache
    assert [c.kv_heads for c in layout.layers] == [1, 1]
    got = evo_rewrite.generate(result, _ids(), max_new_tokens=NEW)
    assert got.shape == (2, 7 + NEW)


def test_eos_stops_and_pads(llama):
    _, program = llama
    ids = _ids(1, 7)
    first = evo_rewrite.generate(program, ids, max_new_tokens=3)
    eos = int(first[0, 7])
    got = evo_rewrite.generate(program, ids, max_new_tokens=NEW, eos_token_id=eos)
    assert got.shape == (1, 8) and int(got[0, -1]) == eos


def test_sampling_is_seeded(llama):
    _, program = llama
    a = evo_rewrite.generate(program, _ids(), max_new_tokens=6, do_sample=True, temperature=0.7, top_p=0.9, seed=1)
    b = evo_rewrite.generate(program, _ids(), max_new_tokens=6, do_sample=True, temperature=0.7, top_p=0.9, seed=1)
    assert torch.equal(a, b)


def test_bad_requests_say_what_qualifies(llama):
    _, program = llama
    with pytest.raises(UsageError, match=r"generate needs a causal language model with a KV cache, and "
                                         r"BertForMaskedLM is not one"):
        evo_rewrite.generate(hf_configs.build("bert"), _ids(), max_new_tokens=2)
    with pytest.raises(UsageError, match="max_new_tokens must be >= 1, got 0"):
        evo_rewrite.generate(program, _ids(), max_new_tokens=0)
    with pytest.raises(UsageError, match=r"top_p must lie in \(0, 1\], got 1.5"):
        evo_rewrite.generate(program, _ids(), max_new_tokens=2, top_p=1.5)
