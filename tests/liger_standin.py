"""A CPU stand-in for the part of Liger-Kernel's functional API that ``evo_rewrite.fused_ops`` calls.

Same names, arguments and return values as ``liger_kernel.ops`` 0.8.5 (``rms_norm_forward`` returns
``(Y, X, RSTD, BLOCK_SIZE, num_warps, casting_mode)``, ``swiglu_backward`` writes da, db over its a and
b, ``rope_forward`` squeezes cos/sin, ``fused_linear_cross_entropy_forward`` computes the gradients in
the forward, ...), computed with torch ops in fp32. With it the CUDA code paths — statistics handed from
forward to backward, no recomputation — run and are checked on the CPU. Not a kernel: a test double.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

CALLS: list[str] = []  # names of the functions called, in order


def _log(name):
    CALLS.append(name)


def _norm_fwd(x, w, eps, offset, casting):
    xf = x.float() if casting in ("llama", "gemma") else x
    rstd = torch.rsqrt(xf.pow(2).mean(-1) + eps)
    h = xf * rstd[:, None]
    if casting == "gemma":
        y = (h * (w.float() + offset)).to(x.dtype)
    elif casting == "llama":
        y = h.to(x.dtype) * (w + offset)
    else:
        y = h * (w + offset)
    return y, rstd


def _norm_bwd(dy, x, w, rstd, offset, casting):
    with torch.enable_grad():
        xl, wl = x.detach().requires_grad_(), w.detach().requires_grad_()
        xf = xl.float() if casting in ("llama", "gemma") else xl
        h = xf * rstd[:, None]  # rstd held fixed: differentiate it by hand below
        if casting == "gemma":
            y = (h * (wl.float() + offset)).to(x.dtype)
        elif casting == "llama":
            y = h.to(x.dtype) * (wl + offset)
        else:
            y = h * (wl + offset)
        dh, dw = torch.autograd.grad(y, (h, wl), dy)
    # h = x · r, r = (mean(x²) + eps)^-½: dx = r · dh - x · r³ · mean(dh · x)
    xf = x.float() if casting in ("llama", "gemma") else x
    dx = rstd[:, None] * dh - xf * rstd[:, None] ** 3 * (dh * xf).mean(-1, keepdim=True)
    return dx.to(x.dtype), dw


def rms_norm_forward(X, W, eps, offset, casting_mode, row_mode):
    _log("rms_norm_forward")
    shape = X.shape
    X = X.view(-1, shape[-1])
    Y, RSTD = _norm_fwd(X, W, eps, offset, casting_mode)
    return Y.view(*shape), X, RSTD, 1024, 4, casting_mode


def rms_norm_backward(dY, X, W, RSTD, offset, casting_mode, BLOCK_SIZE, num_warps, in_place, row_mode, needs_dw=None):
    _log("rms_norm_backward")
    shape = dY.shape
    dX, dW = _norm_bwd(dY.reshape(-1, shape[-1]), X, W, RSTD, offset, casting_mode)
    return dX.view(*shape), (dW if needs_dw is not False else None)


def fused_add_rms_norm_forward(X, R, W, eps, offset, casting_mode):
    _log("fused_add_rms_norm_forward")
    shape = X.shape
    S = (X + R).view(-1, shape[-1])
    Y, RSTD = _norm_fwd(S, W, eps, offset, casting_mode)
    return Y.view(*shape), S.view(*shape), RSTD, 1024, 4, 1, casting_mode


def fused_add_rms_norm_backward(dY, dS_out, S, W, RSTD, offset, casting_mode, BLOCK_SIZE, num_warps, num_stages,
                                in_place, needs_dw=None):
    _log("fused_add_rms_norm_backward")
    shape = dY.shape
    dX, dW = _norm_bwd(dY.reshape(-1, shape[-1]), S.reshape(-1, shape[-1]), W, RSTD, offset, casting_mode)
    dX = dX.view(*shape) + dS_out
    return dX, dX, (dW if needs_dw is not False else None)


def _gated(a, b, act):
    return (F.silu(a) if act == "silu" else F.gelu(a, approximate="tanh")) * b


def _gated_fwd(name, act):
    def forward(a, b, *rest):
        _log(name)
        return a, b, _gated(a, b, act)
    return forward


def _gated_bwd(name, act):
    def backward(a, b, dc, *rest):  # writes da, db over a and b, as Liger's kernels do
        _log(name)
        with torch.enable_grad():
            al, bl = a.detach().requires_grad_(), b.detach().requires_grad_()
            da, db = torch.autograd.grad(_gated(al, bl, act), (al, bl), dc)
        a.copy_(da)
        b.copy_(db)
        return a, b
    return backward


swiglu_forward, swiglu_backward = _gated_fwd("swiglu_forward", "silu"), _gated_bwd("swiglu_backward", "silu")
geglu_forward, geglu_backward = _gated_fwd("geglu_forward", "gelu_tanh"), _gated_bwd("geglu_backward", "gelu_tanh")


def _rot(x):
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


def _squeeze(cos):
    return cos.squeeze(1) if cos.dim() == 4 else cos


def rope_forward(q, k, cos, sin, position_ids=None, unsqueeze_dim=1, rotary_dim=None):
    _log("rope_forward")
    c, s = _squeeze(cos).contiguous(), _squeeze(sin).contiguous()
    qt, kt = q.transpose(1, 2).contiguous(), k.transpose(1, 2).contiguous()  # (B, S, H, D), written in place
    for t in (qt, kt):
        t.copy_(t * c[:, :, None] + _rot(t) * s[:, :, None])
    return qt.transpose(1, 2), kt.transpose(1, 2), c, s


def rope_backward(dq, dk, cos, sin, position_ids=None, unsqueeze_dim=1, rotary_dim=None):
    _log("rope_backward")
    out = []
    for g in (dq, dk):
        gt = g.transpose(1, 2).contiguous()
        gt.copy_(gt * cos[:, :, None] + _rot(gt * sin[:, :, None]) * -1)
        out.append(gt.transpose(1, 2))
    return tuple(out)


def fused_linear_cross_entropy_forward(_input, weight, target, ce_weight=None, bias=None, ignore_index=-100,
                                       lse_square_scale=0.0, label_smoothing=0.0, reduction="mean", softcap=None,
                                       return_z_loss=False, compute_gradients=None, weight_requires_grad=None, **_):
    _log("fused_linear_cross_entropy_forward")
    grads = _input.requires_grad if compute_gradients is None else compute_gradients
    logits = F.linear(_input, weight, bias).float()  # (BT, V); Liger never holds all of it: a stand-in may
    loss = F.cross_entropy(logits, target, ignore_index=ignore_index, reduction=reduction)
    g_in = g_w = g_b = None
    if grads:  # computed here, in the forward, by hand (this runs below autograd, as a kernel does)
        valid = target != ignore_index
        d = torch.softmax(logits, -1)
        d[valid, target[valid]] -= 1
        d[~valid] = 0
        if reduction == "mean":
            d /= valid.sum()
        d = d.to(_input.dtype)
        g_in = d @ weight
        g_w = d.t() @ _input if weight_requires_grad is not False else None
        g_b = d.sum(0) if bias is not None else None
    return loss, None, None, None, g_in, g_w, g_b


def fused_linear_cross_entropy_backward(grad_output, grad_input, grad_weight, grad_bias):
    return tuple(g * grad_output if g is not None else None for g in (grad_input, grad_weight, grad_bias))
