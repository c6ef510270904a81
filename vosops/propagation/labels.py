"""Label maps: ids <-> one-hot channels, down/up-sampling between frame and feature resolution, padding."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

DOWNSAMPLE = ("stride", "nearest", "bilinear")
ARGMAX_NORM = ("none", "minmax")


def to_onehot(ids: torch.Tensor, object_ids) -> torch.Tensor:
    """(H, W) integer ids -> (1, K+1, H, W) float one-hot; channel 0 is background, channel c is object_ids[c-1].
    Ids not in `object_ids` count as background. `object_ids` may be a list or a (K+1,) tensor [0, ids...] already
    on the device (the engine passes that, so no host-to-device copy happens per frame)."""
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
        raise ValueError(f"ids must be a 2-D (H, W) tensor of object ids, got {getattr(ids, 'shape', type(ids))}")
    if isinstance(object_ids, torch.Tensor):
        table = object_ids.to(torch.long)
    else:
        table = torch.tensor([0] + list(object_ids), device=ids.device, dtype=torch.long)
    ids = ids.long()
    oh = (ids.unsqueeze(0) == table.view(-1, 1, 1)).float()
    oh[0] = 1.0 - oh[1:].sum(0).clamp(max=1.0)
    return oh.unsqueeze(0)


def downsample(labels: torch.Tensor, stride: int, mode: str = "stride") -> torch.Tensor:
    """(B, K, H, W) at frame resolution (H, W multiples of stride) -> (B, K, H/stride, W/stride).
    "stride": MAMP's x[..., ::s, ::s] (each cell's top-left pixel); "nearest": each cell's centre pixel
    x[..., s//2::s, s//2::s], which is what PIL's NEAREST resize by an integer factor samples (DINO's read_seg);
    "bilinear": bilinear resize (align_corners=False, antialiased)."""
    if mode not in DOWNSAMPLE:
        raise ValueError(f"label_downsample must be one of {DOWNSAMPLE}, got {mode!r}")
    if stride == 1:
        return labels
    H, W = labels.shape[-2:]
    if mode in ("stride", "nearest"):
        first = 0 if mode == "stride" else stride // 2
        return labels[..., first::stride, first::stride].contiguous()
    return F.interpolate(labels, size=(H // stride, W // stride), mode="bilinear", align_corners=False,
                         antialias=True)


def upsample(labels: torch.Tensor, size) -> torch.Tensor:
    """Bilinear (align_corners=False) to `size` (H, W), as MAMP / DINO upsample their soft outputs."""
    return F.interpolate(labels, size=tuple(size), mode="bilinear", align_corners=False)


def minmax_channels(labels: torch.Tensor, size=None) -> torch.Tensor:
    """DINO's norm_mask on (B, K, H, W): every channel whose maximum is > 0 is rescaled to [0, 1] by its own minimum
    and maximum over the frame; the others are left as they are. `size` (H, W): the frame inside a bottom/right
    padding, which the minimum and maximum are taken over. DINO's division is 0/0 (NaN) for a constant positive
    channel; here such a channel becomes 0."""
    frame = labels if size is None else unpad(labels, size)
    lo = frame.amin(dim=(-2, -1), keepdim=True)
    hi = frame.amax(dim=(-2, -1), keepdim=True)
    span = hi - lo
    scaled = (labels - lo) / torch.where(span > 0, span, torch.ones_like(span))
    return torch.where(hi > 0, scaled, labels)


def argmax_ids(labels: torch.Tensor, id_table: torch.Tensor) -> torch.Tensor:
    """(1, K+1, H, W) scores -> (H, W) uint8 ids through id_table (K+1,) (entry 0 = background 0)."""
    return id_table[labels[0].argmax(0)]


def pad_to_multiple(x: torch.Tensor, multiple: int, value: float = 0.0):
    """Zero-pad the bottom and right of (..., H, W) to multiples of `multiple` (MAMP's size-aware alignment:
    pixel (i, j) keeps its coordinates, so feature cell (i/s, j/s) sits on frame pixel (i, j)).
    Returns (padded, (H, W)) for `unpad`."""
    if isinstance(multiple, bool) or not isinstance(multiple, int) or multiple < 1:
        raise ValueError(f"multiple must be an int >= 1, got {multiple!r}")
    H, W = x.shape[-2:]
    ph, pw = (-H) % multiple, (-W) % multiple
    if ph or pw:
        x = F.pad(x, (0, pw, 0, ph), value=value)
    return x, (H, W)


def unpad(x: torch.Tensor, size) -> torch.Tensor:
    """Crop (..., Hp, Wp) back to the original `size` (H, W)."""
    H, W = size
    return x[..., :H, :W]
