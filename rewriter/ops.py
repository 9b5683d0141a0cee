"""Operators evo-rewrite puts into graphs where PyTorch has none.

``evo_rewrite::softcap_attention``: attention whose scores are soft-capped with tanh before the mask
(Gemma2): ``softmax(softcap · tanh(scale · Q·Kᵀ / softcap) + mask) · V``. SDPA cannot express the cap,
so ``flash(softcap=true)`` fuses such sites into this operator (the ONNX target asks for it). In PyTorch
it runs the same arithmetic unfused — no speed-up there, but one node the ONNX target lowers to the
opset-23 ``Attention`` operator's ``softcap`` attribute (and from there to ORT's GroupQueryAttention).
It has a fake (meta) implementation for export and an autograd formula (by recomputation).
"""

from __future__ import annotations

from typing import Optional

import torch

__all__ = ["softcap_attention", "SOFTCAP_ATTENTION", "onnx_translations"]


def _reference(query, key, value, attn_mask, scale: float, softcap: float, enable_gqa: bool):
    if enable_gqa and key.shape[-3] != query.shape[-3]:
        rep = query.shape[-3] // key.shape[-3]
        key, value = key.repeat_interleave(rep, dim=-3), value.repeat_interleave(rep, dim=-3)
    scores = torch.matmul(query, key.transpose(-2, -1)) * scale
    scores = torch.tanh(scores / softcap) * softcap
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attn_mask, float("-inf"))
        else:
            scores = scores + attn_mask
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    return torch.matmul(probs, value)


@torch.library.custom_op("evo_rewrite::softcap_attention", mutates_args=())
def softcap_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask: Optional[torch.Tensor],
                      scale: float, softcap: float, enable_gqa: bool) -> torch.Tensor:
    """``softmax(softcap · tanh(scale · Q·Kᵀ / softcap) + attn_mask) · V`` on (B, H, S, D) tensors.

    ``attn_mask``: additive (float) or boolean (True: attend), broadcastable to (B, H, Sq, Sk).
    ``enable_gqa``: K/V have fewer heads, each serving a group of query heads.
    """
    return _reference(query, key, value, attn_mask, scale, softcap, enable_gqa)


@softcap_attention.register_fake
def _(query, key, value, attn_mask, scale, softcap, enable_gqa):
    return query.new_empty((*query.shape[:-1], value.shape[-1]))


def _setup_context(ctx, inputs, output):
    query, key, value, attn_mask, scale, softcap, enable_gqa = inputs
    ctx.save_for_backward(query, key, value, attn_mask)
    ctx.args = (scale, softcap, enable_gqa)


def _backward(ctx, grad):
    query, key, value, attn_mask = ctx.saved_tensors
    with torch.enable_grad():
        leaves = [t.detach().requires_grad_() for t in (query, key, value)]
        mask = attn_mask
        if mask is not None and mask.is_floating_point() and ctx.needs_input_grad[3]:
            mask = mask.detach().requires_grad_(True)
        out = _reference(*leaves, mask, *ctx.args)
        wrt = leaves + ([mask] if mask is not None and mask.requires_grad else [])
        grads = torch.autograd.grad(out, wrt, grad)
    mask_grad = grads[3] if len(grads) > 3 else None
    return grads[0], grads[1], grads[2], mask_grad, None, None, None


softcap_attention.register_autograd(_backward, setup_context=_setup_context)

SOFTCAP_ATTENTION = torch.ops.evo_rewrite.softcap_attention.default


def onnx_translations() -> dict:
    """``custom_translation_table`` for ``torch.onnx.export``: the operator as opset-23 ``Attention``."""
    from onnxscript import opset23 as op23

    def softcap_attention_onnx(query, key, value, attn_mask=None, scale=1.0, softcap=0.0, enable_gqa=False):
        # 4-D Q/K/V: the head counts (grouped K/V included) come from the shapes, as for SDPA
        y, _, _, _ = op23.Attention(query, key, value, attn_mask, scale=scale, softcap=softcap)
        return y

    return {SOFTCAP_ATTENTION: softcap_attention_onnx}
