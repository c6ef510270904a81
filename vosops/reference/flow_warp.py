"""Reference flow_warp: explicit bilinear / nearest gathers in pixel coordinates.

out[b, c, i, j] = x[b, c] sampled at (i + flow[b, 1, i, j], j + flow[b, 0, i, j]); the same as
F.grid_sample(x, grid, mode, padding_mode, align_corners=True) with grid = normalised (j + dx, i + dy), but without
the round trip through normalised coordinates, so it is exact in float64 and defined for H or W equal to 1.
"""

from __future__ import annotations

import torch

from ._dtypes import compute_dtype


def _sampling_points(flow: torch.Tensor):
    B, _, H, W = flow.shape
    dtype = compute_dtype(flow.dtype)
    ii = torch.arange(H, device=flow.device, dtype=dtype).view(1, H, 1)
    jj = torch.arange(W, device=flow.device, dtype=dtype).view(1, 1, W)
    return jj + flow[:, 0].to(dtype), ii + flow[:, 1].to(dtype)  # (B, H, W) each


def _clip(p: torch.Tensor, size: int) -> torch.Tensor:
    """Border padding: clamp into [0, size-1]; the gradient is 0 at and beyond the edges (grid_sample's rule)."""
    inside = (p > 0) & (p < size - 1)
    return torch.where(inside, p, p.detach().clamp(0, size - 1))


def _gather(x: torch.Tensor, yy: torch.Tensor, xx: torch.Tensor) -> torch.Tensor:
    """x (B, C, H, W) at integer points (B, H, W); points outside the frame read 0."""
    B, C, H, W = x.shape
    inside = (xx >= 0) & (xx < W) & (yy >= 0) & (yy < H)
    idx = (yy.clamp(0, H - 1) * W + xx.clamp(0, W - 1)).reshape(B, 1, H * W).expand(B, C, H * W)
    vals = torch.gather(x.reshape(B, C, H * W), 2, idx).view(B, C, H, W)
    return torch.where(inside.unsqueeze(1), vals, 0.0)  # a select: an out-of-frame tap is 0 even next to inf in x


def flow_warp(x: torch.Tensor, flow: torch.Tensor, mode: str = "bilinear", padding_mode: str = "zeros"):
    dtype = x.dtype
    x = x.to(compute_dtype(dtype))
    B, C, H, W = x.shape
    px, py = _sampling_points(flow)
    if padding_mode == "border":
        px, py = _clip(px, W), _clip(py, H)
    finite = torch.isfinite(px) & torch.isfinite(py)
    px = torch.where(finite, px, torch.full_like(px, -2.0))  # non-finite flow samples nothing
    py = torch.where(finite, py, torch.full_like(py, -2.0))
    if mode == "nearest":
        # Round half to even, as grid_sample does; clamp before the cast so huge flows stay well defined.
        rx = torch.round(px.detach()).clamp(-1, W).long()
        ry = torch.round(py.detach()).clamp(-1, H).long()
        # The output stays in the flow's graph with a zero gradient (grid_sample's and the native backends' rule),
        # so a backward that reaches only the flow gives zeros rather than failing.
        zero_in_flow = ((px + py) * 0).unsqueeze(1).to(x.dtype)
        return (_gather(x, ry, rx) + zero_in_flow).to(dtype)
    x0f, y0f = torch.floor(px.detach()), torch.floor(py.detach())
    fx, fy = px - x0f, py - y0f  # differentiable in the flow
    x0 = x0f.clamp(-2, W).long()
    y0 = y0f.clamp(-2, H).long()
    out = x.new_zeros(x.shape)
    for dy, wy in ((0, 1 - fy), (1, fy)):
        for dx, wx in ((0, 1 - fx), (1, fx)):
            out = out + _gather(x, y0 + dy, x0 + dx) * (wy * wx).unsqueeze(1)
    return out.to(dtype)


def flow_warp_valid(flow: torch.Tensor, mode: str = "bilinear", padding_mode: str = "zeros") -> torch.Tensor:
    """(B, 1, H, W) bool: the sampling point lies inside the frame, [0, W-1] x [0, H-1] (for nearest, the rounded
    point). With border padding every point is clamped into the frame, but validity still reports the unclamped
    point, which is what MAMP's occlusion-aware use needs."""
    _, _, H, W = flow.shape
    px, py = _sampling_points(flow.detach())
    if mode == "nearest":
        px, py = torch.round(px), torch.round(py)
    valid = (px >= 0) & (px <= W - 1) & (py >= 0) & (py <= H - 1)
    return valid.unsqueeze(1)
