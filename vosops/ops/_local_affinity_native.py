"""Fake (meta) kernels and autograd of the native vosops::local_affinity / local_aggregate ops (C++ CPU and CUDA).

local_affinity (q, k, offsets, radius, dilation, window, scale, border) -> logits (B, N, P, H, W): gradients flow
into q and k through the in-window, in-frame candidates (the others are constants); offsets are not differentiated.
local_aggregate (weights, v, offsets, radius, dilation) -> (B, Cv, H, W): gradients into weights (0 for
out-of-frame candidates) and v.
"""

from __future__ import annotations

import torch

from .. import _native


def _fake_affinity(q, k, offsets, radius, dilation, window, scale, border):
    B, _, H, W = q.shape
    return q.new_empty((B, k.shape[1], (2 * radius + 1) ** 2, H, W))


def _fake_affinity_backward(grad, q, k, offsets, radius, dilation, window, scale, need_q, need_k):
    return (q.new_empty(q.shape) if need_q else q.new_empty(0), k.new_empty(k.shape) if need_k else k.new_empty(0))


def _fake_aggregate(weights, v, offsets, radius, dilation):
    B, _, _, H, W = weights.shape
    return v.new_empty((B, v.shape[2], H, W))


def _fake_aggregate_backward(grad_out, weights, v, offsets, radius, dilation, need_weights, need_v):
    return (weights.new_empty(weights.shape) if need_weights else weights.new_empty(0),
            v.new_empty(v.shape) if need_v else v.new_empty(0))


def _affinity_setup(ctx, inputs, output):
    q, k, offsets, radius, dilation, window, scale, border = inputs
    ctx.save_for_backward(q, k, offsets)
    ctx.args = (radius, dilation, window, scale)


def _affinity_backward(ctx, grad):
    q, k, offsets = ctx.saved_tensors
    need = ctx.needs_input_grad
    gq, gk = torch.ops.vosops.local_affinity_backward(grad, q, k, offsets, *ctx.args, need[0], need[1])
    return (gq if need[0] else None), (gk if need[1] else None), None, None, None, None, None, None


def _aggregate_setup(ctx, inputs, output):
    weights, v, offsets, radius, dilation = inputs
    ctx.save_for_backward(weights, v, offsets)
    ctx.args = (radius, dilation)


def _aggregate_backward(ctx, grad_out):
    weights, v, offsets = ctx.saved_tensors
    need = ctx.needs_input_grad
    gw, gv = torch.ops.vosops.local_aggregate_backward(grad_out, weights, v, offsets, *ctx.args, need[0], need[1])
    return (gw if need[0] else None), (gv if need[1] else None), None, None, None


def _register() -> None:
    torch.library.register_fake("vosops::local_affinity")(_fake_affinity)
    torch.library.register_fake("vosops::local_affinity_backward")(_fake_affinity_backward)
    torch.library.register_fake("vosops::local_aggregate")(_fake_aggregate)
    torch.library.register_fake("vosops::local_aggregate_backward")(_fake_aggregate_backward)
    torch.library.register_autograd("vosops::local_affinity", _affinity_backward, setup_context=_affinity_setup)
    torch.library.register_autograd("vosops::local_aggregate", _aggregate_backward, setup_context=_aggregate_setup)


if _native.LOADED and hasattr(torch.ops.vosops, "local_affinity"):
    _register()
