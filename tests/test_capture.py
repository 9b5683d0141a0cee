import importlib

import pytest
import torch

import evo_rewrite
from evo_rewrite import zoo


def _symbolic(program):
    return [d for d in program.dynamic_dims if d]


def test_gpt_capture_is_dynamic_and_unlifted(gpt_program):
    p = gpt_program
    # batch and sequence stay symbolic
    assert _symbolic(p) and set(p.dynamic_dims[0]) == {0, 1}
    # weights are get_attr nodes named by module path
    targets = {n.target for n in p.graph.nodes if n.op == "get_attr"}
    assert "h.0.attn.c_attn.weight" in targets and "h.3.mlp.c_proj.bias" in targets
    # every compute node carries module provenance
    softmaxes = [n for n in p.graph.nodes if n.op == "call_function" and "softmax" in str(n.target)]
    assert [evo_rewrite.module_path(n) for n in softmaxes] == [f"h.{i}.attn" for i in range(4)]


def test_gpt_runs_at_other_sizes():
    model, (ids,) = zoo.gpt()
    program = evo_rewrite.prepare(model, (ids,))
    for shape in [(1, 5), (3, 16), (4, 40)]:
        x = torch.randint(0, 256, shape)
        torch.testing.assert_close(program.module(x), model(x))


def test_encoder_capture_with_padding_mask(encoder_program):
    p = encoder_program
    second = p.second_inputs()
    b, s = second.kwargs["input_ids"].shape
    assert (b, s) != tuple(p.inputs.kwargs["input_ids"].shape)
    model, _ = zoo.encoder()
    torch.testing.assert_close(p.module(**second.kwargs), model(**second.kwargs))
    # the second input pads part of the last row, so the padding path is exercised
    assert second.kwargs["attention_mask"][-1].min() == 0


class _Lin(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(8, 8)

    def forward(self, x):
        return self.lin(x).relu()


def test_capture_falls_back_to_symbolic_trace(monkeypatch):
    """When torch.export fails on the module itself, capture exports its symbolic_trace graph."""
    cap = importlib.import_module("evo_rewrite.graph_capture")

    real = cap._export
    calls = []

    def flaky(model, inputs, dims_of, *rest):
        calls.append(isinstance(model, torch.fx.GraphModule))
        if not isinstance(model, torch.fx.GraphModule):
            raise RuntimeError("export does not like this module")
        return real(model, inputs, dims_of, *rest)

    monkeypatch.setattr(cap, "_export", flaky)
    m = _Lin()
    logs = []
    p = evo_rewrite.prepare(m, (torch.randn(2, 5, 8),), log=logs.append)
    assert calls == [False, True]  # the module, then its symbolic_trace graph
    assert any("retrying on a torch.fx.symbolic_trace graph" in line for line in logs)
    torch.testing.assert_close(p.module(torch.ones(3, 7, 8)), m(torch.ones(3, 7, 8)))


class _Inner(torch.nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # data-dependent branch: neither export nor symbolic_trace can capture it
            return x * 2
        return x


class _Outer(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.block = torch.nn.Sequential(torch.nn.Linear(4, 4), _Inner())

    def forward(self, x):
        return self.block(x)


def test_uncapturable_model_names_module_and_line():
    with pytest.raises(evo_rewrite.CaptureError, match=r"cannot capture _Outer: torch\.export failed in module 'block\.1' at test_capture\.py:\d+: if x\.sum\(\) > 0"):
        evo_rewrite.prepare(_Outer(), (torch.randn(2, 3, 4),))


def test_clone_shares_weights_but_not_graph(gpt_program):
    c = gpt_program.clone()
    assert c.graph is not gpt_program.graph
    assert c.get_tensor("h.0.attn.c_attn.weight") is gpt_program.get_tensor("h.0.attn.c_attn.weight")
    c.set_tensor("h.0.attn.c_attn.weight", torch.zeros(1))
    assert gpt_program.get_tensor("h.0.attn.c_attn.weight").shape != (1,)


def test_figures_count_tied_weights_once(gpt_program):
    f = evo_rewrite.figures(gpt_program)
    model, _ = zoo.gpt()
    assert f.parameters == sum(p.numel() for p in model.parameters())  # parameters() dedups the tied head
    assert f.attention_sites == 4
    # K and V, 4 heads x 16 dims, fp32, 4 layers
    assert f.kv_cache_bytes_per_token == 4 * 2 * 4 * 16 * 4


def test_capture_leaves_the_users_model_as_it_was():
    from hf_configs import build

    model = build("llama")
    model.train()
    assert model.config.use_cache is True
    evo_rewrite.prepare(model, None)
    assert model.config.use_cache is True and model.training  # restored after capture


@pytest.mark.parametrize("source", ["zoo", "hf"])
def test_program_runs_under_autocast(source):
    # zoo.llama's RMSNorm converts to fp32 and back (``.to(x.dtype)``); export records each conversion
    # with an assert of the dtype seen at capture, which torch.autocast's bf16 matmuls would fail
    # (HF's rotary embedding runs in a no-autocast, no-grad region: torch 2.11 exports it as a higher-order op
    # whose body is a submodule)
    if source == "zoo":
        model, (ids,) = zoo.llama(n_layer=2)
    else:
        import hf_configs
        model, ids = hf_configs.build("llama"), torch.randint(0, 64, (2, 12))
    model.eval()
    program = evo_rewrite.prepare(model, (ids,))
    asserts = [n for m in program.module.modules() if isinstance(m, torch.fx.GraphModule) for n in m.graph.nodes
               if n.target is torch.ops.aten._assert_tensor_metadata.default]
    assert asserts == []
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        got = program.module(ids)
        want = model(ids)
    got = got["logits"] if isinstance(got, dict) else got[0] if isinstance(got, (tuple, list)) else got
    want = want[0] if isinstance(want, (tuple, list)) else getattr(want, "logits", want)
    assert got.dtype == want.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want.float(), atol=0.05, rtol=0.05)


def test_labels_with_ignore_index_verify_at_the_second_size():
    # next-token labels end in -100 (ignored): the second verification size must keep -100 a sentinel,
    # not draw ids in [-100, vocab), which cross_entropy rejects
    from evo_rewrite.inputs import like

    model, (ids,) = zoo.llama(n_layer=2)
    labels = torch.cat((ids[:, 1:], torch.full((ids.shape[0], 1), -100)), 1)
    drawn = like(labels, (3, 40), seed=1)
    assert drawn.shape == (3, 40) and set(drawn[drawn < 0].tolist()) <= {-100} and int(drawn.max()) < 64
    assert 0 < int((drawn == -100).sum()) < drawn.numel()
    result = evo_rewrite.rewrite(model, "flash", example_inputs=(ids, labels))
    rec = result.report.passes[0]
    assert rec.verified and not rec.rolled_back and rec.rewrites == 2, rec.failure
    torch.testing.assert_close(result.program.module(ids, labels), model(ids, labels), atol=1e-5, rtol=1e-5)
