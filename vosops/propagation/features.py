"""A weight-free feature extractor, so propagation runs with no checkpoint.

Each stride-4 cell of the frame is described by its mean CIE-Lab colour and its position. Every scalar is put on a
half circle, (cos θ, sin θ) with θ = π·x for x in [0, 1], so every feature vector has the same norm and the dot
product of two features is Σ w·cos(π·Δx): a monotone similarity in each difference, which dot-product readouts
(top-k, softmax, threshold) can use directly.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


_CONSTANTS: dict = {}


def _lab_constants(dtype, device):
    """sRGB->XYZ matrix and D65 white, cached per device so no host-to-device copy happens per frame."""
    key = (dtype, str(device))
    if key not in _CONSTANTS:
        m = torch.tensor([[0.412453, 0.357580, 0.180423],
                          [0.212671, 0.715160, 0.072169],
                          [0.019334, 0.119193, 0.950227]], dtype=dtype, device=device)
        white = torch.tensor([0.950456, 1.0, 1.088754], dtype=dtype, device=device).view(1, 3, 1, 1)
        _CONSTANTS[key] = (m, white)
    return _CONSTANTS[key]


def rgb_to_lab(rgb: torch.Tensor) -> torch.Tensor:
    """sRGB in [0, 1] (B, 3, H, W) -> CIE-Lab (D65): L in [0, 100], a and b roughly in [-128, 127]."""
    c = torch.where(rgb > 0.04045, ((rgb + 0.055) / 1.055) ** 2.4, rgb / 12.92)
    m, white = _lab_constants(rgb.dtype, rgb.device)
    xyz = (m @ c.flatten(2)).view_as(c)
    t = xyz / white
    f = torch.where(t > 0.008856, t.clamp_min(1e-12) ** (1 / 3), 7.787 * t + 16 / 116)
    L = 116 * f[:, 1] - 16
    a = 500 * (f[:, 0] - f[:, 1])
    b = 200 * (f[:, 1] - f[:, 2])
    return torch.stack([L, a, b], 1)


def _as_unit_rgb(frame: torch.Tensor) -> torch.Tensor:
    if not isinstance(frame, torch.Tensor):
        raise TypeError(f"frame must be a tensor (3, H, W) or (B, 3, H, W), got {type(frame).__name__}")
    x = frame if frame.dim() == 4 else frame.unsqueeze(0)
    if x.dim() != 4 or x.shape[1] != 3:
        raise ValueError(f"frame must be (3, H, W) or (B, 3, H, W) RGB, got shape {tuple(frame.shape)}")
    if x.dtype == torch.uint8:
        return x.float() / 255.0
    if not x.is_floating_point():
        raise TypeError(f"frame must be uint8 or float in [0, 1], got {x.dtype}")
    return x.float()


class LabPositionFeatures:
    """Frame (3, H, W) uint8 / [0, 1] float, H and W multiples of `stride` -> features (1, 10, H/stride, W/stride).

    `colour_weight` and `position_weight` weigh the Lab and the position terms of the similarity; positions are
    scaled so the whole frame diagonal spans `position_span` of the half circle (lower: weaker position prior).
    """

    stride = 4

    def __init__(self, stride: int = 4, colour_weight: float = 1.0, position_weight: float = 0.5,
                 position_span: float = 1.0):
        if isinstance(stride, bool) or not isinstance(stride, int) or stride < 1:
            raise ValueError(f"stride must be an int >= 1, got {stride!r}")
        self.stride = stride
        self.colour_weight = float(colour_weight)
        self.position_weight = float(position_weight)
        self.position_span = float(position_span)

    @property
    def channels(self) -> int:
        return 10

    def __call__(self, frame: torch.Tensor) -> torch.Tensor:
        rgb = _as_unit_rgb(frame)
        B, _, H, W = rgb.shape
        s = self.stride
        if H % s or W % s:
            raise ValueError(f"frame size {(H, W)} must be a multiple of stride {s}; pad it first")
        lab = rgb_to_lab(rgb)
        lab = F.avg_pool2d(lab, s) if s > 1 else lab
        unit = torch.stack([lab[:, 0] / 100.0, (lab[:, 1] + 128) / 255.0, (lab[:, 2] + 128) / 255.0], 1)
        h, w = H // s, W // s
        diag = math.hypot(H, W)
        ys = (torch.arange(h, device=rgb.device, dtype=torch.float32) + 0.5) * s / diag * self.position_span
        xs = (torch.arange(w, device=rgb.device, dtype=torch.float32) + 0.5) * s / diag * self.position_span
        pos = torch.stack([xs.view(1, w).expand(h, w), ys.view(h, 1).expand(h, w)]).unsqueeze(0).expand(B, 2, h, w)
        ang_c = math.pi * unit.clamp(0, 1)
        ang_p = math.pi * pos
        wc, wp = math.sqrt(self.colour_weight), math.sqrt(self.position_weight)
        feats = torch.cat([wc * torch.cos(ang_c), wc * torch.sin(ang_c), wp * torch.cos(ang_p), wp * torch.sin(ang_p)], 1)
        return feats.contiguous()
