"""Fake (meta) kernels and autograd of the native vosops::local_attention op (C++ CPU and CUDA kernels).

Op outputs: (out (B, Cv, H, W), stats (B, H, W, 2) [log-sum-exp, threshold] in fp32 (fp64 for fp64 inputs),
top-k logits (B, H, W, topk) in q's dtype, top-k candidate indices (B, H, W, topk) int64; topk = 0: empty).
The backward recomputes the kept scores from q and k with the saved stats / top-k indices; gradients flow into
q, k, v through `out` and through the returned top-k logits; offsets are not differentiated.
"""

from __future__ import annotations

import torch

from .. import _native
from ._double_backward import refuse_double_backward


def stats_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def fake_forward(q, k, v, offsets, radius, dilation, scale, topk, normalize, window, border, return_topk):
    B, _, H, W = q.shape
    Cv = v.shape[2]
    return (
        q.new_empty((B, Cv, H, W)),
        q.new_empty((B, H, W, 2), dtype=stats_dtype(q.dtype)),
        q.new_empty((B, H, W, topk)),
        q.new_empty((B, H, W, topk), dtype=torch.long),
    )


def fake_backward(grad_out, grad_topk_logits, q, k, v, offsets, stats, topk_index, radius, dilation, scale, topk,
                  normalize, window, border, need_q, need_k, need_v):
    return (
        q.new_empty(q.shape) if need_q else q.new_empty(0),
        k.new_empty(k.shape) if need_k else k.new_empty(0),
        v.new_empty(v.shape) if need_v else v.new_empty(0),
    )


def autograd_rules(backward_op):
    """(backward, setup_context) for a local_attention forward op whose backward op has the native schema."""

    def setup_context(ctx, inputs, output):
        q, k, v, offsets, radius, dilation, scale, topk, normalize, window, border, _ = inputs
        _, stats, _, topk_index = output
        ctx.save_for_backward(q, k, v, offsets, stats, topk_index)
        ctx.args = (radius, dilation, scale, topk, normalize, window, border)
        ctx.mark_non_differentiable(stats, topk_index)

    def backward(ctx, grad_out, grad_stats, grad_logits, grad_index):
        q, k, v, offsets, stats, topk_index = ctx.saved_tensors
        need = ctx.needs_input_grad[:3]
        if grad_out is None:
            grad_out = torch.zeros((q.shape[0], v.shape[2], *q.shape[2:]), dtype=q.dtype, device=q.device)
        gq, gk, gv = backward_op(grad_out, grad_logits, q, k, v, offsets, stats, topk_index, *ctx.args, *need)
        return (gq if need[0] else None, gk if need[1] else None, gv if need[2] else None,
                None, None, None, None, None, None, None, None, None)

    return backward, setup_context


def _register() -> None:
    torch.library.register_fake("vosops::local_attention")(fake_forward)
    torch.library.register_fake("vosops::local_attention_backward")(fake_backward)
    refuse_double_backward("vosops::local_attention_backward")
    backward, setup_context = autograd_rules(torch.ops.vosops.local_attention_backward)
    torch.library.register_autograd("vosops::local_attention", backward, setup_context=setup_context)


if _native.LOADED and hasattr(torch.ops.vosops, "local_attention"):
    _register()
