"""Top-k configurations: topk_attention (JointFormer) and global_topk (Mask-VOS / INO memory readout).

jointformer-davis-1f / -3f : 12 heads, D=64, M=1620 query tokens (30x54) = dense_keys, memory 1 frame (topk 60)
                             or 3 frames (topk 120); fp16 and fp32 on GPU. The -cpu variants are quarter size
                             (M=405), fp32.
maskvos-480p               : global_topk, M=6420, L=6*6420, C=128, k=10 (-cpu: M=1605, L=6*1605)
ino-global                 : global_topk, M=6360, L=11*6360, C=384, k=5 (-cpu: M=1590, L=11*1590)
Baselines: the torch pipeline the papers use (matmul, topk, softmax, scatter, matmul; for global_topk matmul +
topk), and F.scaled_dot_product_attention without top-k as the GPU speed reference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import vosops
from vosops import _backends

from .registry import Case

ATTENTION = {
    "jointformer-davis-1f": dict(M=1620, T=1, topk=60, devices=("cuda",), dtypes=("float16", "float32")),
    "jointformer-davis-3f": dict(M=1620, T=3, topk=120, devices=("cuda",), dtypes=("float16", "float32")),
    "jointformer-davis-1f-cpu": dict(M=405, T=1, topk=60, devices=("cpu",), dtypes=("float32",)),
    "jointformer-davis-3f-cpu": dict(M=405, T=3, topk=120, devices=("cpu",), dtypes=("float32",)),
}
GLOBAL = {
    "maskvos-480p": dict(M=6420, frames=6, C=128, k=10, devices=("cuda",)),
    "ino-global": dict(M=6360, frames=11, C=384, k=5, devices=("cuda",)),
    "maskvos-480p-cpu": dict(M=1605, frames=6, C=128, k=10, devices=("cpu",)),
    "ino-global-cpu": dict(M=1590, frames=11, C=384, k=5, devices=("cpu",)),
}
HEADS, HEAD_DIM = 12, 64


def jointformer_pipeline(q, k, v, topk, dense_keys):
    """JointFormer's top-k filter as written in PyTorch: full affinity, topk over the memory part, scatter the
    kept logits into -inf, one softmax, matmul."""
    s = torch.matmul(q, k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    cur, mem = s[..., :dense_keys], s[..., dense_keys:]
    vals, idx = torch.topk(mem, topk, dim=-1)
    mem = torch.full_like(mem, float("-inf")).scatter_(-1, idx, vals)
    return torch.matmul(torch.softmax(torch.cat([cur, mem], -1), -1), v)


def matmul_topk(q, k, topk):
    """What Mask-VOS / INO code does for a global search: the full affinity, then torch.topk."""
    return torch.topk(torch.matmul(q, k.transpose(1, 2)), topk, dim=-1)


def _usable(backend: str, op: str, device: str) -> bool:
    return _backends.why_unusable(backend, op, device) is None and not (backend == "triton" and device == "cpu")


def _attention_impls(device):
    impls = {
        "pipeline": jointformer_pipeline,
        "sdpa": lambda q, k, v, topk, dense: F.scaled_dot_product_attention(q, k, v),
    }
    from ..ops.topk import ATTENTION_BACKENDS

    for b in ("cpu", "cuda", "triton"):
        if b in ATTENTION_BACKENDS and _usable(b, "topk_attention", device):
            impls[b] = lambda q, k, v, topk, dense, _b=b: vosops.topk_attention(q, k, v, topk=topk,
                                                                                 dense_keys=dense, backend=_b)
    return impls


def _attention_cases(device):
    out = []
    for config, spec in ATTENTION.items():
        if device not in spec["devices"]:
            continue
        M, T, topk = spec["M"], spec["T"], spec["topk"]
        L = M * (1 + T)
        kept = M + topk  # keys each query attends to: the dense prefix (M tokens) and its top-k
        # Forward: the scores of every key (the top-k needs them all) and P·V over the kept keys. Backward:
        # FlashAttention's 2.5x of a forward's 4·M·kept·D over the kept keys (scores recomputed, dP, dQ, dK, dV):
        # the other keys are scored only to be dropped and take no part in the gradient.
        flops = 2 * HEADS * M * L * HEAD_DIM + 2 * HEADS * M * kept * HEAD_DIM
        bwd_flops = 2.5 * 4 * HEADS * M * kept * HEAD_DIM
        for dtype_name in spec["dtypes"]:
            dtype = getattr(torch, dtype_name)
            for impl, fn in _attention_impls(device).items():
                def make(requires_grad, fn=fn, M=M, L=L, topk=topk, dtype=dtype):
                    q = torch.randn(1, HEADS, M, HEAD_DIM, device=device, dtype=dtype, requires_grad=requires_grad)
                    k = torch.randn(1, HEADS, L, HEAD_DIM, device=device, dtype=dtype, requires_grad=requires_grad)
                    v = torch.randn(1, HEADS, L, HEAD_DIM, device=device, dtype=dtype, requires_grad=requires_grad)
                    return q, k, v, lambda: fn(q, k, v, topk, M)

                def setup_fwd(make=make):
                    return make(False)[3]

                def setup_bwd(make=make):
                    q, k, v, call = make(True)
                    o = call()
                    g = torch.randn_like(o)
                    return lambda: torch.autograd.grad(o, (q, k, v), g, retain_graph=True)

                common = dict(op="topk", config=config, device=device, impl=impl, baseline=impl == "pipeline",
                              dtype=dtype_name, notes="topk_attention")
                out.append(Case(direction="fwd", setup=setup_fwd, flops=flops, **common))
                out.append(Case(direction="bwd", setup=setup_bwd, flops=bwd_flops, **common))
    return out


def _global_impls(device):
    # The tiled reference is left out: it is a definition, 20-40x slower than the baseline here.
    impls = {"matmul+topk": lambda q, k, topk: matmul_topk(q, k, topk)}
    for b in ("cpu", "cuda", "triton"):
        if b in vosops.ops.topk.GLOBAL_TOPK_BACKENDS and _usable(b, "global_topk", device):
            impls[b] = lambda q, k, topk, _b=b: vosops.global_topk(q, k, topk=topk, backend=_b)
    return impls


def _global_cases(device):
    out = []
    for config, spec in GLOBAL.items():
        if device not in spec["devices"]:
            continue
        M, C, topk = spec["M"], spec["C"], spec["k"]
        L = M * spec["frames"]
        for impl, fn in _global_impls(device).items():
            def setup(fn=fn, M=M, L=L, C=C, topk=topk):
                q = F.normalize(torch.randn(1, M, C, device=device), dim=-1)
                k = F.normalize(torch.randn(1, L, C, device=device), dim=-1)
                return lambda: fn(q, k, topk)

            out.append(Case(op="topk", config=config, device=device, impl=impl, direction="fwd", setup=setup,
                            flops=2 * M * L * C, bytes=4 * (M + L) * C, baseline=impl == "matmul+topk",
                            notes="global_topk"))
    return out


def cases(device: str) -> list[Case]:
    return _attention_cases(device) + _global_cases(device)
