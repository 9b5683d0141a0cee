"""evo_rewrite.generate: greedy tokens equal transformers' generate for exact pipelines (rewriter/generate.py);
the static cache's in-place step (rewriter/static_cache.py) writes the new slot only and copies no cache."""

from __future__ import annotations

import pytest
import torch

import hf_configs
import evo_rewrite
from evo_rewrite import UsageError
from evo_rewrite.generate import decoder_program, static_step
from evo_rewrite.static_cache import inplace_step

aten = torch.ops.aten

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


@pytest.mark.slow
def test_qwen2_module_in_tokens_out():
    model = hf_configs.build("qwen2")
    ids = _ids(1, 5, seed=3)
    ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW, do_sample=False)
    assert torch.equal(evo_rewrite.generate(model, ids, max_new_tokens=NEW), ref)


@pytest.mark.slow
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


# ---- the static cache: the in-place step ------------------------------------------------------------------

@pytest.fixture(scope="module")
def grouped(llama):
    """A lossy pipeline with fewer K/V heads (4 query heads over 1), attention fused."""
    _, program = llama
    result = evo_rewrite.rewrite(program, "gqa(kv_heads=1),flash")
    assert result.report.ok
    return result.program


def _padded_ids():
    ids = _ids()
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    return ids, mask


def _cache_reads(graph, kind):
    """Nodes of op ``kind`` with a cache input (a past_key_values_* placeholder) among their tensor arguments."""
    out = []
    for n in graph.nodes:
        if n.op == "call_function" and n.target is kind:
            flat = n.args[0] if isinstance(n.args[0], (list, tuple)) else [n.args[0]]
            if any(getattr(a, "op", None) == "placeholder" and a.name.startswith("past_key_values") for a in flat):
                out.append(n)
    return out


def test_inplace_step_copies_no_cache_and_leaves_the_program(llama):
    _, program = llama
    code = program.module.code
    step = inplace_step(program)
    writes = _cache_reads(step.module.graph, aten.index_copy_.default)
    assert len(writes) == 2 * hf_configs.LAYERS  # one write per layer and K/V
    assert _cache_reads(step.module.graph, aten.cat.default) == []  # the whole-cache copy is gone
    assert not [n for n in step.module.graph.nodes if n.target in (aten.detach_.default, aten.lift_fresh_copy.default)]
    # the program itself still appends with cat and is unchanged
    assert program.module.code == code
    assert len(_cache_reads(program.graph, aten.cat.default)) == 2 * hf_configs.LAYERS
    assert step.names == ("0.key", "0.value", "1.key", "1.value")
    assert set(step.heads.values()) == {program.annotations.kv_cache.layers[0].kv_heads}


def test_inplace_step_writes_exactly_the_new_slot(llama):
    """Prefill into buffer views, then one decode step into slot 9 of 16: only that slot changes, and it holds the
    present the program computes; the logits are the program's."""
    from evo_rewrite.decoder import PRESENT, empty_past, step_inputs

    _, program = llama
    step = inplace_step(program)
    ids, mask = _padded_ids()
    b, s = ids.shape
    bufs = step.allocate(b, 16, "cpu")
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        logits = step(ids, mask, pos, torch.arange(s), {k: v[:, :, :s] for k, v in bufs.items()})
        ref = program(step_inputs(ids, mask, empty_past(program.annotations.kv_cache, b, 0)))
        assert torch.equal(logits, ref["logits"])
        for k, buf in bufs.items():
            assert torch.equal(buf[:, :, :s], ref[f"{PRESENT}.{k}"])
            assert not buf[:, :, s:].any()
        # decode: the token goes to slot s + 2 (any slot works with one query: the mask says which are written)
        slot = s + 2
        tok = logits[:, -1].argmax(-1)[:, None]
        full = torch.zeros(b, 16, dtype=torch.long)
        full[:, :s] = mask
        full[:, slot] = 1
        before = {k: v.clone() for k, v in bufs.items()}
        got = step(tok, full, pos[:, -1:] + 1, torch.tensor([slot]), bufs)
        past = {k.removeprefix(f"{PRESENT}."): v for k, v in ref.items() if k.startswith(PRESENT)}
        ref2 = program(step_inputs(tok, torch.cat([mask, torch.ones_like(tok)], 1), past))
        torch.testing.assert_close(got, ref2["logits"], rtol=0, atol=1e-6)  # 16 keys, 8 of them masked: not bitwise
        for k, buf in bufs.items():
            changed = (buf != before[k]).flatten(3).any(-1).any(1).any(0).nonzero().flatten().tolist()
            assert changed == [slot]
            new = ref2[f"{PRESENT}.{k}"][:, :, -1]
            if k.startswith("0."):  # computed before any attention: bitwise
                assert torch.equal(buf[:, :, slot], new)
            torch.testing.assert_close(buf[:, :, slot], new, rtol=0, atol=1e-6)


def test_grouped_query_heads_fold_into_the_query_length(llama, grouped):
    """fold_groups (the CUDA default): each grouped SDPA becomes one SDPA without enable_gqa over Hkv heads with
    the G query heads of a group as G query rows; logits match the unfolded step at prefill and every decode step,
    and the cache is written identically. Not fired: without SDPA (the captured program) or when off."""
    on, off = inplace_step(grouped, fold_groups=True), inplace_step(grouped, fold_groups=False)
    assert on.folded == hf_configs.LAYERS and off.folded == 0
    sdpa = [n for n in on.module.graph.nodes if n.target is aten.scaled_dot_product_attention.default]
    assert len(sdpa) == hf_configs.LAYERS and not any(n.kwargs.get("enable_gqa") for n in sdpa)
    assert inplace_step(llama[1], fold_groups=True).folded == 0  # eager attention: no SDPA to fold
    ids, mask = _padded_ids()
    b, s = ids.shape
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    bufs = {"on": on.allocate(b, 12, "cpu"), "off": off.allocate(b, 12, "cpu")}
    full = torch.zeros(b, 12, dtype=torch.long)
    full[:, :s] = mask
    with torch.no_grad():
        got = {k: st(ids, mask, pos, torch.arange(s), {n: v[:, :, :s] for n, v in bufs[k].items()})
               for k, st in (("on", on), ("off", off))}
        for i in range(3):
            torch.testing.assert_close(got["on"], got["off"], rtol=0, atol=1e-6)
            tok = got["off"][:, -1].argmax(-1)[:, None]
            full[:, s + i] = 1
            got = {k: st(tok, full, pos[:, -1:] + 1 + i, torch.tensor([s + i]), bufs[k])
                   for k, st in (("on", on), ("off", off))}
    for n in on.names:
        torch.testing.assert_close(bufs["on"][n], bufs["off"][n], rtol=0, atol=1e-6)


@pytest.mark.parametrize("which", ["llama", "grouped"])
def test_static_equals_dynamic(llama, grouped, which):
    """Static (in-place) and dynamic caches give the same tokens, for the exact program and a gqa one."""
    program = llama[1] if which == "llama" else grouped
    ids, mask = _padded_ids()
    dyn = evo_rewrite.generate(program, ids, max_new_tokens=NEW, attention_mask=mask, cache="dynamic")
    sta = evo_rewrite.generate(program, ids, max_new_tokens=NEW, attention_mask=mask, cache="static")
    assert torch.equal(sta, dyn)
    if which == "grouped":
        assert set(static_step(program).step.heads.values()) == {1}  # the smaller cache, in place too
        ref = llama[0].generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False)
        assert not torch.equal(sta, ref)  # lossy: the check above is not vacuous


@pytest.mark.slow
def test_bf16_cache_is_stored_in_bf16(llama):
    """After bf16 every reader casts K/V to bf16: the cache is stored in bf16 (half the bytes), the casts are gone,
    and both paths give the same tokens."""
    _, program = llama
    result = evo_rewrite.rewrite(program, "flash,bf16")
    assert result.report.ok
    step = inplace_step(result.program)
    assert set(step.dtypes.values()) == {torch.bfloat16}
    assert step.bytes_per_token() * 2 == result.program.annotations.kv_cache.bytes_per_token()  # layout says fp32
    for w in _cache_reads(step.module.graph, aten.index_copy_.default):
        assert not [u for u in w.users if u.target is aten._to_copy.default]
    ids, mask = _padded_ids()
    dyn = evo_rewrite.generate(result, ids, max_new_tokens=NEW, attention_mask=mask, cache="dynamic")
    sta = evo_rewrite.generate(result, ids, max_new_tokens=NEW, attention_mask=mask, cache="static")
    assert torch.equal(sta, dyn)
    # the fp32 program keeps an fp32 cache (no reader casts it)
    assert set(inplace_step(program).dtypes.values()) == {torch.float32}


@pytest.mark.slow
def test_compiled_step_compiles_once_and_reuses_its_buffers(llama):
    """Under torch.compile (aot_eager: functionalized, as inductor sees it) the step is compiled once for every
    decode step and a second call; the buffers are kept (same addresses) and the tokens are transformers'."""
    from torch._dynamo.testing import CompileCounterWithBackend

    model, program = llama
    ids, mask = _padded_ids()
    ref = model.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False)
    counter = CompileCounterWithBackend("aot_eager")
    torch._dynamo.reset()
    got = evo_rewrite.generate(program, ids, max_new_tokens=NEW, attention_mask=mask, cache="static", compile=counter)
    state = static_step(program)
    ptrs = {k: v.data_ptr() for k, v in state.buffers.items()}
    again = evo_rewrite.generate(program, ids, max_new_tokens=NEW - 4, attention_mask=mask, cache="static",
                                 compile=counter)
    assert torch.equal(got, ref) and torch.equal(again, ref[:, :-4])
    assert counter.frame_count == 1  # no recompilation across steps or calls
    assert {k: v.data_ptr() for k, v in state.buffers.items()} == ptrs  # the shorter call reused the buffers
    assert all(v.shape[2] == 7 + NEW for v in state.buffers.values())


def test_static_cache_refusals(llama):
    model, program = llama
    cacheless = evo_rewrite.capture(model, evo_rewrite.Inputs((_ids(),), {}))
    with pytest.raises(UsageError, match=r"the static cache needs a decoder program .*: use cache='dynamic'"):
        inplace_step(cacheless)
    windowed = program.clone()
    windowed.source = type(program.source)(**{**vars(program.source),
                                              "hf_config": {**program.source.hf_config, "sliding_window": 12}})
    with pytest.raises(UsageError, match=r"cache='static' attends over the whole buffer, which needs prompt \+ "
                                         r"max_new_tokens \(17\) <= the model's sliding window \(12\); use "
                                         r"cache='dynamic'"):
        evo_rewrite.generate(windowed, _ids(), max_new_tokens=NEW, cache="static")
    assert evo_rewrite.generate(windowed, _ids(), max_new_tokens=5, cache="static").shape == (2, 12)
    with pytest.raises(UsageError, match=r"compile needs cache='static'"):
        evo_rewrite.generate(program, _ids(), max_new_tokens=2, cache="dynamic", compile=True)


@pytest.mark.slow
def test_inductor_step_on_cpu_equals_transformers(llama):
    """compile=True on CPU: inductor (C++), the step and its in-place writes compiled; tokens are transformers'."""
    model, program = llama
    ids, mask = _padded_ids()
    ref = model.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False)
    assert torch.equal(evo_rewrite.generate(program, ids, max_new_tokens=NEW, attention_mask=mask, compile=True,
                                            cache="static"), ref)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graphs_step_equals_dynamic_and_is_not_skipped():
    """On CUDA: compile=True (inductor, CUDA graphs) compiles the step once, CUDA graphs are not skipped (the
    mutated buffers are static inputs), and the tokens equal the dynamic path's and transformers' (and, for a
    grouped program whose attention the step folds, the dynamic path's)."""
    from torch._dynamo.utils import counters

    model = hf_configs.build("llama").cuda()
    program = decoder_program(model, device="cuda")
    ids, mask = (t.cuda() for t in _padded_ids())
    ref = model.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False)
    dyn = evo_rewrite.generate(program, ids, max_new_tokens=NEW, attention_mask=mask, cache="dynamic")
    torch._dynamo.reset()
    counters.clear()
    got = [evo_rewrite.generate(program, ids, max_new_tokens=NEW, attention_mask=mask, compile=True)
           for _ in range(2)]
    assert torch.equal(got[0], dyn) and torch.equal(got[1], dyn) and torch.equal(dyn, ref)
    assert counters["stats"]["unique_graphs"] == 1
    assert counters["inductor"]["cudagraph_skips"] == 0
    # a grouped program: on CUDA its SDPA sites are folded (fused kernel, no enable_gqa); tokens still the dynamic's
    grouped = evo_rewrite.rewrite(program, "gqa(kv_heads=1),flash").program
    dyn = evo_rewrite.generate(grouped, ids, max_new_tokens=NEW, attention_mask=mask, cache="dynamic")
    got = evo_rewrite.generate(grouped, ids, max_new_tokens=NEW, attention_mask=mask, compile=True)
    assert static_step(grouped).step.folded == hf_configs.LAYERS
    assert torch.equal(got, dyn)
