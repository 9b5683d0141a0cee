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
