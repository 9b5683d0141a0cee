"""GPU: the fused operators' Liger-Kernel paths against their references, bf16, outputs and gradients; and a
bf16 HF Llama through ``flash,fuse`` on the device (skipped without CUDA or liger-kernel; run on an H200 by hand)."""

import pytest
import torch

import evo_rewrite
from evo_rewrite import fused_ops as ops

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
              pytest.mark.skipif(not ops.liger_available(), reason="needs liger-kernel")]
BF16 = dict(rtol=2e-2, atol=2e-2)


def _both(op_fn, ref_fn, tensors, *args):
    """(outputs, grads) of the operator (Liger on CUDA) and of the reference on leaf copies of ``tensors``."""
    results = []
    for fn in (op_fn, ref_fn):
        leaves = [t.detach().clone().requires_grad_(t.is_floating_point()) if t is not None else None for t in tensors]
        out = fn(*leaves, *args)
        outs = out if isinstance(out, tuple) else (out,)
        sum(o.float().square().mean() for o in outs).backward()
        results.append((outs, [t.grad for t in leaves if t is not None and t.is_floating_point()]))
    return results


def _close(got, ref):
    (o1, g1), (o2, g2) = got, ref
    for a, b in zip(o1, o2):
        torch.testing.assert_close(a.float(), b.float(), **BF16)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a.float(), b.float(), **BF16)


def _t(*shape, dtype=torch.bfloat16):
    return torch.randn(*shape, device="cuda", dtype=dtype)


@pytest.mark.parametrize("casting,offset", [("llama", 0.0), ("gemma", 1.0)])
def test_rms_norm_and_add_rms_norm(casting, offset):
    x, r, w = _t(4, 128, 2048), _t(4, 128, 2048), _t(2048)
    _close(*_both(ops.rms_norm, ops._rms_norm_ref, (x, w), 1e-6, offset, casting))
    _close(*_both(ops.add_rms_norm, lambda a, b, w_, *rest: (ops._rms_norm_ref(a + b, w_, *rest), a + b),
                  (x, r, w), 1e-6, offset, casting))


@pytest.mark.parametrize("act", ["silu", "gelu_tanh"])
def test_gated_act(act):
    a, b = _t(4, 128, 5632), _t(4, 128, 5632)
    _close(*_both(ops.gated_act, ops._gated_ref, (a, b), act))


def test_rotary_pair_keeps_its_inputs():
    q = _t(2, 128, 32, 64).transpose(1, 2)  # (B, H, S, D) as HF makes it: a transposed view
    k = _t(2, 128, 8, 64).transpose(1, 2)
    emb = torch.randn(2, 128, 32, device="cuda")
    cos, sin = torch.cat((emb, emb), -1).cos()[:, None].bfloat16(), torch.cat((emb, emb), -1).sin()[:, None].bfloat16()
    q0 = q.clone()
    _close(*_both(ops.rotary_pair, lambda q_, k_, c, s, il: (ops._rotary_ref(q_, c, s, il), ops._rotary_ref(k_, c, s, il)),
                  (q, k, cos, sin), False))
    ops.rotary_pair(q, k, cos, sin, False)
    assert torch.equal(q, q0)  # Liger's kernel works in place: the operator must not


def test_linear_cross_entropy():
    h, w = _t(2, 256, 512), _t(1000, 512)
    target = torch.randint(0, 1000, (2, 256), device="cuda")
    target[0, :10] = -100
    _close(*_both(ops.linear_cross_entropy, ops._lce_ref, (h, w, None, target), -100, "mean", True))


def test_llama_bf16_flash_fuse_on_device():
    import transformers as T

    cfg = T.LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, vocab_size=1000, attn_implementation="eager", use_cache=False)
    torch.manual_seed(0)
    model = T.LlamaForCausalLM(cfg).to("cuda", torch.bfloat16).eval()
    ids = torch.randint(0, 1000, (2, 64), device="cuda")
    result = evo_rewrite.rewrite(model, "flash,fuse", example_inputs={"input_ids": ids}, device="cuda")
    fuse = result.report.passes[1]
    assert fuse.verified and fuse.rewrites == 11, fuse.failure
    with torch.no_grad():
        ref, got = model(input_ids=ids).logits.float(), result.module(input_ids=ids)["logits"].float()
    assert (got - ref).abs().max() / ref.abs().max() < 2e-2


@pytest.mark.parametrize("ck", ["", ",checkpoint(modules=[blocks.*], policy=selective)",
                                ",checkpoint(modules=[blocks.*])"], ids=["none", "selective", "full"])
def test_training_step_on_device_kernel_backward(ck):
    """zoo.llama with its loss, fp32 weights under bf16 autocast: the fused program's loss and gradients (Liger's
    backward from saved statistics, the LM-head loss's gradients from its forward) match the unfused model's."""
    from evo_rewrite import zoo

    model, _ = zoo.llama(n_layer=2, d_model=256, n_head=4, d_ff=512, vocab_size=1000, seed=0)
    model = model.cuda().train()
    ids = torch.randint(0, 1000, (2, 128), device="cuda")
    labels = torch.randint(0, 1000, (2, 128), device="cuda")
    result = evo_rewrite.rewrite(model, "flash,fuse" + ck, example_inputs=(ids, labels), device="cuda", strict=True)
    assert result.report.passes[1].notes["loss"] == 1

    def step(m):
        for p in m.parameters():
            p.grad = None
        with torch.autocast("cuda", torch.bfloat16):
            loss = m(ids, labels)
        loss = loss if isinstance(loss, torch.Tensor) else next(iter(loss.values()))
        loss.backward()
        return loss.detach().float(), {n: p.grad.float().clone() for n, p in m.named_parameters() if p.grad is not None}

    ref_loss, ref = step(model)
    loss, got = step(result.module)
    torch.testing.assert_close(loss, ref_loss, rtol=2e-2, atol=2e-2)
    assert got.keys() == ref.keys()
    for k in ref:
        rel = (got[k] - ref[k]).norm() / ref[k].norm().clamp_min(1e-12)
        assert rel < 5e-2, (k, float(rel))
