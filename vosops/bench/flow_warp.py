"""flow_warp standard configurations.

warp-cpu  : x (5, 64, 60, 107)            : the CPU configuration
warp-480p : x (5, 64, 120, 214) and a 7-channel mask (5, 7, 120, 214) warped by the same flow (MAMP's use)
Baseline: what users write today, a normalised grid built from the flow and F.grid_sample(align_corners=True).
Flows are smooth random fields of a few pixels (coarse noise upsampled), shaped like real optical flow; every
implementation warps the same tensors.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import vosops
from vosops import _backends
from vosops import reference as ref

from .registry import Case

CONFIGS = {
    "warp-cpu": {"shape": (5, 64, 60, 107), "mask_channels": 0, "devices": ("cpu", "cuda")},
    "warp-480p": {"shape": (5, 64, 120, 214), "mask_channels": 7, "devices": ("cuda", "cpu")},
}


def grid_sample_warp(x, flow, mode="bilinear", padding_mode="zeros"):
    B, _, H, W = x.shape
    ii, jj = torch.meshgrid(torch.arange(H, dtype=x.dtype, device=x.device),
                            torch.arange(W, dtype=x.dtype, device=x.device), indexing="ij")
    gx = (jj + flow[:, 0]) * (2.0 / max(W - 1, 1)) - 1.0
    gy = (ii + flow[:, 1]) * (2.0 / max(H - 1, 1)) - 1.0
    return F.grid_sample(x, torch.stack([gx, gy], dim=-1), mode=mode, padding_mode=padding_mode, align_corners=True)


def smooth_flow(B: int, H: int, W: int, device: str, magnitude: float = 4.0) -> torch.Tensor:
    coarse = torch.randn(B, 2, max(2, H // 8), max(2, W // 8), device=device) * magnitude
    return F.interpolate(coarse, size=(H, W), mode="bilinear", align_corners=False)


def _impls(device: str):
    impls = {"grid_sample": grid_sample_warp, "reference": ref.flow_warp}
    for b in ("cpu", "cuda", "triton"):
        if _backends.why_unusable(b, "flow_warp", device) is None and not (b == "triton" and device == "cpu"):
            impls[b] = lambda x, f, _b=b: vosops.flow_warp(x, f, backend=_b)
    return impls


def cases(device: str) -> list[Case]:
    out = []
    for config, spec in CONFIGS.items():
        if device not in spec["devices"]:
            continue
        B, C, H, W = spec["shape"]
        Cm = spec["mask_channels"]
        elem = 4
        fwd_bytes = (2 * B * (C + Cm) * H * W + 2 * B * H * W) * elem  # read x (+mask), write out, read flow
        for impl, fn in _impls(device).items():
            def setup_fwd(fn=fn, B=B, C=C, H=H, W=W, Cm=Cm):
                x = torch.randn(B, C, H, W, device=device)
                m = torch.rand(B, Cm, H, W, device=device) if Cm else None
                flow = smooth_flow(B, H, W, device)
                if m is None:
                    return lambda: fn(x, flow)
                return lambda: (fn(x, flow), fn(m, flow))

            def setup_bwd(fn=fn, B=B, C=C, H=H, W=W):
                x = torch.randn(B, C, H, W, device=device, requires_grad=True)
                flow = smooth_flow(B, H, W, device).requires_grad_()
                out = fn(x, flow)
                g = torch.randn_like(out)
                return lambda: torch.autograd.grad(out, (x, flow), g, retain_graph=True)

            common = dict(op="flow_warp", config=config, device=device, impl=impl, baseline=impl == "grid_sample")
            out.append(Case(direction="fwd", setup=setup_fwd, bytes=fwd_bytes, **common))
            # backward: read grad, x, flow; write grad_x, grad_flow
            bwd_bytes = (3 * B * C * H * W + 4 * B * H * W) * elem
            out.append(Case(direction="bwd", setup=setup_bwd, bytes=bwd_bytes, **common))
    return out
