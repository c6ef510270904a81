"""A deterministic synthetic video with ground truth: two textured objects moving, scaling and occluding each
other over a textured background (the `vosops demo` input and a test fixture)."""

from __future__ import annotations

import numpy as np


def _smooth_texture(rng, H, W, cell, base, amp):
    """Smooth random colour texture: coarse noise upsampled bilinearly, around colour `base` (RGB 0..255)."""
    import cv2

    coarse = rng.uniform(-1, 1, (H // cell + 2, W // cell + 2, 3)).astype(np.float32)
    fine = cv2.resize(coarse, (W + 2 * cell, H + 2 * cell), interpolation=cv2.INTER_CUBIC)[cell:cell + H, cell:cell + W]
    return np.clip(np.asarray(base, np.float32) + amp * fine, 0, 255)


def synthetic_video(T: int = 30, H: int = 192, W: int = 256, seed: int = 0):
    """(frames, masks): T uint8 RGB frames (H, W, 3) and T uint8 id maps (H, W).

    Object 1 (id 1): a warm textured disc moving right and growing. Object 3 (id 3, non-contiguous ids on purpose):
    a cool textured rectangle moving left and shrinking, drawn in front, so it occludes the disc mid-video.
    Background: a slowly panning green-grey texture.
    """
    if T < 3 or H < 32 or W < 32:
        raise ValueError(f"need T >= 3 and H, W >= 32, got T={T}, H={H}, W={W}")
    rng = np.random.default_rng(seed)
    bg_big = _smooth_texture(rng, H + 40, W + 80, 12, (90, 120, 80), 40)
    tex1 = _smooth_texture(rng, H, W, 6, (210, 90, 60), 35)
    tex2 = _smooth_texture(rng, H, W, 6, (60, 90, 200), 35)
    yy, xx = np.mgrid[0:H, 0:W].astype(np.float32)
    frames, masks = [], []
    for t in range(T):
        s = t / max(T - 1, 1)
        ox = int(round(40 * s))
        frame = bg_big[10:10 + H, ox:ox + W].copy()
        ids = np.zeros((H, W), np.uint8)
        # disc: moves right, grows
        cx, cy, r = W * (0.22 + 0.45 * s), H * (0.45 + 0.1 * np.sin(3 * s)), min(H, W) * (0.14 + 0.08 * s)
        disc = (xx - cx) ** 2 + (yy - cy) ** 2 < r * r
        sx, sy = int(round(cx - W / 2)), int(round(cy - H / 2))  # texture moves with the object
        moved1 = np.roll(tex1, (sy, sx), axis=(0, 1))
        frame[disc] = moved1[disc]
        ids[disc] = 1
        # rectangle: moves left, shrinks, in front
        rx, ry = W * (0.78 - 0.45 * s), H * 0.55
        hw, hh = W * (0.13 - 0.04 * s), H * (0.2 - 0.05 * s)
        rect = (np.abs(xx - rx) < hw) & (np.abs(yy - ry) < hh)
        moved2 = np.roll(tex2, (int(round(ry - H / 2)), int(round(rx - W / 2))), axis=(0, 1))
        frame[rect] = moved2[rect]
        ids[rect] = 3
        frames.append(np.clip(frame + 0.5, 0, 255).astype(np.uint8))
        masks.append(ids)
    return frames, masks
