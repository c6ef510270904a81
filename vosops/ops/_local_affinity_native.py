"""Fake (meta) kernels and autograd of the vosops::local_affinity / local_aggregate ops: registered here for the native
ops (C++ CPU and CUDA); the Triton ops (vosops/triton/local_affinity.py) reuse the same rules.

local_affinity (q, k, offsets, radius, dilation, window, scale, border) -> logits (B, N, P, H, W): gradients flow
into q and k through the in-window, in-frame candidates (the others are constants); offsets are not differentiated.
local_aggregate (weights, v, offsets, radius, dilation) -> (B, Cv, H, W): gradients into weights (0 for
out-of-frame candidates) and v.
"""

from __future__ import annotations

import torch

from .. import _native
from ._double_backward import refuse_double_backward


def fake_affinity(q, k, offsets, radius, dilation, window, scale, border):
    B, _, H, W = q.shape
    return q.new_empty((B, k.shape[1], (2 * radius + 1) ** 2, H, W))


def fake_affinity_backward(grad, q, k, offsets, radius, dilation, window, scale, need_q, need_k):
    return (q.new_empty(q.shape) if need_q else q.new_empty(0), k.new_empty(k.shape) if need_k else k.new_empty(0))


def fake_aggregate(weights, v, offsets, radius, dilation):
    B, _, _, H, W = weights.shape
    return v.new_empty((B, v.shape[2], H, W))


def fake_aggregate_backward(grad_out, weights, v, offsets, radius, dilation, need_weights, need_v):
    return (weights.new_empty(weights.shape) if need_weights else weights.new_empty(0),
            v.new_empty(v.shape) if need_v else v.new_empty(0))


def affinity_autograd_rules(backward_op):
    """(backward, setup_context) of a local_affinity op whose backward op has the native schema (the native and the
    Triton ops share them)."""

    def setup(ctx, inputs, output):
        q, k, offsets, radius, dilation, window, scale, border = inputs
        ctx.save_for_backward(q, k, offsets)
        ctx.args = (radius, dilation, window, scale)

    def backward(ctx, grad):
        q, k, offsets = ctx.saved_tensors
        need = ctx.needs_input_grad
        gq, gk = backward_op(grad, q, k, offsets, *ctx.args, need[0], need[1])
        return (gq if need[0] else None), (gk if need[1] else None), None, None, None, None, None, None

    return backward, setup


def aggregate_autograd_rules(backward_op):
    """(backward, setup_context) of a local_aggregate op, as affinity_autograd_rules."""

    def setup(ctx, inputs, output):
        weights, v, offsets, radius, dilation = inputs
        ctx.save_for_backward(weights, v, offsets)
        ctx.args = (radius, dilation)

    def backward(ctx, grad_out):
        weights, v, offsets = ctx.saved_tensors
        need = ctx.needs_input_grad
        gw, gv = backward_op(grad_out, weights, v, offsets, *ctx.args, need[0], need[1])
        return (gw if need[0] else None), (gv if need[1] else None), None, None, None

    return backward, setup


def _register() -> None:
    torch.library.register_fake("vosops::local_affinity")(fake_affinity)
    torch.library.register_fake("vosops::local_affinity_backward")(fake_affinity_backward)
    refuse_double_backward("vosops::local_affinity_backward")
    torch.library.register_fake("vosops::local_aggregate")(fake_aggregate)
    torch.library.register_fake("vosops::local_aggregate_backward")(fake_aggregate_backward)
    refuse_double_backward("vosops::local_aggregate_backward")
    backward, setup = affinity_autograd_rules(lambda *a: torch.ops.vosops.local_affinity_backward(*a))
    torch.library.register_autograd("vosops::local_affinity", backward, setup_context=setup)
    backward, setup = aggregate_autograd_rules(lambda *a: torch.ops.vosops.local_aggregate_backward(*a))
    torch.library.register_autograd("vosops::local_aggregate", backward, setup_context=setup)


if _native.LOADED and hasattr(torch.ops.vosops, "local_affinity"):
    _register()
