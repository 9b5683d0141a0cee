"""Models as large as the machine: stored dtype kept, no second copy of the weights in verification, in the .pt2
check, in gqa's fit or in the ONNX export (weights cast as they stream). Tiny bf16 Llama checkpoints made by
examples/make_checkpoint.py; the figures at real size are in docs/benchmarks.md (examples/bench_scale.py)."""

import importlib.util
from pathlib import Path

import onnx
import pytest
import torch

import evo_rewrite
from evo_rewrite import OutputError, UsageError
from evo_rewrite.cli import main as cli_main
from evo_rewrite.targets.onnx import ORT_TOLERANCE, save_onnx
from evo_rewrite.targets.pytorch import load_sharing_weights
from evo_rewrite.verify import shadow_program, upcast_inputs

ROOT = Path(__file__).resolve().parents[1]


def _make_checkpoint():
    spec = importlib.util.spec_from_file_location("make_checkpoint", ROOT / "examples" / "make_checkpoint.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return _make_checkpoint().write_checkpoint(tmp_path_factory.mktemp("ckpt") / "llama-tiny", "tiny", seed=3)


@pytest.fixture(scope="module")
def bf16_program(ckpt):
    return evo_rewrite.prepare(str(ckpt))


def test_checkpoint_script_is_seeded_bf16_and_loads(ckpt, tmp_path):
    again = _make_checkpoint().write_checkpoint(tmp_path / "again", "tiny", seed=3)
    assert (again / "model.safetensors").read_bytes() == (ckpt / "model.safetensors").read_bytes()
    from safetensors import safe_open

    with safe_open(str(ckpt / "model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
        assert len(list(f.keys())) == 2 + 9 * 2 + 1  # embedding, lm head, 9 per layer, final norm


@pytest.mark.slow
def test_hf_checkpoint_loads_in_its_stored_dtype(bf16_program):
    weights = [t for t in bf16_program.named_tensors().values() if isinstance(t, torch.nn.Parameter)]
    assert weights and {t.dtype for t in weights} == {torch.bfloat16}


def test_shared_weight_shadow_holds_no_copy_and_matches_the_copying_one(bf16_program):
    sp, low, high = shadow_program(bf16_program)
    assert (low, high) == (torch.bfloat16, torch.float32)
    mine = bf16_program.named_tensors()
    theirs = sp.named_tensors()
    assert all(theirs[k].data_ptr() == mine[k].data_ptr() and theirs[k].dtype == torch.bfloat16
               for k in mine if mine[k].dtype == torch.bfloat16)
    # each weight is cast right before the node that reads it, never all together after the get_attrs
    casts = [n for n in sp.graph.nodes if n.op == "call_function" and n.target is torch.ops.aten._to_copy.default
             and n.args[0].op == "get_attr"]
    assert len(casts) >= sum(1 for t in mine.values() if t.dtype == torch.bfloat16)
    assert all(len(c.users) == 1 and c.next is next(iter(c.users)) for c in casts)
    copied, _, _ = shadow_program(bf16_program, share_weights=False)
    inputs = upcast_inputs(bf16_program.inputs, low, high)
    a, b = sp(inputs), copied(inputs)
    la = [t for t in torch.utils._pytree.tree_leaves(a) if isinstance(t, torch.Tensor)]
    lb = [t for t in torch.utils._pytree.tree_leaves(b) if isinstance(t, torch.Tensor)]
    assert la[0].dtype == torch.float32 and all(torch.equal(x, y) for x, y in zip(la, lb))


@pytest.mark.slow
def test_pt2_check_loads_with_the_programs_weights(bf16_program, tmp_path):
    result = evo_rewrite.rewrite(bf16_program, "flash")
    path = Path(result.save(tmp_path / "m.pt2"))
    mine = result.program.named_tensors()
    ep = load_sharing_weights(path, result.program)
    shared = sum(1 for k, v in ep.state_dict.items() if k in mine and v.data_ptr() == mine[k].data_ptr())
    assert shared == len(mine)
    inputs = result.program.inputs
    got = ep.module()(*inputs.args, **inputs.kwargs)
    ref = torch.export.load(str(path)).module()(*inputs.args, **inputs.kwargs)
    assert all(torch.equal(x, y) for x, y in zip(torch.utils._pytree.tree_leaves(got), torch.utils._pytree.tree_leaves(ref)))
    # a program whose weights are not the file's is caught
    other = result.program.clone()
    name = next(k for k, v in mine.items() if v.dtype == torch.bfloat16 and v.dim() == 2)
    other.set_tensor(name, mine[name].detach() + 1)
    with pytest.raises(OutputError, match=f"other values for weight {name}"):
        load_sharing_weights(path, other)


def test_gqa_fit_keeps_the_stored_dtype(bf16_program):
    calib = [bf16_program.inputs] * 2
    result = evo_rewrite.rewrite(bf16_program, "gqa(kv_heads=1,method=fit)", calibration=calib)
    rec = result.report.passes[0]
    assert rec.rewrites == 2 and rec.verified, rec.failure
    assert "2 of 2" in rec.notes["fitted sites"]
    tensors = result.program.named_tensors()
    k = tensors["model.layers.0.self_attn.k_proj.weight"]
    assert k.shape[0] == 32 and k.dtype == torch.bfloat16  # one K/V head of 32
    assert {t.dtype for t in tensors.values() if isinstance(t, torch.nn.Parameter)} == {torch.bfloat16}


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
@pytest.mark.slow
def test_bf16_program_exports_to_onnx_in_the_dtype_asked(ckpt, tmp_path, dtype):
    program = evo_rewrite.prepare(str(ckpt))  # no KV cache: the single-file ONNX target's forward
    out = tmp_path / f"m_{dtype}.onnx"
    report = save_onnx(program, out, dtype=dtype, external_data=True)
    assert report.checks and report.max_rel_error <= ORT_TOLERANCE[dtype]
    model = onnx.load(str(out), load_external_data=False)
    want = onnx.TensorProto.FLOAT if dtype == "fp32" else onnx.TensorProto.FLOAT16
    floating = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16}
    external = [i for i in model.graph.initializer if i.data_location == onnx.TensorProto.EXTERNAL]
    assert len(external) == 2 + 7 * 2  # embedding, lm head, 7 projections per layer
    assert {i.data_type for i in model.graph.initializer if i.data_type in floating} == {want}
    # inputs and outputs keep their types (fp16 converts inside the graph)
    assert model.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    weights = sum(t.numel() for t in program.named_tensors().values() if t.dtype == torch.bfloat16 and t.dim() == 2)
    data = Path(str(out) + ".data").stat().st_size
    item = 4 if dtype == "fp32" else 2
    assert weights * item <= data <= weights * item + len(external) * 4096


@pytest.mark.slow
def test_program_made_bf16_by_the_pass_is_still_refused(gpt_program, tmp_path):
    result = evo_rewrite.rewrite(gpt_program, "bf16")
    assert result.report.ok
    with pytest.raises(UsageError, match=r"holds bfloat16 weights \(bf16\).*onnx\(dtype=fp16\)"):
        save_onnx(result.program, tmp_path / "a.onnx")
    assert not list(tmp_path.iterdir())


@pytest.mark.slow
def test_cli_writes_only_the_output_asked_for_and_runs_twice(ckpt, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for _ in range(2):
        assert cli_main([str(ckpt), "--passes", "flash", "-o", "out.pt2", "-q"]) == 0
        assert sorted(p.name for p in tmp_path.iterdir()) == ["out.pt2"]
