"""Issue 16 (real sizes): precision-aware verification, batch-dynamic capture, HF call conventions,
ONNX from bf16 programs."""

import pytest
import torch

import evo_rewrite
from evo_rewrite import zoo
from evo_rewrite.verify import TOLERANCE, program_float_dtype, shadow_program


@pytest.fixture(scope="module")
def deep_bf16_program():
    """A deep random GPT in bf16 with scaled weights: its own rounding error exceeds the fixed bf16 tolerance."""
    model, inputs = zoo.gpt(n_layer=16, d_model=64)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.dim() == 2 and "wte" not in n and "wpe" not in n:
                p.mul_(8.0)
    return evo_rewrite.prepare(model.to(torch.bfloat16), inputs)


@pytest.mark.slow
def test_flash_passes_on_deep_bf16_by_the_shadow(deep_bf16_program):
    _, report = evo_rewrite.PassManager(evo_rewrite.parse_pipeline("flash")).run(deep_bf16_program)
    rec = report.passes[0]
    assert rec.rewrites > 0
    # today's fixed check would have rolled it back ...
    assert rec.metrics["max_rel_error"] > TOLERANCE[torch.bfloat16]
    # ... but against the fp32 shadow it is no worse than the original
    assert rec.verified and not rec.rolled_back, rec.failure
    assert rec.metrics["error_vs_shadow"] <= 1.25 * rec.metrics["before_vs_shadow"] + 1e-2
    assert "float32 shadow" in rec.notes["verification"]


@pytest.mark.slow
def test_wrong_exact_pass_still_rolled_back_in_bf16(deep_bf16_program):
    _, report = evo_rewrite.PassManager(evo_rewrite.parse_pipeline("test-corrupt(factor=1.1)")).run(deep_bf16_program)
    rec = report.passes[0]
    assert rec.rolled_back and not rec.verified
    assert "higher-precision shadow" in rec.failure
    assert rec.metrics["error_vs_shadow"] > rec.metrics["before_vs_shadow"]


def test_shadow_leaves_the_program_alone(deep_bf16_program):
    before = {k: (v.dtype, v.data_ptr()) for k, v in deep_bf16_program.named_tensors().items()}
    sp, low, high = shadow_program(deep_bf16_program, share_weights=False)
    assert (low, high) == (torch.bfloat16, torch.float32)
    assert program_float_dtype(sp) == torch.float32
    assert {k: (v.dtype, v.data_ptr()) for k, v in deep_bf16_program.named_tensors().items()} == before
    out = sp(deep_bf16_program.inputs)
    assert out.dtype == torch.float32


def test_fp32_program_uses_fp64_shadow(gpt_program):
    _, report = evo_rewrite.PassManager(evo_rewrite.parse_pipeline("flash")).run(gpt_program)
    rec = report.passes[0]
    assert rec.verified and "float64 shadow" in rec.notes["verification"]
    assert rec.metrics["error_vs_shadow"] < 1e-4 and rec.metrics["before_vs_shadow"] < 1e-4


def test_fp64_program_falls_back_to_fixed_tolerance():
    model, inputs = zoo.gpt(n_layer=2)
    program = evo_rewrite.prepare(model.double(), inputs)
    _, report = evo_rewrite.PassManager(evo_rewrite.parse_pipeline("test-corrupt")).run(program)
    rec = report.passes[0]
    assert rec.rolled_back and "fixed tolerance" in rec.notes["verification"]
    assert "error_vs_shadow" not in rec.metrics


# --- 2. batch-1 examples stay batch-dynamic --------------------------------------------------------


@pytest.mark.slow
def test_batch_one_capture_stays_dynamic_and_runs_at_batch_three(tmp_path):
    model, _ = zoo.gpt(n_layer=2)
    ids = torch.randint(0, 256, (1, 16))
    result = evo_rewrite.rewrite(model, "flash", (ids,))
    program = result.program
    assert program.inputs.args[0].shape == (1, 16)  # the user's example stays the program's inputs
    assert set(program.dynamic_dims[0]) == {0, 1}  # batch and sequence symbolic
    second = program.second_inputs()
    assert second.args[0].shape[0] != 1 and second.args[0].shape[1] != 16
    assert result.report.verify_inputs[1].split("[")[1].split(",")[0] != "1"  # another batch was verified
    path = result.save(tmp_path / "gpt.pt2")
    loaded = evo_rewrite.load(path).program
    assert set(loaded.dynamic_dims[0]) == {0, 1}
    x3 = torch.randint(0, 256, (3, 9))
    with torch.no_grad():
        torch.testing.assert_close(loaded(evo_rewrite.Inputs((x3,), {})), model(x3), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(loaded(evo_rewrite.Inputs((ids,), {})), model(ids), atol=1e-4, rtol=1e-4)
    m = torch.export.load(str(path)).module()
    with torch.no_grad():
        assert m(x3).shape == (3, 9, 256)


# --- 3. Hugging Face call conventions --------------------------------------------------------------


@pytest.mark.slow
def test_hf_bert_pt2_positional_and_tokenizer_keywords(tmp_path):
    import hf_configs

    model = hf_configs.build("bert")
    result = evo_rewrite.rewrite(model, "flash")
    assert set(result.program.inputs.kwargs) == {"input_ids", "attention_mask", "token_type_ids"}
    path = result.save(tmp_path / "bert.pt2")
    ids = torch.randint(0, 128, (3, 10))
    mask = torch.ones(3, 10, dtype=torch.long)
    tt = torch.zeros(3, 10, dtype=torch.long)
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask, token_type_ids=tt).logits
        m = torch.export.load(str(path)).module()  # the tokenizer's output, by keyword
        got_kw = m(**{"input_ids": ids, "attention_mask": mask, "token_type_ids": tt})
        reloaded = evo_rewrite.load(path).program.module  # the original's positional order
        got_pos = reloaded(ids, mask, tt)
        got_pos2 = reloaded(ids, mask, token_type_ids=tt)
    for got in (got_pos, got_kw, got_pos2):
        torch.testing.assert_close(hf_configs.main_output(got), want, atol=1e-4, rtol=1e-4)


# --- 4. ONNX from a bf16 program -------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
@pytest.mark.slow
def test_bf16_program_exports_to_onnx(tmp_path, dtype):
    pytest.importorskip("onnxruntime")
    import numpy as np
    import onnx
    import onnxruntime as ort

    model, inputs = zoo.gpt(n_layer=2)
    program = evo_rewrite.prepare(model.to(torch.bfloat16), inputs)
    path = tmp_path / f"gpt-{dtype}.onnx"
    from evo_rewrite.targets.onnx import save_onnx

    save_onnx(program, path, dtype=dtype)  # checked in ONNX Runtime by emit
    m = onnx.load(str(path))
    want = onnx.TensorProto.FLOAT if dtype == "fp32" else onnx.TensorProto.FLOAT16
    assert {i.data_type for i in m.graph.initializer if i.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16,
                                                                           onnx.TensorProto.BFLOAT16)} == {want}
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = inputs[0].numpy()
    got = sess.run(None, {sess.get_inputs()[0].name: x})[0].astype(np.float32)
    with torch.no_grad():
        ref = program(program.inputs).float()
    rel = float(np.abs(got - ref.numpy()).max() / ref.abs().max())
    assert rel < 6e-2  # the bf16 program's own tolerance
