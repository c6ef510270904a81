"""Masks drawn over frames: per-frame PNGs, a contact sheet, an MP4."""

from __future__ import annotations

import os
from typing import Iterable, Sequence

import numpy as np
from PIL import Image

from .masks import DAVIS_PALETTE


def overlay(frame: np.ndarray, ids: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """uint8 RGB frame with each object's palette colour blended in and its boundary drawn solid."""
    frame = np.asarray(frame)
    ids = np.asarray(ids)
    if frame.ndim != 3 or frame.shape[2] != 3:
        raise ValueError(f"frame must be (H, W, 3) RGB, got shape {frame.shape}")
    if ids.shape != frame.shape[:2]:
        raise ValueError(f"ids {ids.shape} must have the frame's size {frame.shape[:2]}")
    out = frame.astype(np.float32)
    colour = DAVIS_PALETTE[ids.astype(np.int64) % 256].astype(np.float32)
    fg = ids > 0
    out[fg] = (1 - alpha) * out[fg] + alpha * colour[fg]
    # The boundary is the object pixels next to a pixel of another id, on every side, drawn in the object's own
    # colour (marking one pixel of each differing pair drew the right and bottom sides on the background, black).
    edge = np.zeros_like(fg)
    across = ids[:, 1:] != ids[:, :-1]
    edge[:, 1:] |= across
    edge[:, :-1] |= across
    down = ids[1:, :] != ids[:-1, :]
    edge[1:, :] |= down
    edge[:-1, :] |= down
    edge &= fg
    out[edge] = colour[edge]
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


def write_overlays(folder: str, frames: Iterable[np.ndarray], masks: Iterable[np.ndarray], names: Sequence[str]):
    os.makedirs(folder, exist_ok=True)
    for name, f, m in zip(names, frames, masks):
        Image.fromarray(overlay(f, m)).save(os.path.join(folder, f"{name}.png"))


def contact_sheet(images: Sequence[np.ndarray], cols: int = 6, width: int = 160, pad: int = 2) -> np.ndarray:
    """Thumbnails (each resized to `width` wide) tiled in a grid, uint8 RGB."""
    if not images:
        raise ValueError("images must not be empty")
    h0, w0 = images[0].shape[:2]
    th = max(1, round(h0 * width / w0))
    thumbs = [np.array(Image.fromarray(np.asarray(im)).resize((width, th), Image.BILINEAR)) for im in images]
    cols = max(1, min(cols, len(thumbs)))
    rows = (len(thumbs) + cols - 1) // cols
    sheet = np.full((rows * (th + pad) + pad, cols * (width + pad) + pad, 3), 255, np.uint8)
    for i, t in enumerate(thumbs):
        r, c = divmod(i, cols)
        y, x = pad + r * (th + pad), pad + c * (width + pad)
        sheet[y:y + th, x:x + width] = t
    return sheet


def pad_to_even(image: np.ndarray) -> np.ndarray:
    """(H, W, C) with an odd height or width given one more row or column, a copy of the last: MPEG-4 needs even
    sizes, and OpenCV's encoder would crop one (and cannot open a writer for a side of 1)."""
    return np.pad(image, ((0, image.shape[0] % 2), (0, image.shape[1] % 2), (0, 0)), mode="edge")


def write_overlay_video(path: str, frames: Iterable[np.ndarray], masks: Iterable[np.ndarray], fps: float = 24.0):
    """An MP4 (mp4v) of the overlays through OpenCV; returns the number of frames written. MPEG-4 needs even
    sizes: an odd height or width gets one more row or column, a copy of the last (the encoder would crop one)."""
    import cv2

    d = os.path.dirname(path)
    if d:
        os.makedirs(d, exist_ok=True)
    writer, n = None, 0
    try:
        for f, m in zip(frames, masks):
            ov = pad_to_even(overlay(f, m))
            if writer is None:
                h, w = ov.shape[:2]
                writer = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*"mp4v"), fps, (w, h))
                if not writer.isOpened():
                    raise ValueError(f"OpenCV cannot write an MP4 to {path!r}")
            writer.write(cv2.cvtColor(ov, cv2.COLOR_RGB2BGR))
            n += 1
    finally:
        if writer is not None:
            writer.release()
    return n
