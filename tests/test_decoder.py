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


@pytest.mark.slow
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


@pytest.mark.slow
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


# ---- modules of your own that take a cache (the cache protocol) ------------------------------------------

from evo_rewrite import zoo  # noqa: E402


@pytest.fixture(scope="module")
def cached():
    model, _ = zoo.cached_llama()
    return model, D.capture_decoder(model)


def _own_greedy(model, ids, n):
    """The module's own greedy loop with its own cache: what generate must reproduce."""
    past, new, out = None, ids, [ids]
    with torch.no_grad():
        for _ in range(n):
            logits, past = model(new, past_key_values=past)
            new = logits[:, -1:].argmax(-1)
            out.append(new)
    return torch.cat(out, 1)


def _ids(batch=2, seq=6, seed=0, vocab=64):
    return torch.randint(3, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


def test_protocol_module_is_captured_with_its_cache(cached):
    model, program = cached
    layers = len(model.blocks)
    assert program.annotations.kv_cache == KVCacheLayout(tuple(LayerCache(4, 8, "float32") for _ in range(layers)))
    names = [n.name for n in program.placeholders()]
    assert names[:3] == ["input_ids", "attention_mask", "position_ids"]
    past = names[3:]
    assert len(past) == 2 * layers
    assert past == [f"past_key_values_{i}_{k}" for i in range(layers) for k in ("key", "value")]
    out = program(D.step_inputs(_ids(1, 4), torch.ones(1, 4, dtype=torch.long),
                                D.empty_past(program.annotations.kv_cache, 1, 0)))
    assert sorted(out) == ["logits"] + sorted(f"present.{i}.{k}" for i in range(layers) for k in ("key", "value"))
    assert out["present.1.key"].shape == (1, 4, 4, 8)
    # the program's weights keep the module's own names
    assert "blocks.0.attn.k.weight" in dict(program.module.named_parameters())


def test_protocol_logits_equal_the_module_at_prefill_and_three_decode_steps(cached):
    model, program = cached
    check = D.verify_decoder(program, model, _ids(), steps=3)
    assert [s["tokens"] for s in check.steps] == [6, 1, 1, 1]
    assert check.max_rel_error <= 1e-5
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[1, :2] = 0  # left padding reaches the module's own mask
    assert D.verify_decoder(program, model, _ids(), attention_mask=mask, steps=3).max_rel_error <= 1e-5
    # and the reference does see the mask: the padded row's logits differ from the unpadded run
    with torch.no_grad():
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        padded = model(_ids(), attention_mask=mask, position_ids=pos)[0]
    assert not torch.allclose(padded[1], model(_ids())[0][1])


def test_flash_fuses_every_site_of_a_protocol_module(cached):
    model, program = cached
    new, report = PassManager(parse_pipeline("flash")).run(program)
    rec = report.passes[0]
    assert rec.verified and rec.rewrites == len(model.blocks), rec.failure
    sdpa = [n for n in new.graph.nodes if n.op == "call_function"
            and n.target is torch.ops.aten.scaled_dot_product_attention.default]
    assert len(sdpa) == len(model.blocks)
    assert not [n for n in new.graph.nodes if n.op == "call_function" and n.target is torch.ops.aten.softmax.int]
    assert new.annotations.kv_cache == program.annotations.kv_cache
    assert D.verify_decoder(new, model, _ids(), steps=3).max_rel_error <= 1e-5


def test_gqa_then_flash_shrinks_a_protocol_modules_cache(cached):
    model, program = cached
    new, report = PassManager(parse_pipeline("gqa(kv_heads=2),flash")).run(program)
    assert [(r.spec, r.verified, r.rewrites) for r in report.passes] == [("gqa(kv_heads=2)", True, 2),
                                                                         ("flash", True, 2)]
    assert [c.kv_heads for c in new.annotations.kv_cache.layers] == [2, 2]
    assert new.annotations.kv_cache.bytes_per_token() * 2 == program.annotations.kv_cache.bytes_per_token()
    assert D.cache_layout(new) == new.annotations.kv_cache
    out = new(D.step_inputs(_ids(1, 3), torch.ones(1, 3, dtype=torch.long),
                            D.empty_past(new.annotations.kv_cache, 1, 0)))
    assert out["present.0.key"].shape == (1, 2, 3, 8)
    tokens = evo_rewrite.generate(new, _ids(2, 5, seed=4), max_new_tokens=4)  # runs with the smaller cache
    assert tokens.shape == (2, 9)


@pytest.mark.slow
def test_a_grouped_protocol_module_shrinks_to_one_head():
    model, _ = zoo.cached_llama(n_kv_head=2)
    result = evo_rewrite.rewrite(model, "gqa(kv_heads=1),flash", cache=True)  # no example inputs needed
    assert result.report.ok and [r.rewrites for r in result.report.passes] == [2, 2]
    assert [c.kv_heads for c in result.program.annotations.kv_cache.layers] == [1, 1]


@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_generate_reproduces_the_modules_own_greedy_loop(cached, cache):
    model, program = cached
    flash, _ = PassManager(parse_pipeline("flash")).run(program)
    prompt = _ids(2, 5, seed=3)
    ref = _own_greedy(model, prompt, 8)
    assert torch.equal(evo_rewrite.generate(flash, prompt, max_new_tokens=8, cache=cache), ref)


def test_generate_from_the_module(cached):
    model, _ = cached
    prompt = _ids(1, 4, seed=5)
    assert torch.equal(evo_rewrite.generate(model, prompt, max_new_tokens=6), _own_greedy(model, prompt, 6))


@pytest.mark.slow
def test_generate_from_a_pt2_of_a_protocol_module(cached, tmp_path):
    model, program = cached
    prompt = _ids(1, 4, seed=5)
    ref = _own_greedy(model, prompt, 6)
    path = tmp_path / "lm.pt2"
    evo_rewrite.write(program, path)
    assert evo_rewrite.load(path).program.annotations.kv_cache == program.annotations.kv_cache
    assert torch.equal(evo_rewrite.generate(path, prompt, max_new_tokens=6), ref)


class NoMaskLM(torch.nn.Module):
    """The protocol at its smallest: forward(input_ids, past_key_values=None), no mask or positions (no position
    embedding; a causal mask offset by the past length). With ``block``, a nanoGPT-style tril buffer of that size
    sliced by length: the lengths are then bounded, which a decoder program (lengths up to 65536) cannot be."""

    def __init__(self, vocab=32, d=16, heads=2, layers=2, block=None):
        super().__init__()
        self.heads, self.d, self.block = heads, d, block
        self.wte = torch.nn.Embedding(vocab, d)
        self.qkv = torch.nn.ModuleList([torch.nn.Linear(d, 3 * d) for _ in range(layers)])
        self.proj = torch.nn.ModuleList([torch.nn.Linear(d, d) for _ in range(layers)])
        self.head = torch.nn.Linear(d, vocab, bias=False)
        if block:
            self.register_buffer("tril", torch.tril(torch.ones(block, block, dtype=torch.bool)))

    def forward(self, input_ids, past_key_values=None):
        B, S = input_ids.shape
        P = past_key_values[0][0].shape[2] if past_key_values else 0
        x = self.wte(input_ids)
        dev = input_ids.device
        if self.block:
            causal = self.tril[P:P + S, :P + S]
        else:
            causal = torch.arange(P + S, device=dev)[None, :] <= torch.arange(P, P + S, device=dev)[:, None]
        presents = []
        for i, (qkv, proj) in enumerate(zip(self.qkv, self.proj)):
            q, k, v = (t.view(B, S, self.heads, -1).transpose(1, 2) for t in qkv(x).split(self.d, dim=2))
            if past_key_values:
                k, v = torch.cat([past_key_values[i][0], k], 2), torch.cat([past_key_values[i][1], v], 2)
            presents.append((k, v))
            att = (q @ k.transpose(-2, -1)) / (k.shape[-1] ** 0.5)
            att = att.masked_fill(~causal, float("-inf")).softmax(-1)
            x = x + proj((att @ v).transpose(1, 2).reshape(B, S, self.d))
        return self.head(x), presents


@pytest.mark.slow
def test_a_module_without_mask_or_positions_ignores_those_inputs():
    torch.manual_seed(0)
    model = NoMaskLM().eval()
    program = evo_rewrite.prepare(model, (_ids(vocab=32),), cache=True)
    assert D.is_decoder(program) and len(program.annotations.kv_cache.layers) == 2
    holders = {n.name: n for n in program.placeholders()}
    assert list(holders)[:3] == ["input_ids", "attention_mask", "position_ids"]  # the same four inputs
    assert not holders["attention_mask"].users and not holders["position_ids"].users  # ... which it ignores
    assert not D.reads_mask(program) and D.reads_mask(D.capture_decoder(zoo.cached_llama()[0]))
    assert D.verify_decoder(program, model, _ids(vocab=32), steps=3).max_rel_error <= 1e-5
    new, report = PassManager(parse_pipeline("flash")).run(program)
    assert report.passes[0].verified and report.passes[0].rewrites == 2
    prompt = _ids(2, 5, seed=2, vocab=32)
    assert torch.equal(evo_rewrite.generate(new, prompt, max_new_tokens=6), _own_greedy(model, prompt, 6))
    # the static cache hides unwritten slots with the mask this program ignores: refused, not silently wrong
    with pytest.raises(evo_rewrite.UsageError, match="cache='dynamic'"):
        evo_rewrite.generate(new, prompt, max_new_tokens=2, cache="static")
    with pytest.raises(evo_rewrite.UsageError, match="padding"):
        evo_rewrite.generate(new, prompt, max_new_tokens=2, attention_mask=torch.tensor([[0, 1, 1, 1, 1], [1] * 5]))


def test_a_module_that_bounds_its_lengths_says_so():
    torch.manual_seed(0)
    model = NoMaskLM(block=64).eval()
    with pytest.raises(evo_rewrite.CaptureError) as info:
        D.capture_decoder(model)
    msg = str(info.value)
    assert "\n" not in msg and "symbolic up to 65536" in msg and "--no-cache" in msg


def test_a_module_without_the_protocol_stays_cacheless_and_is_refused_a_cache():
    gpt, ex = zoo.gpt(n_layer=1)
    program = evo_rewrite.prepare(gpt, ex, cache=True)  # no past_key_values parameter: captured as usual
    assert program.annotations.kv_cache is None
    assert [n.name for n in program.placeholders()] == ["idx"]
    for ask in (lambda: D.capture_decoder(gpt), lambda: evo_rewrite.generate(gpt, ex[0], max_new_tokens=2)):
        with pytest.raises(UsageError) as info:
            ask()
        msg = str(info.value)
        assert "\n" not in msg and "is not one" in msg and "GPT" in msg
        assert "forward(input_ids, past_key_values=None" in msg  # names the protocol


class LogitsOnly(torch.nn.Module):
    """Declares past_key_values but returns logits alone: not the protocol."""

    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(16, 8)
        self.head = torch.nn.Linear(8, 16)

    def forward(self, input_ids, past_key_values=None):
        return self.head(self.emb(input_ids))


def test_a_module_that_declares_a_cache_but_departs_from_the_protocol():
    model = LogitsOnly().eval()
    ids = torch.randint(0, 16, (2, 5))
    logs = []
    program = evo_rewrite.prepare(model, (ids,), cache=True, log=logs.append)
    assert program.annotations.kv_cache is None  # captured without its cache, and the log says why
    assert any("does not follow the cache protocol" in m and "returned Tensor, not a pair" in m for m in logs)
    with pytest.raises(UsageError, match=r"^LogitsOnly does not follow the cache protocol: .*; or give example_inputs$"):
        evo_rewrite.prepare(model, cache=True)  # no example inputs for the cacheless forward either
    with pytest.raises(D.CacheProtocolError) as info:
        D.capture_decoder(model)
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith("LogitsOnly does not follow the cache protocol: forward(input_ids, "
                                              "past_key_values=None) returned Tensor, not a pair (logits, presents)")
    assert isinstance(info.value, UsageError) and "--no-cache" in msg


@pytest.mark.slow
def test_cli_factory_source_writes_a_decoder_pt2_that_generates(tmp_path):
    import subprocess
    import sys

    import real_models

    tok = real_models.minilm_dir()  # a tokenizer directory (WordPiece, 30522 ids)
    (tmp_path / "lm.py").write_text("from evo_rewrite import zoo\n\n\ndef lm():\n"
                                    "    return zoo.cached_llama(vocab_size=30522, n_layer=1)\n")
    out = tmp_path / "lm.pt2"
    cli = [sys.executable, "-m", "evo_rewrite.cli"]
    r = subprocess.run(cli + [f"{tmp_path / 'lm.py'}:lm", "--passes", "flash", "-q", "-o", str(out)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    program = evo_rewrite.load(out).program
    assert D.is_decoder(program) and len(program.annotations.kv_cache.layers) == 1
    r = subprocess.run(cli + [str(out), "-q", "-o", str(tmp_path / "again.pt2"), "--generate", "hello world",
                              "--max-new-tokens", "3", "--tokenizer", str(tok)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1].strip()  # the decoded continuation
    r = subprocess.run(cli + [f"{tmp_path / 'lm.py'}:lm", "-q", "-o", str(tmp_path / "x.pt2"), "--generate", "hi"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "--generate needs a tokenizer" in r.stderr and "--tokenizer DIR" in r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.slow
def test_genai_directory_from_a_protocol_module(cached, tmp_path):
    """--target genai from a module of your own: GroupQueryAttention per layer, tokens equal the PyTorch program's."""
    try:
        import onnxruntime_genai  # noqa: F401
    except ImportError:
        pytest.fail("needs onnxruntime-genai: pip install 'evo-rewrite[genai]'")
    model, program = cached
    flash, _ = PassManager(parse_pipeline("flash")).run(program)
    rep = evo_rewrite.write(flash, tmp_path / "lm", "genai")
    assert rep.group_query_attention == len(model.blocks)
    assert rep.check_tokens["genai"] == rep.check_tokens["pytorch"]


class EmptyPastDiffers(NoMaskLM):
    """Treats an empty past differently from None (adds 1 to the logits): departs from the protocol."""

    def forward(self, input_ids, past_key_values=None):
        logits, presents = super().forward(input_ids, past_key_values)
        return (logits + 1 if past_key_values is not None else logits), presents


def test_the_probe_checks_that_an_empty_past_is_a_prefill():
    torch.manual_seed(0)
    with pytest.raises(D.CacheProtocolError, match=r"prefill from an empty past \(P = 0\) gave other logits"):
        D.capture_decoder(EmptyPastDiffers().eval())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("compile", [False, True])
def test_cuda_generate_of_a_protocol_module_equals_its_own_loop(compile):
    """On CUDA the default cache is the preallocated one (mask over the unwritten tail), compiled on request."""
    model, _ = zoo.cached_llama()
    model = model.cuda()
    program, _ = PassManager(parse_pipeline("flash")).run(D.capture_decoder(model))
    prompt = _ids(2, 5, seed=3).cuda()
    ref = _own_greedy(model, prompt, 8)
    got = evo_rewrite.generate(program, prompt, max_new_tokens=8, device="cuda", cache="static", compile=compile)
    assert torch.equal(got, ref)


@pytest.mark.slow
def test_fit_on_a_decoder_takes_plain_token_batches_as_calibration(llama):
    """Calibration for a program with its cache: token batches (ids, mask) are taken as prefill steps (empty
    past, positions from the mask), as a user would give them for the cacheless program."""
    model, _ = llama
    batches = [{"input_ids": _prompt(seed=s), "attention_mask": torch.ones(2, 6, dtype=torch.long)} for s in range(4)]
    result = evo_rewrite.rewrite(model, "gqa(kv_heads=1,method=fit)", cache=True, calibration=batches)
    rec = result.report.passes[0]
    assert rec.verified and rec.rewrites == hf_configs.LAYERS, rec.failure
    assert {c.kv_heads for c in result.program.annotations.kv_cache.layers} == {1}
    with pytest.raises(UsageError, match="token_type_ids|input"):
        evo_rewrite.rewrite(model, "gqa(kv_heads=1,method=fit)", cache=True,
                            calibration=[{"input_ids": _prompt(), "token_type_ids": torch.zeros(2, 6, dtype=torch.long)}])
