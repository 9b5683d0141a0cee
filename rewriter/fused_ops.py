"""Fused operators the ``fuse`` pass puts into graphs: norms, gated activations, rotary, LM head + loss.

Each is a ``torch.library`` custom operator in the ``evo_rewrite`` namespace with

- a reference implementation that repeats, operation for operation, the arithmetic the pass found
  (so on the CPU a fused program is exact, outputs and gradients), and that is what runs in CI;
- a fake kernel (the reference on fake tensors), so ``torch.export`` and ``.pt2`` round trips work;
- an autograd formula that costs no extra forward: on CUDA Liger's backward kernels from the statistics
  its forward kept (RMSNorm's rstd; linear + cross-entropy's gradients, computed in the forward as
  Liger does, so its forward runs once); on the CPU the reference's own gradients, exactly (rotary
  in closed form, the others by back-propagating through the reference recomputed from the saved
  inputs). Inputs a kernel gives no gradient for (RoPE's cos/sin) get the reference's;
- on CUDA, when ``liger_kernel`` imports, Liger-Kernel's Triton kernels through its functional API
  (``rms_norm_forward``/``_backward``, ``fused_add_rms_norm_*``, ``swiglu_*``, ``geglu_*``, ``rope_*``,
  ``fused_linear_cross_entropy_*``). Cases Liger does not cover (interleaved rotary, exact-erf GeGLU, a
  norm weight of another dtype than its input, ...) keep the reference. Inputs of two dtypes are
  promoted first, as the reference promotes them.

What each operator saves for backward is fixed by its inputs (never by which path ran), so activation
checkpointing, full or selective, recomputes it tensor for tensor.

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
# CUDA kernels: Liger-Kernel's forward and backward functions
#
# Each ``_*_kernel`` returns None where Liger does not cover the case (the reference runs), else
# ``(outputs, stats)``: ``stats`` is what Liger's backward needs besides the operator's inputs (RMSNorm's
# rstd and launch settings, RoPE's squeezed cos/sin, the gradients linear + cross-entropy computes in
# its forward), None when no input needs a gradient.
# --------------------------------------------------------------------------------------------

_KERNEL_DEVICES = {"cuda"}  # devices whose tensors go to Liger (tests substitute a CPU stand-in)


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
    """Liger's ops when every tensor is on a kernel device and Liger imports, else None (use the reference)."""
    if not all(t is None or t.device.type in _KERNEL_DEVICES for t in tensors):
        return None
    return _liger_ops()


def _wants_grad(*tensors) -> bool:
    """Whether the backward may run: an input requires grad (the autograd path calls the kernel with them)."""
    return not torch.is_inference_mode_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _rms_norm_kernel(x, weight, eps, offset, casting):
    liger = _liger_for(x, weight)
    if liger is None or weight is None or weight.dtype != x.dtype:
        return None
    y, _, rstd, block, warps, mode = liger.rms_norm_forward(x.contiguous(), weight, eps, offset, casting, None)
    return y, ((rstd, block, warps, mode) if _wants_grad(x, weight) else None)


def _add_rms_norm_kernel(a, b, weight, eps, offset, casting):
    liger = _liger_for(a, b, weight)
    dtype = torch.result_type(a, b)
    if liger is None or weight is None or weight.dtype != dtype or a.shape != b.shape:
        return None
    y, s, rstd, block, warps, stages, mode = liger.fused_add_rms_norm_forward(
        a.to(dtype).contiguous(), b.to(dtype).contiguous(), weight, eps, offset, casting)
    return (y, s), ((rstd, block, warps, stages, mode) if _wants_grad(a, b, weight) else None)


def _gated_kernel(a, b, act):
    liger = _liger_for(a, b)
    if liger is None or a.shape != b.shape or act not in ("silu", "gelu_tanh"):
        return None
    dtype = torch.result_type(a, b)
    fwd = liger.swiglu_forward if act == "silu" else liger.geglu_forward
    _, _, c = fwd(a.to(dtype).contiguous(), b.to(dtype).contiguous())
    return c, None


def _liger_rope_ok(q, k, cos, interleaved):
    # Liger's RoPE: rotate-half, (B, H, S, D) q and k, cos/sin (1 or B, 1, S, D) of the rotated width
    return (not interleaved and q.dim() == 4 and k.dim() == 4 and cos.dim() == 4 and cos.shape[1] == 1
            and q.shape[0] == k.shape[0] and q.shape[2:] == k.shape[2:] and cos.shape[-1] == q.shape[-1]
            and cos.shape[-2] == q.shape[-2] and cos.shape[0] in (1, q.shape[0]) and q.dtype == k.dtype)


def _own_storage(t):
    """Liger's RoPE writes into ``t.transpose(1, 2).contiguous()``: copy when that would be ``t``'s own memory."""
    return t.clone() if t.transpose(1, 2).is_contiguous() else t


def _rotary_pair_kernel(q, k, cos, sin, interleaved):
    liger = _liger_for(q, k, cos, sin)
    if liger is None or not _liger_rope_ok(q, k, cos, interleaved):
        return None
    dtype = torch.result_type(q, cos)  # the reference promotes: bf16 q times fp32 cos is fp32
    qo, ko, cos_c, sin_c = liger.rope_forward(_own_storage(q.to(dtype)), _own_storage(k.to(dtype)), cos.to(dtype),
                                              sin.to(dtype))
    return (qo, ko), ((cos_c, sin_c) if _wants_grad(q, k) else None)


def _lce_kernel(hidden, weight, bias, target, ignore_index, reduction, upcast):
    liger = _liger_for(hidden, weight, bias)
    if liger is None or reduction not in ("mean", "sum") or hidden.dtype != weight.dtype:
        return None
    grads = _wants_grad(hidden, weight, bias)
    loss, _, _, _, g_in, g_w, g_b = liger.fused_linear_cross_entropy_forward(
        _input=hidden.reshape(-1, hidden.shape[-1]), weight=weight, target=target.reshape(-1), bias=bias,
        ignore_index=ignore_index, reduction=reduction, compute_gradients=grads,
        weight_requires_grad=weight.requires_grad)
    loss = loss.to(torch.float32) if upcast else loss.to(hidden.dtype)
    return loss, ((g_in.view(hidden.shape), g_w, g_b) if grads else None)


# --------------------------------------------------------------------------------------------
# autograd
#
# ``setup_context`` saves, through ``ctx.save_for_backward``, the same tensors whichever path the forward
# took (checkpointing recomputes them and counts them), and keeps the kernel's statistics on ``ctx``
# (small: rstd is one float per row; they never go through the saved-tensor hooks). The kernel hands the
# statistics over on its output tensor (attribute ``_STATS``): the custom-op machinery passes setup_context
# the very object the kernel returned. Backward: Liger's backward from the statistics when there are any
# (CUDA), else the reference — a closed formula (rotary) or back-propagation through the differentiable
# reference recomputed from the saved inputs (exact; CPU, CI, and fake tensors).
# --------------------------------------------------------------------------------------------

_STATS = "_evo_rewrite_kernel_stats"


def _hand_over(out, stats):
    """Attach the kernel's statistics to its (first) output for setup_context."""
    if stats is not None:
        setattr(out[0] if isinstance(out, tuple) else out, _STATS, stats)
    return out


def _take_stats(output):
    first = output[0] if isinstance(output, tuple) else output
    return first.__dict__.pop(_STATS, None)


def _grads_through(fn, inputs, needs, grads, args):
    """Gradients of ``fn(*inputs, *args)`` for the inputs flagged in ``needs`` (None elsewhere), by autograd."""
    with torch.enable_grad():
        leaves = [t.detach().requires_grad_(True) if t is not None and need else t for t, need in zip(inputs, needs)]
        out = fn(*leaves, *args)
        outs = out if isinstance(out, tuple) else (out,)
        pairs = [(o, g) for o, g in zip(outs, grads) if g is not None and o.requires_grad]
        wrt = [t for t, need in zip(leaves, needs) if t is not None and need]
        got = iter(torch.autograd.grad([o for o, _ in pairs], wrt, [g for _, g in pairs], allow_unused=True)
                   if pairs and wrt else [None] * len(wrt))
    return [next(got) if t is not None and need else None for t, need in zip(inputs, needs)]


def _like(g, t):
    """``g`` as a gradient of ``t``: summed over broadcast dimensions, in ``t``'s dtype."""
    if g is None or t is None:
        return None
    if g.shape != t.shape:
        g = g.sum_to_size(t.shape)
    return g.to(t.dtype)


def _unrotate(g, interleaved: bool):
    """The transpose of the rotation: ``rotᵀ(g) = -rot(g)`` for rotate-half and for interleaved pairs."""
    return -_rotate(g, interleaved)


# ---- rms_norm(x, w, eps, offset, casting)

def _rms_norm_setup(ctx, inputs, output):
    x, w, *args = inputs
    ctx.save_for_backward(x, w)
    ctx.args, ctx.stats = tuple(args), _take_stats(output)


def _rms_norm_backward(ctx, dy):
    x, w = ctx.saved_tensors
    needs = ctx.needs_input_grad[:2]
    if ctx.stats is not None:
        rstd, block, warps, mode = ctx.stats
        dx, dw = _liger_ops().rms_norm_backward(dy.contiguous(), x.contiguous().view(-1, x.shape[-1]), w, rstd,
                                                ctx.args[1], mode, block, warps, False, None, needs_dw=needs[1])
        return dx.view(x.shape) if needs[0] else None, dw, None, None, None
    dx, dw = _grads_through(_rms_norm_ref, (x, w), needs, (dy,), ctx.args)
    return dx, dw, None, None, None


# ---- add_rms_norm(a, b, w, eps, offset, casting) -> (norm(a + b), a + b)

def _add_rms_norm_setup(ctx, inputs, output):
    a, b, w, *args = inputs
    ctx.save_for_backward(output[1], w)  # the sum, as Liger keeps it; a and b are not needed
    ctx.args, ctx.stats = tuple(args), _take_stats(output)
    ctx.shapes = (a.shape, a.dtype), (b.shape, b.dtype)


def _add_rms_norm_backward(ctx, dy, ds):
    s, w = ctx.saved_tensors
    needs = ctx.needs_input_grad[:3]
    if ctx.stats is not None:
        rstd, block, warps, stages, mode = ctx.stats
        d_sum, _, dw = _liger_ops().fused_add_rms_norm_backward(
            dy.contiguous(), ds.contiguous(), s.contiguous(), w, rstd, ctx.args[1], mode, block, warps, stages, False,
            needs_dw=needs[2])
        d_sum = d_sum.view(s.shape)
    else:
        d_norm, dw = _grads_through(_rms_norm_ref, (s, w), (True, needs[2]), (dy,), ctx.args)
        d_sum = d_norm + ds
    da, db = (_sum_to(d_sum, shape, dtype) if need else None for need, (shape, dtype) in zip(needs[:2], ctx.shapes))
    return da, db, dw, None, None, None


def _sum_to(g, shape, dtype):
    return (g.sum_to_size(shape) if g.shape != shape else g).to(dtype)


# ---- gated_act(a, b, act) -> act(a) · b

def _gated_setup(ctx, inputs, output):
    a, b, act = inputs
    ctx.save_for_backward(a, b)
    ctx.act = act


def _gated_backward(ctx, dc):
    a, b = ctx.saved_tensors
    needs = ctx.needs_input_grad[:2]
    liger = _liger_for(a, b, dc)
    if liger is not None and _gated_kernel_covers(a, b, ctx.act):
        dtype = torch.result_type(a, b)
        bwd = liger.swiglu_backward if ctx.act == "silu" else liger.geglu_backward
        # Liger writes da, db over its a and b: give it private copies (a saved tensor may be read again)
        da, db = bwd(a.to(dtype).clone(memory_format=torch.contiguous_format),
                     b.to(dtype).clone(memory_format=torch.contiguous_format), dc.to(dtype).contiguous())
        return (da.view(a.shape).to(a.dtype) if needs[0] else None,
                db.view(b.shape).to(b.dtype) if needs[1] else None, None)
    da, db = _grads_through(_gated_ref, (a, b), needs, (dc,), (ctx.act,))
    return da, db, None


def _gated_kernel_covers(a, b, act):
    return a.shape == b.shape and act in ("silu", "gelu_tanh")


# ---- rotary(x, cos, sin, interleaved), rotary_pair(q, k, cos, sin, interleaved)

def _rotary_setup(ctx, inputs, output):
    *xs, cos, sin, interleaved = inputs
    trig_grad = any(ctx.needs_input_grad[len(xs):len(xs) + 2])
    # x only when cos/sin need a gradient (dx needs only cos and sin): RoPE keeps no activation otherwise
    ctx.save_for_backward(*(x if trig_grad else None for x in xs), cos, sin)
    ctx.n, ctx.interleaved = len(xs), interleaved
    ctx.meta = [(x.shape, x.dtype) for x in xs]
    ctx.stats = _take_stats(output)


def _rotary_backward(ctx, *grads):
    saved = ctx.saved_tensors
    xs, (cos, sin) = saved[:ctx.n], saved[ctx.n:]
    needs = ctx.needs_input_grad[:ctx.n + 2]
    if ctx.stats is not None:  # Liger's RoPE backward: the rotation by -θ, q and k in one kernel
        cos_c, sin_c = ctx.stats
        dq, dk = (_own_storage(g.to(cos_c.dtype)) for g in grads)
        dxs = _liger_ops().rope_backward(dq, dk, cos_c, sin_c)
    else:
        dxs = [g * cos + _unrotate(g * sin, ctx.interleaved) for g in grads]
    result = [_sum_to(d, shape, dtype) if need else None for d, need, (shape, dtype) in zip(dxs, needs, ctx.meta)]
    if needs[ctx.n] or needs[ctx.n + 1]:  # cos/sin computed from something that trains: the reference
        d_cos = sum(_like(g * x, cos) for g, x in zip(grads, xs)) if needs[ctx.n] else None
        d_sin = sum(_like(g * _rotate(x, ctx.interleaved), sin) for g, x in zip(grads, xs)) if needs[ctx.n + 1] else None
        result += [d_cos, d_sin]
    else:
        result += [None, None]
    return (*result, None)


# ---- linear_cross_entropy(h, w, b, target, ignore_index, reduction, upcast)

def _lce_setup(ctx, inputs, output):
    h, w, b, target, *args = inputs
    ctx.stats = _take_stats(output)
    # without statistics (CPU, fake tensors) the backward recomputes from the inputs; with them it needs none
    ctx.save_for_backward(h, w, b, target)
    ctx.args = tuple(args)


def _lce_backward(ctx, dloss):
    h, w, b, target = ctx.saved_tensors
    needs = ctx.needs_input_grad[:3]
    if ctx.stats is not None:  # the gradients Liger computed in the forward, scaled by the incoming one
        g_in, g_w, g_b = ctx.stats
        ctx.stats = None  # backward runs once; let them go with it
        scale = dloss.to(torch.float32)
        grads = [g.mul_(scale) if need and g is not None else None for g, need in zip((g_in, g_w, g_b), needs)]
        return (*grads, None, None, None, None)
    dh, dw, db = _grads_through(_lce_ref, (h, w, b), needs, (dloss,), (target, *ctx.args))
    return dh, dw, db, None, None, None, None


def _run(kernel, ref, *inputs):
    """The kernel's outputs (its statistics handed over on them) where it covers the case, else the reference's."""
    with torch.no_grad():
        got = kernel(*inputs)
        return ref(*inputs) if got is None else _hand_over(*got)


def _rms_norm(x: torch.Tensor, weight: Optional[torch.Tensor], eps: float, offset: float,
              casting: str) -> torch.Tensor:
    """``x · rsqrt(mean(x²) + eps) · (offset + weight)`` over the last axis; ``casting``: llama | gemma | none."""
    return _run(_rms_norm_kernel, _rms_norm_ref, x, weight, eps, offset, casting)


def _add_rms_norm_ref(a, b, weight, eps, offset, casting):
    s = a + b
    return _rms_norm_ref(s, weight, eps, offset, casting), s


def _add_rms_norm(a: torch.Tensor, b: torch.Tensor, weight: Optional[torch.Tensor], eps: float, offset: float,
                  casting: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rms_norm(a + b), a + b)``: a residual add and the norm of its result."""
    return _run(_add_rms_norm_kernel, _add_rms_norm_ref, a, b, weight, eps, offset, casting)


def _gated_act(a: torch.Tensor, b: torch.Tensor, act: str) -> torch.Tensor:
    """``act(a) · b``; ``act``: silu | gelu | gelu_tanh."""
    return _run(_gated_kernel, _gated_ref, a, b, act)


def _rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """``x · cos + rot(x) · sin`` (rotate-half, or interleaved pairs); cos/sin broadcast to x."""
    with torch.no_grad():
        return _rotary_ref(x, cos, sin, interleaved)


def _rotary_pair_ref(q, k, cos, sin, interleaved):
    return _rotary_ref(q, cos, sin, interleaved), _rotary_ref(k, cos, sin, interleaved)


def _rotary_pair(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                 interleaved: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``rotary`` of q and of k with the same cos/sin: (B, H, S, D) q and (B, Hkv, S, D) k."""
    return _run(_rotary_pair_kernel, _rotary_pair_ref, q, k, cos, sin, interleaved)


def _linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                          target: torch.Tensor, ignore_index: int, reduction: str, upcast: bool) -> torch.Tensor:
    """``cross_entropy(linear(hidden, weight, bias), target)`` with the logits never materialised on CUDA."""
    return _run(_lce_kernel, _lce_ref, hidden, weight, bias, target, ignore_index, reduction, upcast)


def _define(name: str, fn, ref, setup_context, backward):
    """Register ``evo_rewrite::name`` (schema from ``fn``'s annotations) with fake kernel ``ref`` and its autograd."""
    op = torch.library.custom_op(f"evo_rewrite::{name}", mutates_args=())(fn)
    op.register_fake(ref)
    op.register_autograd(backward, setup_context=setup_context)
    return op


rms_norm = _define("rms_norm", _rms_norm, _rms_norm_ref, _rms_norm_setup, _rms_norm_backward)
add_rms_norm = _define("add_rms_norm", _add_rms_norm, _add_rms_norm_ref, _add_rms_norm_setup, _add_rms_norm_backward)
gated_act = _define("gated_act", _gated_act, _gated_ref, _gated_setup, _gated_backward)
rotary = _define("rotary", _rotary, _rotary_ref, _rotary_setup, _rotary_backward)
rotary_pair = _define("rotary_pair", _rotary_pair, _rotary_pair_ref, _rotary_setup, _rotary_backward)
linear_cross_entropy = _define("linear_cross_entropy", _linear_cross_entropy, _lce_ref, _lce_setup, _lce_backward)

RMS_NORM = torch.ops.evo_rewrite.rms_norm.default
ADD_RMS_NORM = torch.ops.evo_rewrite.add_rms_norm.default
GATED_ACT = torch.ops.evo_rewrite.gated_act.default
ROTARY = torch.ops.evo_rewrite.rotary.default
ROTARY_PAIR = torch.ops.evo_rewrite.rotary_pair.default
LINEAR_CROSS_ENTROPY = torch.ops.evo_rewrite.linear_cross_entropy.default
FUSED_OPS = (RMS_NORM, ADD_RMS_NORM, GATED_ACT, ROTARY, ROTARY_PAIR, LINEAR_CROSS_ENTROPY)
