"""local_affinity / local_aggregate (the unfused pieces of local attention), at MAMP's configurations.

mamp-480p : q (1, 64, 120, 214), N=5, Cv=7, r=12, scale 1/8, border zero, integer offsets in [-16, 16]
mamp-train: q (24, 64, 64, 64), N=1, Cv=3, r=6, border zero, no offsets; forward and forward+backward
each also at quarter resolution (H/4, W/4) for the CPU (the full sizes on CUDA only).

local_affinity cases time the logits (B, N, P, H, W); local_aggregate cases aggregate the values by given weights
of that shape. Baselines: the users' glue (per reference, keys/values displaced by the rounded offsets, F.unfold of
the zero-padded frame, a product with q / the weights), which is what speed-ups are measured against, and the
reference (vosops.reference, row-chunked).
"""

from __future__ import annotations

import math

import torch

import vosops
from vosops import _backends
from vosops import reference as ref
from vosops.reference.local_attention import round_offsets

from .local_attention import _displace, _unfold_rows
from .registry import Case

# name: (B, C, Cv, H, W, N, radius, scale, offsets)
FULL = {
    "mamp-480p": (1, 64, 7, 120, 214, 5, 12, 1 / 8, True),
    "mamp-train": (24, 64, 3, 64, 64, 1, 6, 1 / 8, False),
}
TRAIN = {"mamp-train"}


def _quarter(spec):
    B, C, Cv, H, W, *rest = spec
    return (B, C, Cv, math.ceil(H / 4), math.ceil(W / 4), *rest)


CONFIGS = {**{k: (v, ("cuda",)) for k, v in FULL.items()},
           **{f"{k}-quarter": (_quarter(v), ("cpu", "cuda")) for k, v in FULL.items()}}


def glue_local_affinity(q, k, *, radius, scale=1.0, offsets=None, border="zero"):
    """The users' glue: per reference, keys displaced by the rounded offsets (a nearest warp), F.unfold of the
    zero-padded frame, product with q summed over channels. Zero borders (what F.unfold gives); equal to the op
    without offsets, the warp-then-unfold approximation with them."""
    assert border == "zero"
    B, N, C, H, W = k.shape
    oi = round_offsets(offsets, radius) if offsets is not None else None
    qb = q.reshape(B, C, 1, H * W)
    per_ref = [(_unfold_rows(_displace(k[:, n], None if oi is None else oi[:, n]), radius, 0, H) * qb).sum(1) * scale
               for n in range(N)]
    return torch.stack(per_ref, 1).view(B, N, -1, H, W)


def glue_local_aggregate(weights, v, *, radius, offsets=None):
    """The users' glue: per reference, values displaced by the rounded offsets, F.unfold, weighted sum."""
    B, N, P, H, W = weights.shape
    oi = round_offsets(offsets, radius) if offsets is not None else None
    out = 0
    for n in range(N):
        vals = _unfold_rows(_displace(v[:, n], None if oi is None else oi[:, n]), radius, 0, H)  # (B, Cv, P, HW)
        out = out + (vals * weights[:, n].reshape(B, 1, P, H * W)).sum(2)
    return out.view(B, -1, H, W)


def _inputs(spec, device, requires_grad=False, seed=0):
    B, C, Cv, H, W, N, r, scale, with_offsets = spec
    g = torch.Generator(device="cpu").manual_seed(seed)
    P = (2 * r + 1) ** 2
    t = dict(q=torch.randn(B, C, H, W, generator=g), k=torch.randn(B, N, C, H, W, generator=g),
             weights=torch.rand(B, N, P, H, W, generator=g) / (N * P), v=torch.rand(B, N, Cv, H, W, generator=g))
    t = {n: x.to(device).requires_grad_(requires_grad) for n, x in t.items()}
    t["offsets"] = (torch.randint(-16, 17, (B, N, 2, H, W), generator=g).float().to(device)
                    if with_offsets else None)
    return t


def _impls(device: str):
    aff = {"glue": lambda t, r, s: glue_local_affinity(t["q"], t["k"], radius=r, scale=s, offsets=t["offsets"]),
           "reference": lambda t, r, s: ref.local_affinity(t["q"], t["k"], r, 1, "square", t["offsets"], s, "zero")}
    agg = {"glue": lambda t, r, s: glue_local_aggregate(t["weights"], t["v"], radius=r, offsets=t["offsets"]),
           "reference": lambda t, r, s: ref.local_aggregate(t["weights"], t["v"], r, 1, t["offsets"])}
    for b in ("cpu", "cuda", "triton"):
        if _backends.why_unusable(b, "local_affinity", device) is None and not (b == "triton" and device == "cpu"):
            aff[b] = lambda t, r, s, _b=b: vosops.local_affinity(t["q"], t["k"], radius=r, scale=s,
                                                                 offsets=t["offsets"], border="zero", backend=_b)
            agg[b] = lambda t, r, s, _b=b: vosops.local_aggregate(t["weights"], t["v"], radius=r,
                                                                  offsets=t["offsets"], backend=_b)
    return {"local_affinity": (aff, ("q", "k")), "local_aggregate": (agg, ("weights", "v"))}


def _flops(spec, op) -> float:
    """Multiply-adds as 2 over every candidate: C per affinity logit, Cv per aggregated value."""
    B, C, Cv, H, W, N, r, *_ = spec
    return 2.0 * B * N * (2 * r + 1) ** 2 * H * W * (C if op == "local_affinity" else Cv)


def cases(device: str) -> list[Case]:
    out = []
    for config, (spec, devices) in CONFIGS.items():
        if device not in devices:
            continue
        base = config.replace("-quarter", "")
        r, scale = spec[6], spec[7]
        for op, (impls, diff_names) in _impls(device).items():
            for impl, fn in impls.items():
                def setup_fwd(fn=fn, spec=spec, r=r, scale=scale):
                    t = _inputs(spec, device)
                    return lambda: fn(t, r, scale)

                common = dict(op=op, config=config, device=device, impl=impl, baseline=impl == "glue")
                out.append(Case(direction="fwd", setup=setup_fwd, flops=_flops(spec, op), **common))
                if base in TRAIN:
                    def setup_fwdbwd(fn=fn, spec=spec, r=r, scale=scale, diff_names=diff_names):
                        t = _inputs(spec, device, requires_grad=True)
                        diff = tuple(t[n] for n in diff_names)

                        def step():
                            o = fn(t, r, scale)
                            return torch.autograd.grad(o, diff, torch.ones_like(o))

                        return step

                    out.append(Case(direction="fwd+bwd", setup=setup_fwdbwd, flops=3 * _flops(spec, op), **common))
    return out
