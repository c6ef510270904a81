"""Fake kernels and autograd rules of topk_aggregate and merge_topk, shared by the native (C++/CUDA) and Triton ops.

merge_topk's ops take the candidate lists concatenated, logits/index (B, M, N), and return (logits, index, source)
(B, M, topk): `source` is each output's position among the N inputs (-1 for padding). The backward is that
gather's transpose, a scatter of O(B·M·topk): plain tensor ops, the same for every backend.
"""

from __future__ import annotations

import torch


def merge_fake(logits, index, topk):
    B, M, _ = logits.shape
    return (logits.new_empty(B, M, topk), index.new_empty(B, M, topk), index.new_empty(B, M, topk))


def merge_setup(ctx, inputs, output):
    logits, _index, _topk = inputs
    ctx.save_for_backward(output[2])
    ctx.n = logits.shape[2]


def merge_backward(ctx, grad_logits, _grad_index, _grad_source):
    (source,) = ctx.saved_tensors
    B, M, _ = source.shape
    picked = source >= 0
    g = torch.where(picked, grad_logits, torch.zeros_like(grad_logits))
    out = grad_logits.new_zeros(B, M, ctx.n).scatter_add_(2, torch.where(picked, source, 0), g)
    return out, None, None


def aggregate_fake(logits, index, values, normalize, k):
    B, M, _ = logits.shape
    return values.new_empty(B, M, values.shape[2])


def aggregate_backward_fake(grad_out, logits, index, values, normalize, k, need_logits, need_values):
    gl = logits.new_empty(logits.shape) if need_logits else logits.new_empty(0)
    gv = values.new_empty(values.shape) if need_values else values.new_empty(0)
    return gl, gv


def aggregate_autograd_rules(backward_op):
    """(backward, setup_context) for a topk_aggregate forward op; backward_op has topk_aggregate_backward's schema."""

    def setup_context(ctx, inputs, output):
        logits, index, values, normalize, k = inputs
        ctx.save_for_backward(logits, index, values)
        ctx.normalize, ctx.k = normalize, k

    def backward(ctx, grad_out):
        logits, index, values = ctx.saved_tensors
        nl, nv = ctx.needs_input_grad[0], ctx.needs_input_grad[2]
        gl, gv = backward_op(grad_out, logits, index, values, ctx.normalize, ctx.k, nl, nv)
        return (gl if nl else None), None, (gv if nv else None), None, None

    return backward, setup_context


def register_native() -> None:
    """Fake and autograd of the native merge_topk (topk_aggregate's are registered with the other topk ops)."""
    torch.library.register_fake("vosops::merge_topk")(merge_fake)
    torch.library.register_autograd("vosops::merge_topk", merge_backward, setup_context=merge_setup)
