"""Object-id masks: DAVIS-2017 palette PNGs, DAVIS-2016 0/255 PNGs, and writing palette PNGs."""

from __future__ import annotations

import os

import numpy as np
from PIL import Image


def _davis_palette() -> np.ndarray:
    """The palette of the DAVIS (and PASCAL VOC) annotations: id i gets its bits spread over R, G, B."""
    pal = np.zeros((256, 3), dtype=np.uint8)
    for i in range(256):
        c, r, g, b = i, 0, 0, 0
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        pal[i] = (r, g, b)
    return pal


DAVIS_PALETTE = _davis_palette()  # (256, 3) uint8; id 1 is (128, 0, 0), id 2 (0, 128, 0)


def read_mask(path: str) -> np.ndarray:
    """(H, W) uint8 object ids from a mask PNG.

    Palette ("P") images give their indices (DAVIS-2017). Grayscale images whose values are only 0 and 255 are
    DAVIS-2016 binary masks: 255 becomes object 1; other grayscale images are taken as ids. RGB images are mapped
    back to ids through the DAVIS palette (an unknown colour is an error).
    """
    if not os.path.isfile(path):
        raise ValueError(f"mask {path!r} does not exist")
    try:
        im = Image.open(path)
        im.load()  # decode now: a truncated or corrupt file fails here, named
    except OSError as e:
        raise ValueError(f"mask {path!r} cannot be read as an image ({e})") from None
    if im.mode == "P":
        return np.array(im, dtype=np.uint8)
    if im.mode in ("L", "1", "I", "I;16"):
        a = np.array(im)
        if im.mode == "1":
            return a.astype(np.uint8)
        vals = np.unique(a)
        if set(vals.tolist()) <= {0, 255}:
            return (a == 255).astype(np.uint8)
        if im.format == "JPEG":  # lossy: a 0/255 mask comes back with values between, which would read as ids
            raise ValueError(f"mask {path!r} is a JPEG with values other than 0 and 255 (compression blurs ids): "
                             "save masks as PNG")
        if vals.max() > 255 or vals.min() < 0:
            raise ValueError(f"mask {path!r} has ids outside 0..255 ({vals.min()}..{vals.max()})")
        return a.astype(np.uint8)
    if im.mode in ("RGB", "RGBA"):
        rgb = np.array(im.convert("RGB")).astype(np.int32)
        code = (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]
        pal = DAVIS_PALETTE.astype(np.int32)
        pal_code = (pal[:, 0] << 16) | (pal[:, 1] << 8) | pal[:, 2]
        lut = {int(c): i for i, c in reversed(list(enumerate(pal_code)))}
        out = np.zeros(code.shape, dtype=np.uint8)
        for c in np.unique(code):
            if int(c) not in lut:
                raise ValueError(f"mask {path!r} has colour #{int(c):06x}, which is not in the DAVIS palette")
            out[code == c] = lut[int(c)]
        return out
    raise ValueError(f"mask {path!r} has unsupported image mode {im.mode!r} (expected P, L or RGB)")


def write_mask(path: str, ids, palette: np.ndarray = DAVIS_PALETTE) -> None:
    """Write (H, W) integer object ids (0..255) as a palette PNG with the DAVIS palette."""
    a = ids.cpu().numpy() if hasattr(ids, "cpu") else np.asarray(ids)
    if a.ndim != 2:
        raise ValueError(f"ids must be a 2-D (H, W) array of object ids, got shape {a.shape}")
    if not (np.issubdtype(a.dtype, np.integer) or a.dtype == np.bool_):
        raise TypeError(f"ids must be integer object ids, got dtype {a.dtype}")
    if a.size and (a.min() < 0 or a.max() > 255):
        raise ValueError(f"ids must lie in 0..255 for a palette PNG, got {a.min()}..{a.max()}")
    im = Image.fromarray(a.astype(np.uint8), mode="P")
    im.putpalette(np.asarray(palette, dtype=np.uint8).reshape(-1).tolist())
    d = os.path.dirname(path)
    if d:
        os.makedirs(d, exist_ok=True)
    im.save(path)
