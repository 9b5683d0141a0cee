"""`fuse` for training: the CUDA backward paths (statistics from the forward, no recomputation) run on the CPU
through a stand-in for Liger's functional API, and agree with the model's own gradients; with checkpointing
(full and selective) too. Site counts on zoo.llama."""

import collections

import pytest
import torch

import evo_rewrite
import liger_standin
from evo_rewrite import fused_ops as ops
from evo_rewrite import zoo

FORWARDS = {"rms_norm_forward", "fused_add_rms_norm_forward", "swiglu_forward", "geglu_forward", "rope_forward",
            "fused_linear_cross_entropy_forward"}
BACKWARDS = {"rms_norm_backward", "fused_add_rms_norm_backward", "swiglu_backward", "geglu_backward",
             "rope_backward"}


@pytest.fixture
def kernels_on_cpu(monkeypatch):
    """The fused operators take their kernel paths for CPU tensors, with the stand-in as the kernels."""
    monkeypatch.setattr(ops, "_liger_ops", lambda: liger_standin)
    monkeypatch.setattr(ops, "_KERNEL_DEVICES", {"cpu"})
    liger_standin.CALLS.clear()
    yield liger_standin.CALLS


def _loss_and_grads(module, args):
    for p in module.parameters():
        p.grad = None
    loss = module(*args)
    loss = loss if isinstance(loss, torch.Tensor) else loss["output"] if isinstance(loss, dict) else loss[0]
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


def _same_grads(got, ref, rtol=1e-4, atol=1e-5):
    assert got.keys() == ref.keys() and got
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=rtol, atol=atol, msg=k)


ZOO_SITES = {  # zoo.llama(n_layer=2): per kind
    (): dict(norm=5, residual=4, mlp=2, rotary=4, pairs=2, loss=1),
    (("act", "gelu_tanh"), ("fused", True)): dict(norm=5, residual=4, mlp=2, rotary=4, pairs=2, loss=1, split=2),
    (("norm", "gemma"), ("rotary", "interleaved")): dict(norm=5, residual=4, mlp=2, rotary=4, pairs=2, loss=1),
}


@pytest.mark.parametrize("spelling", list(ZOO_SITES), ids=["llama", "geglu-fused", "gemma-interleaved"])
def test_zoo_llama_sites(spelling):
    model, inputs = zoo.llama(labels=True, **dict(spelling))
    want = ZOO_SITES[spelling]
    rec = evo_rewrite.rewrite(model, "fuse", example_inputs=inputs).report.passes[0]
    assert rec.verified and rec.skipped == [], (rec.failure, rec.skipped)
    got = {k: rec.notes.get(v, 0) for k, v in dict(norm="norm", residual="rms_norm with residual add", mlp="mlp",
                                                   rotary="rotary", pairs="rotary q/k pairs", loss="loss",
                                                   split="mlp (fused gate/up projection)").items()}
    assert got == {**dict(split=0), **want}
    assert rec.rewrites == want["norm"] + want["mlp"] + want["rotary"] + want["loss"]


def test_kernel_paths_give_the_models_gradients_without_recomputing(kernels_on_cpu):
    model, inputs = zoo.llama(labels=True)
    model.train()
    result = evo_rewrite.rewrite(model, "fuse", example_inputs=inputs, strict=True)
    ids, labels = torch.randint(0, 64, (3, 10)), torch.randint(0, 64, (3, 10))
    labels[0, :4] = -100
    ref_loss, ref = _loss_and_grads(model, (ids, labels))
    kernels_on_cpu.clear()
    loss = result.module(ids, labels)
    forwards = collections.Counter(kernels_on_cpu)
    assert forwards == {"rms_norm_forward": 1, "fused_add_rms_norm_forward": 4, "swiglu_forward": 2,
                        "rope_forward": 2, "fused_linear_cross_entropy_forward": 1}
    kernels_on_cpu.clear()
    loss = loss if isinstance(loss, torch.Tensor) else next(iter(loss.values()))
    for p in result.module.parameters():
        p.grad = None
    loss.backward()
    backwards = collections.Counter(kernels_on_cpu)
    # every operator's backward is Liger's, from what its forward kept; no forward runs again (LCE: none at all)
    assert backwards == {"rms_norm_backward": 1, "fused_add_rms_norm_backward": 4, "swiglu_backward": 2,
                         "rope_backward": 2}
    torch.testing.assert_close(loss.detach(), ref_loss, rtol=1e-5, atol=1e-6)
    got = {n: p.grad for n, p in result.module.named_parameters() if p.grad is not None}
    _same_grads(got, ref)


def test_kernel_paths_leave_their_inputs_and_take_promoted_dtypes(kernels_on_cpu):
    a, b = torch.randn(2, 5, 8, requires_grad=True), torch.randn(2, 5, 8, dtype=torch.float64, requires_grad=True)
    y = ops.gated_act(a, b, "silu")
    assert y.dtype == torch.float64 and "swiglu_forward" in kernels_on_cpu
    a0, b0 = a.detach().clone(), b.detach().clone()
    y.sum().backward()
    assert torch.equal(a.detach(), a0) and torch.equal(b.detach(), b0)  # Liger writes over its a, b: copies
    assert a.grad.dtype == torch.float32 and b.grad.dtype == torch.float64
    q = torch.randn(2, 6, 4, 8).transpose(1, 2).requires_grad_()  # (B, H, S, D) view of (B, S, H, D)
    k = torch.randn(2, 6, 4, 8).transpose(1, 2).requires_grad_()
    emb = torch.randn(6, 4)
    cos = torch.cat((emb, emb), -1).cos()[None, None].requires_grad_()
    sin = torch.cat((emb, emb), -1).sin()[None, None].requires_grad_()
    q0 = q.detach().clone()
    qo, ko = ops.rotary_pair(q, k, cos, sin, False)
    assert torch.equal(q.detach(), q0)
    (qo.square().sum() + ko.sum()).backward()
    assert "rope_backward" in kernels_on_cpu
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, cos, sin)]
    r = ops._rotary_pair_ref(*leaves, False)
    (r[0].square().sum() + r[1].sum()).backward()
    for t, leaf in zip((q, k, cos, sin), leaves):  # cos/sin get their gradients from the reference
        torch.testing.assert_close(t.grad, leaf.grad, rtol=1e-5, atol=1e-5)


def test_no_statistics_without_gradients(kernels_on_cpu):
    x, w = torch.randn(4, 8), torch.randn(8)
    with torch.no_grad():
        y = ops.rms_norm(x, w, 1e-6, 0.0, "llama")
    assert ops._STATS not in y.__dict__
    w.requires_grad_()
    y = ops.rms_norm(x, w, 1e-6, 0.0, "llama")
    assert ops._STATS not in y.__dict__  # taken by the autograd setup
