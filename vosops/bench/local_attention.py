"""local_attention standard configurations (issue 3), each also at quarter resolution (H/4, W/4) for the CPU.

mamp-480p : q (1, 64, 120, 214), N=5, Cv=7, r=12, top-36, scale 1/8, border zero, integer offsets in [-16, 16]
ino-480p  : q (1, 384, 60, 106), N=11, Cv=7, r=40, threshold k=5, scale 1/0.1, L2-normalised features
crw-480p  : q (1, 128, 60, 107), N=20, Cv=7, circle r=12, top-10, scale 1/0.05, L2-normalised features
mamp-train: q (24, 64, 64, 64), N=1, Cv=3, r=6, softmax over all 169, border zero; forward and forward+backward

Baselines: `glue_local_attention`, what users write today (per reference: the keys and values displaced by the
rounded offsets, F.unfold of the zero-padded frame, then torch.cat over references, torch.topk / threshold,
softmax, torch.gather of the values), and the reference (vosops.reference, row-chunked). The glue is the
baseline speed-ups are measured against.

mamp-480p-smooth: mamp-480p with smooth offsets (a random field in [-16, 16] on a 16-pixel grid, bilinearly
upsampled, as optical flow is): the windows of neighbouring queries move together, which mamp-480p's independent
per-pixel offsets rule out; the query-tile Triton kernels are built for this case.

mamp-train-masked: mamp-train with border="mask", the single-reference, no-top-k case FlexAttention can express
(a neighbourhood block mask; out-of-frame keys simply absent). There the baseline is compiled FlexAttention.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

import vosops
from vosops import _backends
from vosops import reference as ref
from vosops.reference.local_attention import round_offsets, window_columns

from .registry import Case

# name: (B, C, Cv, H, W, N, kwargs, offsets, l2-normalised features, devices)
FULL = {
    "mamp-480p": (1, 64, 7, 120, 214, 5, dict(radius=12, topk=36, scale=1 / 8, border="zero"), True, False),
    "ino-480p": (1, 384, 7, 60, 106, 11, dict(radius=40, topk=5, normalize="threshold", scale=10.0), False, True),
    "crw-480p": (1, 128, 7, 60, 107, 20, dict(radius=12, topk=10, window="circle", scale=20.0), False, True),
    "mamp-train": (24, 64, 3, 64, 64, 1, dict(radius=6, scale=1 / 8, border="zero"), False, False),
}
FULL["mamp-480p-smooth"] = (*FULL["mamp-480p"][:7], "smooth", False)
# The case FlexAttention can express: one reference, softmax over the whole window, out-of-frame keys excluded.
FULL["mamp-train-masked"] = (*FULL["mamp-train"][:6], dict(FULL["mamp-train"][6], border="mask"), False, False)
TRAIN = {"mamp-train", "mamp-train-masked"}
FLEX = {"mamp-train-masked"}
_GLUE_CHUNK = 1 << 25  # unfolded elements per row band (128 MB in fp32)


def _quarter(spec):
    B, C, Cv, H, W, *rest = spec
    return (B, C, Cv, math.ceil(H / 4), math.ceil(W / 4), *rest)


CONFIGS = {**{k: (v, ("cuda",)) for k, v in FULL.items()},
           **{f"{k}-quarter": (_quarter(v), ("cpu", "cuda")) for k, v in FULL.items()}}


def _displace(x: torch.Tensor, oi: torch.Tensor | None) -> torch.Tensor:
    """x (B, C, H, W) read at p + rounded offset (B, 2, H, W), zero outside the frame (a nearest warp)."""
    if oi is None:
        return x
    B, C, H, W = x.shape
    ii = torch.arange(H, device=x.device).view(1, H, 1) + oi[:, 1]
    jj = torch.arange(W, device=x.device).view(1, 1, W) + oi[:, 0]
    inside = (ii >= 0) & (ii < H) & (jj >= 0) & (jj < W)
    idx = (ii.clamp(0, H - 1) * W + jj.clamp(0, W - 1)).view(B, 1, H * W).expand(B, C, H * W)
    return torch.gather(x.reshape(B, C, H * W), 2, idx).view(B, C, H, W) * inside.unsqueeze(1).to(x.dtype)


def _unfold_rows(x: torch.Tensor, r: int, i0: int, i1: int) -> torch.Tensor:
    """Zero-padded (2r+1)^2 windows of rows [i0, i1) of x (B, C, H, W): (B, C, P, (i1-i0)*W), F.unfold order."""
    B, C, H, W = x.shape
    band = F.pad(x, (r, r, r, r))[:, :, i0 : i1 + 2 * r]
    return F.unfold(band, kernel_size=2 * r + 1).view(B, C, (2 * r + 1) ** 2, (i1 - i0) * W)


def glue_local_attention(q, k, v, *, radius, scale=1.0, topk=None, normalize="softmax", window="square",
                         offsets=None, border="zero"):
    """The users' glue: per reference, keys/values displaced by the rounded offsets (a nearest warp), F.unfold of the
    zero-padded frame, torch.cat over references, torch.topk (or the threshold rule), softmax, torch.gather.

    Zero borders only (what F.unfold gives). Without offsets it equals the fused op exactly; with offsets it is the
    warp-then-unfold approximation users write (it differs near borders and where the offsets vary in a window),
    kept because its cost is what the fused op replaces."""
    assert border == "zero"
    B, N, C, H, W = k.shape
    Cv = v.shape[2]
    P = (2 * radius + 1) ** 2
    oi = round_offsets(offsets, radius) if offsets is not None else None
    keep = window_columns(radius, window)
    excluded = torch.ones(P, dtype=torch.bool, device=q.device)
    excluded[keep] = False
    rows = max(1, _GLUE_CHUNK // (B * max(C, Cv) * P * W))
    outs = []
    for i0 in range(0, H, rows):
        i1 = min(H, i0 + rows)
        qb = q[:, :, i0:i1].reshape(B, C, 1, -1)
        corr, vals = [], []
        for n in range(N):
            kn = _displace(k[:, n], None if oi is None else oi[:, n])
            vn = _displace(v[:, n], None if oi is None else oi[:, n])
            c = (_unfold_rows(kn, radius, i0, i1) * qb).sum(1) * scale  # (B, P, h*W)
            corr.append(c.masked_fill(excluded.view(1, P, 1), float("-inf")))
            vals.append(_unfold_rows(vn, radius, i0, i1))  # (B, Cv, P, h*W)
        corr = torch.cat(corr, 1)
        vals = torch.cat(vals, 2)
        if topk is not None and normalize == "softmax":
            top, idx = torch.topk(corr, topk, dim=1)
            w = F.softmax(top, dim=1)
            sel = torch.gather(vals, 2, idx.unsqueeze(1).expand(B, Cv, topk, idx.shape[-1]))
            outs.append((sel * w.unsqueeze(1)).sum(2))
        else:
            if topk is not None:  # threshold: keep every logit >= the k-th largest
                kth = torch.topk(corr, topk, dim=1).values[:, -1:]
                corr = corr.masked_fill(corr < kth, float("-inf"))
            w = F.softmax(corr, dim=1)
            outs.append((vals * w.unsqueeze(1)).sum(2))
    return torch.cat(outs, 2).view(B, Cv, H, W)


_FLEX_VALUE_DIM = 16  # FlexAttention's smallest value head dimension; the values are zero-padded up to it


def flex_local_attention_fn(H: int, W: int, radius: int, device: str, compile: bool = True):
    """Compiled FlexAttention over one reference frame with a (2r+1)^2 neighbourhood block mask, in vosops' layout:
    q (B, C, H, W), k (B, 1, C, H, W), v (B, 1, Cv, H, W) -> (B, Cv, H, W). The layout changes to and from
    FlexAttention's (B, heads, tokens, dim) are part of what a user of it pays, so they are timed with it."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    def neighbourhood(b, h, qi, ki):
        return ((qi // W - ki // W).abs() <= radius) & ((qi % W - ki % W).abs() <= radius)

    block_mask = create_block_mask(neighbourhood, None, None, H * W, H * W, device=device)
    flex = torch.compile(flex_attention, fullgraph=True, dynamic=False) if compile else flex_attention

    def run(q, k, v, *, scale=1.0, **_):
        B, Cv = q.shape[0], v.shape[2]
        tokens = lambda x: x.flatten(2).transpose(1, 2).unsqueeze(1)  # noqa: E731  (B, 1, H*W, C)
        vv = F.pad(tokens(v[:, 0]), (0, max(0, _FLEX_VALUE_DIM - Cv)))
        out = flex(tokens(q), tokens(k[:, 0]), vv, block_mask=block_mask, scale=scale)
        return out[:, 0, :, :Cv].transpose(1, 2).reshape(B, Cv, H, W)

    return run


def _inputs(spec, device, requires_grad=False, seed=0):
    B, C, Cv, H, W, N, kw, with_offsets, l2 = spec
    g = torch.Generator(device="cpu").manual_seed(seed)
    q = torch.randn(B, C, H, W, generator=g)
    k = torch.randn(B, N, C, H, W, generator=g)
    if l2:
        q, k = F.normalize(q, dim=1), F.normalize(k, dim=2)
    v = torch.rand(B, N, Cv, H, W, generator=g)
    t = {"q": q.to(device), "k": k.to(device), "v": v.to(device)}
    if requires_grad:
        for x in t.values():
            x.requires_grad_()
    if with_offsets == "smooth":
        coarse = torch.randint(-16, 17, (B * N, 2, H // 16 + 2, W // 16 + 2), generator=g).float()
        flow = F.interpolate(coarse, size=(H, W), mode="bilinear", align_corners=True)
        t["offsets"] = flow.round().view(B, N, 2, H, W).to(device)
    elif with_offsets:
        t["offsets"] = torch.randint(-16, 17, (B, N, 2, H, W), generator=g).float().to(device)
    return t, dict(kw)


def _impls(device: str, config: str, spec):
    impls = {"reference": lambda q, k, v, **kw: ref.local_attention(q, k, v, **kw)}
    if config.replace("-quarter", "") in FLEX:
        H, W, kw = spec[3], spec[4], spec[6]

        def flex(q, k, v, _cache={}, **kw_):  # compiled on the first call (in setup, before any timing)
            if "fn" not in _cache:
                _cache["fn"] = flex_local_attention_fn(H, W, kw["radius"], device)
            return _cache["fn"](q, k, v, **kw_)

        impls = {"flex_attention": flex, **impls}
    else:
        impls = {"glue": glue_local_attention, **impls}
    for b in ("cpu", "cuda", "triton"):
        if _backends.why_unusable(b, "local_attention", device) is None and not (b == "triton" and device == "cpu"):
            impls[b] = lambda q, k, v, _b=b, **kw: vosops.local_attention(q, k, v, backend=_b, **kw)
    return impls


def _flops(spec) -> float:
    """Multiply-adds as 2: a dot product per in-frame candidate (counted at zero offsets; out-of-frame ones cost
    none) plus the value sum over the kept ones."""
    B, C, Cv, H, W, N, kw, *_ = spec
    r = kw["radius"]
    D = 2 * r + 1
    in_frame = sum(max(0, H - abs(p // D - r)) * max(0, W - abs(p % D - r))
                   for p in window_columns(r, kw.get("window", "square")))
    kept = kw.get("topk") or N * in_frame / (H * W)
    return 2.0 * B * N * in_frame * C + 2.0 * B * H * W * kept * Cv


def cases(device: str) -> list[Case]:
    out = []
    for config, (spec, devices) in CONFIGS.items():
        if device not in devices:
            continue
        base = config.replace("-quarter", "")
        for impl, fn in _impls(device, config, spec).items():
            compiled = impl == "flex_attention"  # compiled on first use: warm it up outside the timed calls

            def setup_fwd(fn=fn, spec=spec, compiled=compiled):
                t, kw = _inputs(spec, device)
                if compiled:
                    fn(**t, **kw)
                return lambda: fn(**t, **kw)

            # the glue and the reference take 8-200 s a call at these windows on a 2-core CPU
            slow = device == "cpu" and impl in ("glue", "reference") and base in ("ino-480p", "crw-480p")
            common = dict(op="local_attention", config=config, device=device, impl=impl,
                          baseline=impl in ("glue", "flex_attention"), slow=slow)
            out.append(Case(direction="fwd", setup=setup_fwd, flops=_flops(spec), **common))
            if base in TRAIN:
                def setup_fwdbwd(fn=fn, spec=spec, compiled=compiled):
                    t, kw = _inputs(spec, device, requires_grad=True)
                    diff = (t["q"], t["k"], t["v"])

                    def step():
                        o = fn(**t, **kw)
                        return torch.autograd.grad(o, diff, torch.ones_like(o))

                    if compiled:
                        step()
                    return step

                if compiled and device == "cpu":
                    continue  # FlexAttention has no CPU backward (torch 2.13): the reference is that group's baseline
                if base in FLEX and device == "cpu" and impl == "reference":
                    common = dict(common, baseline=True)
                out.append(Case(direction="fwd+bwd", setup=setup_fwdbwd, flops=3 * _flops(spec), **common))
    return out
