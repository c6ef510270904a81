"""Optical flow between frames with OpenCV (DIS or Farneback), in the `vosops.flow_warp` convention.

`estimate_flow(a, b)` returns flow (B, 2, H, W) float32 in pixels, channel 0 = dx, 1 = dy, such that
a(p) ~ b(p + flow(p)): `vosops.flow_warp(b, flow)` reconstructs `a`. For MAMP's motion-aware matching `a` is the
query frame and `b` a memory frame, so the flow moves each query pixel's window onto the memory frame. A user may
pass their own flow (RAFT, ...) anywhere a flow is accepted, in the same convention.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

METHODS = ("dis", "farneback")
DIS_PRESETS = {"ultrafast": 0, "fast": 1, "medium": 2}


def _to_gray_batch(x, name: str) -> list[np.ndarray]:
    """Frames as a list of uint8 grayscale (H, W) arrays. Accepts a tensor (B, 3, H, W) / (3, H, W) / (B, 1, H, W)
    (uint8, or float in [0, 1]), a uint8 RGB array (H, W, 3), or a list of those."""
    import cv2

    if isinstance(x, (list, tuple)):
        out = []
        for i, f in enumerate(x):
            out.extend(_to_gray_batch(f, f"{name}[{i}]"))
        return out
    if isinstance(x, torch.Tensor):
        t = x.detach()
        if t.dim() == 3:
            t = t.unsqueeze(0)
        if t.dim() != 4 or t.shape[1] not in (1, 3):
            raise ValueError(f"{name} must be (B, 3, H, W), (3, H, W) or (B, 1, H, W), got shape {tuple(x.shape)}")
        if t.dtype != torch.uint8:
            if not t.is_floating_point():
                raise TypeError(f"{name} must be uint8 or float in [0, 1], got {t.dtype}")
            t = (t.float().clamp(0, 1) * 255 + 0.5).to(torch.uint8)
        arr = t.cpu().permute(0, 2, 3, 1).numpy()
        if arr.shape[3] == 1:
            return [np.ascontiguousarray(a[..., 0]) for a in arr]
        return [cv2.cvtColor(np.ascontiguousarray(a), cv2.COLOR_RGB2GRAY) for a in arr]
    if isinstance(x, np.ndarray):
        if x.dtype != np.uint8:
            raise TypeError(f"{name} as a numpy array must be uint8, got {x.dtype}")
        if x.ndim == 2:
            return [x]
        if x.ndim == 3 and x.shape[2] == 3:
            return [cv2.cvtColor(np.ascontiguousarray(x), cv2.COLOR_RGB2GRAY)]
        raise ValueError(f"{name} as a numpy array must be (H, W, 3) RGB or (H, W) gray, got shape {x.shape}")
    raise TypeError(f"{name} must be a tensor, a uint8 numpy array or a list of them, got {type(x).__name__}")


# OpenCV's DIS re-chooses its patch size and pyramid for small frames from their width alone, and a wide frame under
# about 32 rows then reads past its coarsest level: the process dies (measured with OpenCV 5.1 over every preset:
# 8-15 rows from 40 columns, up to 31 rows from 96; frames at least as tall as they are wide never crash). Such a
# frame is solved transposed, and its flow transposed back.
_DIS_TRANSPOSE_BELOW_ROWS = 64


def _dis_calc(dis, fa: np.ndarray, fb: np.ndarray) -> np.ndarray:
    if fa.shape[0] < min(fa.shape[1], _DIS_TRANSPOSE_BELOW_ROWS):
        f = dis.calc(np.ascontiguousarray(fa.T), np.ascontiguousarray(fb.T), None)
        return np.ascontiguousarray(f.transpose(1, 0, 2)[..., ::-1])  # (dy, dx) of the transposed frame
    return dis.calc(fa, fb, None)


def estimate_flow(a, b, method: str = "dis", *, preset: str = "medium", device=None) -> torch.Tensor:
    """Dense flow from each frame of `a` to the matching frame of `b`: (B, 2, H, W) float32, dx then dy, pixels.

    `method`: "dis" (OpenCV DIS, `preset` ultrafast/fast/medium) or "farneback". Pairs are processed on the CPU
    with OpenCV; the result goes to `device` (default: the device of `a` when it is a tensor, else CPU). DIS solves
    frames under 64 rows that are wider than tall transposed (OpenCV's DIS crashes on some of them as they are).
    """
    try:
        import cv2
    except ImportError as exc:
        raise ImportError("vosops.flow.estimate_flow needs OpenCV: pip install opencv-python-headless (or the "
                          "vosops[io] extra)") from exc

    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if method == "dis" and preset not in DIS_PRESETS:
        raise ValueError(f"preset must be one of {tuple(DIS_PRESETS)}, got {preset!r}")
    ga, gb = _to_gray_batch(a, "a"), _to_gray_batch(b, "b")
    if len(ga) != len(gb):
        raise ValueError(f"a and b must hold the same number of frames, got {len(ga)} and {len(gb)}")
    if not ga:
        raise ValueError("a and b must hold at least one frame")
    for i, (fa, fb) in enumerate(zip(ga, gb)):
        if fa.shape != fb.shape or fa.shape != ga[0].shape:
            raise ValueError(f"frame {i}: a {fa.shape} and b {fb.shape} must all have the same size {ga[0].shape}")
    if device is None and isinstance(a, torch.Tensor):
        device = a.device
    flows = []
    if method == "dis":
        dis = cv2.DISOpticalFlow_create(DIS_PRESETS[preset])
        for fa, fb in zip(ga, gb):
            try:
                flows.append(_dis_calc(dis, fa, fb))
            except cv2.error as e:  # e.g. frames too small for its patches (a side under 12 px)
                raise ValueError(f"OpenCV's DIS flow failed on frames of {fa.shape[0]}x{fa.shape[1]} "
                                 f"({getattr(e, 'err', e)}); method='farneback' takes any size") from None
    else:
        for fa, fb in zip(ga, gb):
            flows.append(cv2.calcOpticalFlowFarneback(fa, fb, None, 0.5, 4, 15, 3, 5, 1.2, 0))
    out = torch.from_numpy(np.stack(flows)).permute(0, 3, 1, 2).contiguous()
    return out.to(device) if device is not None else out


def resize_flow(flow: torch.Tensor, size: Sequence[int], *, mode: str = "bilinear") -> torch.Tensor:
    """Resize a (B, 2, H, W) flow to `size` (h, w), scaling dx by w/W and dy by h/H so it stays in (new) pixels.
    Interpolation uses align_corners=True, as MAMP's resize does."""
    if not isinstance(flow, torch.Tensor) or flow.dim() != 4 or flow.shape[1] != 2:
        raise ValueError(f"flow must be a (B, 2, H, W) tensor, got {getattr(flow, 'shape', type(flow).__name__)}")
    h, w = int(size[0]), int(size[1])
    if h < 1 or w < 1:
        raise ValueError(f"size must be positive (h, w), got {tuple(size)}")
    H, W = flow.shape[2:]
    kw = {"align_corners": True} if mode in ("bilinear", "bicubic") else {}
    out = F.interpolate(flow, size=(h, w), mode=mode, **kw)
    scale = torch.tensor([w / W, h / H], dtype=out.dtype, device=out.device).view(1, 2, 1, 1)
    return out * scale


def flow_to_stride(flow: torch.Tensor, stride: int) -> torch.Tensor:
    """A full-resolution flow at a feature stride: resized to (ceil(H/stride), ceil(W/stride)), vectors scaled."""
    if int(stride) < 1:
        raise ValueError(f"stride must be >= 1, got {stride}")
    H, W = flow.shape[2:]
    return resize_flow(flow, (-(-H // stride), -(-W // stride)))


def clamp_round_flow(flow: torch.Tensor) -> torch.Tensor:
    """MAMP's clamp_optical_flow: dx clamped to [-W, W], dy to [-H, H] (H, W of the flow), then torch.round
    (half to even), giving the integer displacements its matching uses."""
    if not isinstance(flow, torch.Tensor) or flow.dim() != 4 or flow.shape[1] != 2:
        raise ValueError(f"flow must be a (B, 2, H, W) tensor, got {getattr(flow, 'shape', type(flow).__name__)}")
    H, W = flow.shape[2:]
    dx = flow[:, 0].clamp(-W, W)
    dy = flow[:, 1].clamp(-H, H)
    return torch.round(torch.stack([dx, dy], 1))
