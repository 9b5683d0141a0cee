"""The genai target: an ONNX Runtime GenAI model directory, checked in onnxruntime_genai (targets/genai.py)."""

from __future__ import annotations

import json

import pytest
import torch

import hf_configs
import evo_rewrite
from evo_rewrite import SourceInfo, UsageError
from evo_rewrite import decoder as D

og = pytest.importorskip("onnxruntime_genai")


@pytest.fixture(scope="module")
def llama():
    model = hf_configs.build("llama")
    return model, D.capture_decoder(model, source=SourceInfo(kind="module", hf_config=model.config.to_dict()))


@pytest.mark.slow
def test_genai_directory_runs_in_onnxruntime_genai(llama, tmp_path):
    import onnx

    from evo_rewrite.targets.genai import genai_greedy

    model, program = llama
    out = tmp_path / "lm.genai"
    rep = evo_rewrite.write(program, out, "genai")
    assert sorted(p.name for p in out.iterdir()) == ["genai_config.json", "model.onnx", "model.onnx.data"]
    assert rep.group_query_attention == rep.attention_sites == hf_configs.LAYERS
    assert rep.check_tokens["genai"] == rep.check_tokens["pytorch"]  # the target's own check
    g = onnx.load(str(out / "model.onnx"), load_external_data=False).graph
    assert [i.name for i in g.input] == ["input_ids", "attention_mask", "position_ids"] + [
        f"past_key_values.{i}.{k}" for i in range(hf_configs.LAYERS) for k in ("key", "value")]
    assert [o.name for o in g.output] == ["logits"] + [
        f"present.{i}.{k}" for i in range(hf_configs.LAYERS) for k in ("key", "value")]
    cfg = json.loads((out / "genai_config.json").read_text())["model"]
    assert cfg["decoder"]["num_key_value_heads"] == 2 and cfg["decoder"]["num_hidden_layers"] == hf_configs.LAYERS
    # greedy tokens of onnxruntime_genai equal transformers' own generate
    ids = torch.randint(3, hf_configs.VOCAB, (1, 6), generator=torch.Generator().manual_seed(4))
    ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False)[0, 6:].tolist()
    got = genai_greedy(out, ids[0].tolist(), 8)
    assert got == ref[:len(got)] and len(got) >= 1


@pytest.mark.slow
def test_genai_after_gqa_has_the_smaller_cache(llama, tmp_path):
    _, program = llama
    result = evo_rewrite.rewrite(program, "gqa(kv_heads=1),flash")
    rep = result.write(tmp_path / "g.genai", "genai")
    cfg = json.loads((tmp_path / "g.genai" / "genai_config.json").read_text())["model"]["decoder"]
    assert cfg["num_key_value_heads"] == 1
    assert rep.check_tokens["genai"] == rep.check_tokens["pytorch"]


def test_genai_refuses_a_cacheless_program(tmp_path):
    model = hf_configs.build("llama")
    result = evo_rewrite.rewrite(model, "")
    with pytest.raises(UsageError, match=r"--target genai needs a causal language model with a KV cache"):
        result.write(tmp_path / "x", "genai")


# ---- the builder's graph form: rotary inside GQA, packed QKV / gate-up, shared buffer (targets/genai_graph.py) ----

def _llama16():
    """A tiny Llama whose head size (16) ONNX Runtime's GroupQueryAttention can rotate itself."""
    import transformers as T

    torch.manual_seed(0)
    cfg = T.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0,
                        bos_token_id=1, eos_token_id=2)
    return T.LlamaForCausalLM._from_config(cfg, attn_implementation="eager").eval()


@pytest.fixture(scope="module")
def llama16():
    model = _llama16()
    return model, D.capture_decoder(model, source=SourceInfo(kind="module", hf_config=model.config.to_dict()))


def _graph(out):
    import collections

    import onnx

    g = onnx.load(str(out / "model.onnx"), load_external_data=False).graph
    return g, collections.Counter(n.op_type for n in g.node), [n for n in g.node if n.op_type == "GroupQueryAttention"]


def _attr(node, name, default=0):
    import onnx

    return next((onnx.helper.get_attribute_value(a) for a in node.attribute if a.name == name), default)


@pytest.mark.slow
def test_genai_default_graph_is_the_builders_form(llama16, tmp_path):
    from evo_rewrite.targets.genai import genai_greedy

    model, program = llama16
    out = tmp_path / "lm.genai"
    rep = evo_rewrite.write(program, out, "genai")
    g, ops, gqa = _graph(out)
    layers = 2
    assert rep.rotary_inside == rep.packed_qkv == rep.packed_mlp == len(gqa) == layers and rep.share_buffer
    assert all(_attr(n, "do_rotary") == 1 and _attr(n, "rotary_interleaved") == 0 for n in gqa)
    assert all(n.input[1] == n.input[2] == "" for n in gqa)  # key/value: packed into query
    assert {n.input[7] for n in gqa} == {"cos_cache"} and {n.input[8] for n in gqa} == {"sin_cache"}  # one pair
    caches = {i.name: list(i.dims) for i in g.initializer if i.name in ("cos_cache", "sin_cache")}
    assert caches == {"cos_cache": [64, 8], "sin_cache": [64, 8]}  # (max_position_embeddings, head_size / 2)
    assert ops["RotaryEmbedding"] == ops["Reshape"] == ops["Transpose"] == 0
    assert ops["MatMul"] + ops.get("FusedMatMul", 0) == layers * 4 + 1  # qkv, o, gate|up, down; lm_head
    assert ops["Split"] == layers  # the packed gate/up projection
    assert "position_ids" not in [i.name for i in g.input]
    cfg = json.loads((out / "genai_config.json").read_text())
    assert "position_ids" not in cfg["model"]["decoder"]["inputs"] and cfg["search"]["past_present_share_buffer"]
    # greedy tokens, through the shared buffer and GQA's own rotary, equal transformers' generate
    ids = torch.randint(3, 128, (1, 7), generator=torch.Generator().manual_seed(4))
    ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, do_sample=False,
                         min_new_tokens=16)[0, 7:].tolist()
    assert genai_greedy(out, ids[0].tolist(), 16) == ref


@pytest.mark.parametrize("options, expect", [
    ("rotary=false", {"RotaryEmbedding": 4, "do_rotary": 0, "packed_qkv": 0, "Split": 2, "position_ids": True}),
    ("pack_qkv=false", {"RotaryEmbedding": 0, "do_rotary": 2, "packed_qkv": 0, "Split": 2, "position_ids": False}),
    ("pack_mlp=false", {"RotaryEmbedding": 0, "do_rotary": 2, "packed_qkv": 2, "Split": 0, "position_ids": False}),
    ("share_buffer=false", {"RotaryEmbedding": 0, "do_rotary": 2, "packed_qkv": 2, "Split": 2, "share": False,
                            "position_ids": False}),
])
@pytest.mark.slow
def test_genai_graph_options(llama16, tmp_path, options, expect):
    _, program = llama16
    out = tmp_path / "o.genai"
    rep = evo_rewrite.write(program, out, f"genai({options})")
    assert rep.check_tokens["genai"] == rep.check_tokens["pytorch"]  # greedy tokens equal the PyTorch program's
    g, ops, gqa = _graph(out)
    assert ops["RotaryEmbedding"] == expect["RotaryEmbedding"]
    assert sum(_attr(n, "do_rotary") for n in gqa) == expect["do_rotary"] == rep.rotary_inside
    assert rep.packed_qkv == expect["packed_qkv"] == sum(n.input[1] == "" for n in gqa)
    assert ops["Reshape"] == ops["Transpose"] == 0  # no layout ops around attention in any form
    assert ops.get("Split", 0) == expect["Split"] == rep.packed_mlp
    assert ("position_ids" in [i.name for i in g.input]) == expect["position_ids"]
    cfg = json.loads((out / "genai_config.json").read_text())
    assert cfg["search"]["past_present_share_buffer"] is expect.get("share", True) is rep.share_buffer
    assert ("position_ids" in cfg["model"]["decoder"]["inputs"]) == expect["position_ids"]


@pytest.mark.slow
def test_genai_head_size_gqa_cannot_rotate_keeps_rotary_outside(llama, tmp_path):
    _, program = llama  # head size 8: ORT's GroupQueryAttention rotates multiples of 16 only
    rep = evo_rewrite.write(program, tmp_path / "h8.genai", "genai")
    _, ops, gqa = _graph(tmp_path / "h8.genai")
    assert rep.rotary_inside == 0 and ops["RotaryEmbedding"] == 2 * hf_configs.LAYERS
    assert any("multiple of 16" in n for n in rep.notes)
    assert rep.check_tokens["genai"] == rep.check_tokens["pytorch"]


@pytest.mark.slow
def test_onnx_target_to_a_directory_writes_genai(llama16, tmp_path):
    _, program = llama16
    rep = evo_rewrite.write(program, tmp_path / "lm", "onnx")  # no .onnx: a GenAI directory
    assert rep.target == "genai" and (tmp_path / "lm" / "genai_config.json").is_file()
    with pytest.raises(UsageError, match=r"GenAI directory, which takes no onnx\(dtype=\.\.\.\) options"):
        evo_rewrite.write(program, tmp_path / "lm16", "onnx(dtype=fp16)")


@pytest.mark.slow
def test_cli_onnx_directory_vs_file(tmp_path, capsys):
    import onnx

    from evo_rewrite.cli import main

    src = tmp_path / "src"
    _llama16().save_pretrained(src)
    assert main([str(src), "--target", "onnx", "-o", str(tmp_path / "lm"), "-q"]) == 0
    assert sorted(p.name for p in (tmp_path / "lm").iterdir()) == ["genai_config.json", "model.onnx",
                                                                   "model.onnx.data"]
    g, ops, _ = _graph(tmp_path / "lm")
    assert ops["GroupQueryAttention"] == 2 and any(i.name.startswith("past_key_values") for i in g.input)
    # -o x.onnx: today's single cacheless file
    assert main([str(src), "--target", "onnx", "-o", str(tmp_path / "lm.onnx"), "-q"]) == 0
    single = onnx.load(str(tmp_path / "lm.onnx"), load_external_data=False).graph
    assert (tmp_path / "lm.onnx").is_file() and not any(i.name.startswith("past") for i in single.input)
    capsys.readouterr()
