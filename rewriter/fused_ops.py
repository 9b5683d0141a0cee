"""Fused operators the ``fuse`` pass puts into graphs: norms, gated activations, rotary, LM head + loss.

Each is a ``torch.library`` custom operator in the ``evo_rewrite`` namespace with

- a reference implementation that repeats, operation for operation, the arithmetic the pass found
  (so on the CPU a fused program is exact, outputs and gradients), and that is what runs in CI;
- a fake kernel (the reference on fake tensors), so ``torch.export`` and ``.pt2`` round trips work;
- an autograd formula: gradients by recomputing the operator differentiably and back-propagating
  through it (the recomputation is the same function the forward ran, so the gradient is exact);
- on CUDA, when ``liger_kernel`` imports, Liger-Kernel's Triton kernels (RMSNorm, fused add +
  RMSNorm, SwiGLU, GeGLU (tanh), RoPE (rotate-half, q and k together), fused linear cross-entropy)
  in the forward and, through Liger's own autograd functions, in the recomputed backward. Cases
  Liger does not cover (interleaved rotary, exact-erf GeGLU, a norm weight of another dtype than its
  input, ...) keep the reference.

| operator | computes |
|---|---|
| ``rms_norm(x, w, eps, offset, casting)`` | ``x · rsqrt(mean(x²) + eps) · (offset + w)``; casting ``llama`` (fp32 math, back to x's dtype before the weight), ``gemma`` (all fp32, back at the end), ``none`` |
| ``add_rms_norm(a, b, w, eps, offset, casting)`` | ``(rms_norm(a + b), a + b)``: the residual add and the norm after it |
| ``gated_act(a, b, act)`` | ``act(a) · b`` with act ``silu``, ``gelu`` (erf) or ``gelu_tanh`` |
| ``rotary(x, cos, sin, interleaved)`` | ``x · cos + rot(x) · sin``; rot is rotate-half ``cat(-x₂, x₁)`` or interleaved ``(-x₁, x₀, -x₃, x₂, …)`` |
| ``rotary_pair(q, k, cos, sin, interleaved)`` | the same on q and k with one cos/sin (one Liger kernel for both) |
| ``linear_cross_entropy(h, w, b, target, ignore_index, reduction, upcast)`` | ``cross_entropy(linear(h, w, b)[.float()], target)`` over all leading dimensions |

Hand-written LayerNorm needs no operator of its own: ``fuse`` rewrites it to ``aten.layer_norm``,
which is already one kernel on every backend and one ``LayerNormalization`` in ONNX.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
import torch.nn.functional as F

__all__ = ["rms_norm", "add_rms_norm", "gated_act", "rotary", "rotary_pair", "linear_cross_entropy",
           "RMS_NORM", "ADD_RMS_NORM", "GATED_ACT", "ROTARY", "ROTARY_PAIR", "LINEAR_CROSS_ENTROPY", "FUSED_OPS",
           "CASTING_MODES", "ACTIVATIONS", "liger_available"]

CASTING_MODES = ("llama", "gemma", "none")
ACTIVATIONS = ("silu", "gelu", "gelu_tanh")


@functools.lru_cache(maxsize=None)
def _liger_ops():
    """``liger_kernel.ops`` when it imports (it needs Triton), else None."""
    try:
        import liger_kernel.ops as liger  # noqa: PLC0415 - optional, CUDA only
    except Exception:  # noqa: BLE001 - not installed, or no Triton on this machine
        return None
    return liger


def liger_available() -> bool:
    return _liger_ops() is not None


def _liger_for(*tensors):
    """Liger's ops when every tensor is on CUDA and Liger imports, else None (use the reference)."""
    if not all(t is None or t.is_cuda for t in tensors):
        return None
    return _liger_ops()


# --------------------------------------------------------------------------------------------
# reference implementations (differentiable; also the fake kernels)
# --------------------------------------------------------------------------------------------

def _rms_norm_ref(x, weight, eps: float, offset: float, casting: str):
    xf = x.to(torch.float32) if casting in ("llama", "gemma") else x
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if casting == "gemma":
        if weight is not None:
            w = weight.to(torch.float32)
            normed = normed * (w + offset if offset else w)
        return normed.to(x.dtype)
    if casting == "llama":
        normed = normed.to(x.dtype)
    if weight is None:
        return normed
    return (weight + offset if offset else weight) * normed


def _gated_ref(a, b, act: str):
    if act == "silu":
        h = F.silu(a)
    else:
        h = F.gelu(a, approximate="tanh" if act == "gelu_tanh" else "none")
    return h * b


def _rotate(x, interleaved: bool):
    if interleaved:  # (x0, x1, x2, x3, ...) -> (-x1, x0, -x3, x2, ...)
        return torch.stack((-x[..., 1::2], x[..., ::2]), dim=-1).flatten(-2)
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _rotary_ref(x, cos, sin, interleaved: bool):
    return x * cos + _rotate(x, interleaved) * sin


def _lce_ref(hidden, weight, bias, target, ignore_index: int, reduction: str, upcast: bool):
    logits = F.linear(hidden, weight, bias)
    if upcast:
        logits = logits.to(torch.float32)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=ignore_index,
                           reduction=reduction)


# --------------------------------------------------------------------------------------------
# implementations: Liger on CUDA where it covers the case, the reference elsewhere
# --------------------------------------------------------------------------------------------

def _rms_norm_impl(x, weight, eps, offset, casting):
    liger = _liger_for(x, weight)
    if liger is not None and weight is not None and weight.dtype == x.dtype:
        return liger.LigerRMSNormFunction.apply(x, weight, eps, offset, casting, False)
    return _rms_norm_ref(x, weight, eps, offset, casting)


def _add_rms_norm_impl(a, b, weight, eps, offset, casting):
    liger = _liger_for(a, b, weight)
    if (liger is not None and weight is not None and a.dtype == b.dtype == weight.dtype
            and a.shape == b.shape):
        y, s = liger.LigerFusedAddRMSNormFunction.apply(a, b, weight, eps, offset, casting, False)
        return y, s
    s = a + b
    return _rms_norm_ref(s, weight, eps, offset, casting), s


def _gated_impl(a, b, act):
    liger = _liger_for(a, b)
    if liger is not None and a.shape == b.shape and a.dtype == b.dtype and act in ("silu", "gelu_tanh"):
        fn = liger.LigerSiLUMulFunction if act == "silu" else liger.LigerGELUMulFunction
        if torch.is_grad_enabled() and (a.requires_grad or b.requires_grad):
            # Liger's backward writes da, db into the saved a and b; give it copies, not the graph's tensors
            a, b = a.clone(), b.clone()
        return fn.apply(a, b)
    return _gated_ref(a, b, act)


def _liger_rope_ok(q, k, cos, interleaved):
    # Liger's RoPE: rotate-half, (B, H, S, D) q and k, cos/sin (1 or B, 1, S, D) of the rotated width
    return (not interleaved and q.dim() == 4 and k.dim() == 4 and cos.dim() == 4 and cos.shape[1] == 1
            and q.shape[0] == k.shape[0] and q.shape[2:] == k.shape[2:] and cos.shape[-1] == q.shape[-1]
            and cos.shape[-2] == q.shape[-2] and cos.shape[0] in (1, q.shape[0]) and q.dtype == k.dtype)


def _own_storage(t):
    """Liger's RoPE writes into ``t.transpose(1, 2).contiguous()``: copy when that would be ``t``'s own memory."""
    return t.clone() if t.transpose(1, 2).is_contiguous() else t


def _rotary_pair_impl(q, k, cos, sin, interleaved):
    liger = _liger_for(q, k, cos, sin)
    if liger is not None and _liger_rope_ok(q, k, cos, interleaved):
        qo, ko = liger.LigerRopeFunction.apply(_own_storage(q), _own_storage(k), cos.to(q.dtype), sin.to(q.dtype))
        return qo, ko
    return _rotary_ref(q, cos, sin, interleaved), _rotary_ref(k, cos, sin, interleaved)


def _rotary_impl(x, cos, sin, interleaved):
    return _rotary_ref(x, cos, sin, interleaved)


def _lce_impl(hidden, weight, bias, target, ignore_index, reduction, upcast):
    liger = _liger_for(hidden, weight, bias)
    if liger is not None and reduction in ("mean", "sum") and hidden.dtype == weight.dtype:
        h2 = hidden.reshape(-1, hidden.shape[-1])
        out = liger.LigerFusedLinearCrossEntropyFunction.apply(h2, weight, target.reshape(-1), bias, None,
                                                                ignore_index, 0.0, 0.0, reduction)
        loss = out[0] if isinstance(out, tuple) else out
        return loss.to(torch.float32) if upcast else loss
    return _lce_ref(hidden, weight, bias, target, ignore_index, reduction, upcast)


# --------------------------------------------------------------------------------------------
# autograd: recompute the implementation differentiably, back-propagate through it
# --------------------------------------------------------------------------------------------

def _recompute_grads(impl, n_tensors: int, ref=None):
    """A backward formula for an operator whose first ``n_tensors`` inputs are tensors (or None).

    Back-propagates through ``impl`` (Liger's kernels on CUDA); an input the kernel gives no gradient for
    (Liger's RoPE treats cos/sin as constants) gets it from the differentiable reference ``ref`` instead.
    """

    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*[t for t in inputs[:n_tensors]])
        ctx.args = tuple(inputs[n_tensors:])

    def grads_through(fn, saved, needs, grads, args):
        with torch.enable_grad():
            leaves = [t.detach().requires_grad_(True) if t is not None and need else t for t, need in zip(saved, needs)]
            out = fn(*leaves, *args)
            outs = out if isinstance(out, tuple) else (out,)
            pairs = [(o, g) for o, g in zip(outs, grads) if g is not None and o.requires_grad]
            wrt = [t for t, need in zip(leaves, needs) if t is not None and need]
            got = iter(torch.autograd.grad([o for o, _ in pairs], wrt, [g for _, g in pairs], allow_unused=True)
                       if pairs and wrt else [None] * len(wrt))
        return [next(got) if t is not None and need else None for t, need in zip(saved, needs)]

    def backward(ctx, *grads):
        saved = ctx.saved_tensors
        needs = ctx.needs_input_grad[:n_tensors]
        result = grads_through(impl, saved, needs, grads, ctx.args)
        missing = [need and t is not None and t.is_floating_point() and g is None
                   for t, need, g in zip(saved, needs, result)]
        if ref is not None and any(missing):
            fill = grads_through(ref, saved, missing, grads, ctx.args)
            result = [f if m else g for g, f, m in zip(result, fill, missing)]
        return (*result, *([None] * len(ctx.args)))

    return backward, setup_context


def _define(name: str, fn, impl, ref, n_tensors: int):
    """Register ``evo_rewrite::name`` (schema from ``fn``'s annotations): forward = impl, fake = ref, autograd."""
    op = torch.library.custom_op(f"evo_rewrite::{name}", mutates_args=())(fn)
    op.register_fake(ref)
    backward, setup_context = _recompute_grads(impl, n_tensors, ref)
    op.register_autograd(backward, setup_context=setup_context)
    return op


def _rms_norm(x: torch.Tensor, weight: Optional[torch.Tensor], eps: float, offset: float,
              casting: str) -> torch.Tensor:
    """``x · rsqrt(mean(x²) + eps) · (offset + weight)`` over the last axis; ``casting``: llama | gemma | none."""
    with torch.no_grad():
        return _rms_norm_impl(x, weight, eps, offset, casting)


def _add_rms_norm(a: torch.Tensor, b: torch.Tensor, weight: Optional[torch.Tensor], eps: float, offset: float,
                  casting: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rms_norm(a + b), a + b)``: a residual add and the norm of its result."""
    with torch.no_grad():
        y, s = _add_rms_norm_impl(a, b, weight, eps, offset, casting)
        return y, s.clone() if s is a or s is b else s


def _gated_act(a: torch.Tensor, b: torch.Tensor, act: str) -> torch.Tensor:
    """``act(a) · b``; ``act``: silu | gelu | gelu_tanh."""
    with torch.no_grad():
        return _gated_impl(a, b, act)


def _rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """``x · cos + rot(x) · sin`` (rotate-half, or interleaved pairs); cos/sin broadcast to x."""
    with torch.no_grad():
        return _rotary_impl(x, cos, sin, interleaved)


def _rotary_pair(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                 interleaved: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``rotary`` of q and of k with the same cos/sin: (B, H, S, D) q and (B, Hkv, S, D) k."""
    with torch.no_grad():
        return _rotary_pair_impl(q, k, cos, sin, interleaved)


def _linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                          target: torch.Tensor, ignore_index: int, reduction: str, upcast: bool) -> torch.Tensor:
    """``cross_entropy(linear(hidden, weight, bias), target)`` with the logits never materialised on CUDA."""
    with torch.no_grad():
        return _lce_impl(hidden, weight, bias, target, ignore_index, reduction, upcast)


rms_norm = _define("rms_norm", _rms_norm, _rms_norm_impl, _rms_norm_ref, 2)
add_rms_norm = _define("add_rms_norm", _add_rms_norm, _add_rms_norm_impl,
                       lambda a, b, w, eps, offset, casting: (_rms_norm_ref(a + b, w, eps, offset, casting), a + b), 3)
gated_act = _define("gated_act", _gated_act, _gated_impl, _gated_ref, 2)
rotary = _define("rotary", _rotary, _rotary_impl, _rotary_ref, 3)
rotary_pair = _define("rotary_pair", _rotary_pair, _rotary_pair_impl,
                      lambda q, k, cos, sin, il: (_rotary_ref(q, cos, sin, il), _rotary_ref(k, cos, sin, il)), 4)
linear_cross_entropy = _define("linear_cross_entropy", _linear_cross_entropy, _lce_impl, _lce_ref, 4)

RMS_NORM = torch.ops.evo_rewrite.rms_norm.default
ADD_RMS_NORM = torch.ops.evo_rewrite.add_rms_norm.default
GATED_ACT = torch.ops.evo_rewrite.gated_act.default
ROTARY = torch.ops.evo_rewrite.rotary.default
ROTARY_PAIR = torch.ops.evo_rewrite.rotary_pair.default
LINEAR_CROSS_ENTROPY = torch.ops.evo_rewrite.linear_cross_entropy.default
FUSED_OPS = (RMS_NORM, ADD_RMS_NORM, GATED_ACT, ROTARY, ROTARY_PAIR, LINEAR_CROSS_ENTROPY)
