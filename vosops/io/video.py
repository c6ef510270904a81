"""Frames from a folder of images or a video file, streamed as uint8 RGB (H, W, 3) numpy arrays."""

from __future__ import annotations

import os
import re
from typing import Iterator

import numpy as np
import torch

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _cv2():
    try:
        import cv2
    except ImportError as e:  # pragma: no cover - cv2 is a test/io dependency
        raise ImportError("vosops.io needs OpenCV: pip install opencv-python-headless") from e
    return cv2


def frame_sort_key(name: str) -> tuple:
    """Order of frame file names: numbers by value ("2.png" before "10.png", as ffmpeg's %d names need), the
    rest as text; zero-padded names (DAVIS) sort as plain text would."""
    parts = re.split(r"(\d+)", name)  # text, number, text, ...: like kinds at like positions
    return tuple(int(t) if i % 2 else t for i, t in enumerate(parts)), name


def list_frames(folder: str) -> list[str]:
    """The image files of a folder in frame order (`frame_sort_key`); hidden files (macOS's ._00000.jpg
    AppleDouble companions) are not frames."""
    names = sorted((f for f in os.listdir(folder) if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith(".")),
                   key=frame_sort_key)
    return [os.path.join(folder, f) for f in names]


class VideoReader:
    """A video as a stream of frames: a folder of images or a video file.

    Iterating yields uint8 RGB arrays (H, W, 3) one at a time, so a long video never sits in memory whole.
    `names` are the frame names without extension (the file stem for folders, 00000, 00001, ... for video files):
    masks written for frame `00017.jpg` are named `00017.png`.
    """

    def __init__(self, path: str):
        if not isinstance(path, (str, os.PathLike)):
            raise TypeError(f"path must be a folder of frames or a video file, got {type(path).__name__}")
        path = os.fspath(path)
        if not os.path.exists(path):
            raise ValueError(f"path {path!r} does not exist (expected a folder of frames or a video file)")
        self.path = path
        self.is_folder = os.path.isdir(path)
        if self.is_folder:
            self._files = list_frames(path)
            if not self._files:
                raise ValueError(f"path {path!r} holds no {'/'.join(IMAGE_EXTENSIONS)} frames")
            self.names = [os.path.splitext(os.path.basename(f))[0] for f in self._files]
            if len(set(self.names)) < len(self.names):  # 00000.jpg and 00000.png: one mask name for two frames
                seen: set[str] = set()
                dup = sorted({n for n in self.names if n in seen or seen.add(n)}, key=frame_sort_key)
                files = [os.path.basename(f) for f in self._files if os.path.splitext(os.path.basename(f))[0] in dup]
                raise ValueError(f"path {path!r} holds frames that share a name ({', '.join(files[:6])}): each "
                                 "frame's mask is named after it, so keep one image per name (a first-frame mask "
                                 "saved among the frames is read as a frame)")
        else:
            cv2 = _cv2()
            cap = cv2.VideoCapture(path)
            if not cap.isOpened():
                raise ValueError(f"path {path!r} is neither a folder nor a video file OpenCV can open")
            n = int(cap.get(cv2.CAP_PROP_FRAME_COUNT))
            self.fps = cap.get(cv2.CAP_PROP_FPS) or 0.0
            cap.release()
            if n <= 0:  # some containers report no count: count by decoding once
                n = sum(1 for _ in self._iter_video())
            if n == 0:
                raise ValueError(f"video {path!r} has no frames")
            self.names = [f"{i:05d}" for i in range(n)]

    def __len__(self) -> int:
        return len(self.names)

    def _iter_video(self) -> Iterator[np.ndarray]:
        cv2 = _cv2()
        cap = cv2.VideoCapture(self.path)
        try:
            while True:
                ok, bgr = cap.read()
                if not ok:
                    return
                yield cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
        finally:
            cap.release()

    def __iter__(self) -> Iterator[np.ndarray]:
        if self.is_folder:
            for f in self._files:
                yield read_image(f)
        else:
            for i, frame in enumerate(self._iter_video()):
                if i >= len(self.names):
                    return
                yield frame

    def __getitem__(self, i: int) -> np.ndarray:
        if not -len(self) <= i < len(self):
            raise IndexError(f"frame index {i} out of range for {len(self)} frames")
        i %= len(self)
        if self.is_folder:
            return read_image(self._files[i])
        cv2 = _cv2()
        cap = cv2.VideoCapture(self.path)
        try:
            cap.set(cv2.CAP_PROP_POS_FRAMES, i)
            ok, bgr = cap.read()
        finally:
            cap.release()
        if not ok:
            raise IndexError(f"could not decode frame {i} of {self.path!r}")
        return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)

    def tensors(self, normalize: str | None = "unit", device=None) -> Iterator[torch.Tensor]:
        """Stream the frames as (3, H, W) tensors (see `frame_to_tensor` for `normalize`)."""
        for frame in self:
            yield frame_to_tensor(frame, normalize, device)

    @property
    def size(self) -> tuple[int, int]:
        """(H, W) of the first frame."""
        return tuple(self[0].shape[:2])


def read_image(path: str) -> np.ndarray:
    cv2 = _cv2()
    bgr = cv2.imread(path, cv2.IMREAD_COLOR)
    if bgr is None:
        raise ValueError(f"could not read image {path!r}")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def frame_to_tensor(frame: np.ndarray, normalize: str | None = "unit", device=None, dtype=torch.float32):
    """uint8 RGB (H, W, 3) -> (3, H, W) tensor. normalize: None (uint8 kept), "unit" ([0, 1] float),
    "imagenet" ([0, 1] then ImageNet mean/std)."""
    if not isinstance(frame, np.ndarray) or frame.ndim != 3 or frame.shape[2] != 3 or frame.dtype != np.uint8:
        got = f"{frame.dtype} {frame.shape}" if isinstance(frame, np.ndarray) else type(frame).__name__
        raise TypeError(f"frame must be a uint8 RGB array (H, W, 3), got {got}")
    if normalize not in (None, "unit", "imagenet"):
        raise ValueError(f"normalize must be one of (None, 'unit', 'imagenet'), got {normalize!r}")
    t = torch.from_numpy(np.ascontiguousarray(frame)).permute(2, 0, 1).to(device)
    if normalize is None:
        return t.contiguous()
    t = t.to(dtype) / 255.0
    if normalize == "imagenet":
        mean = torch.tensor(IMAGENET_MEAN, dtype=dtype, device=t.device).view(3, 1, 1)
        std = torch.tensor(IMAGENET_STD, dtype=dtype, device=t.device).view(3, 1, 1)
        t = (t - mean) / std
    return t.contiguous()


def read_video(path: str, normalize: str | None = None, device=None):
    """The whole video at once: (T, 3, H, W) uint8 (normalize=None) or float tensor, and the frame names."""
    reader = VideoReader(path)
    frames = [frame_to_tensor(f, normalize, device) for f in reader]
    return torch.stack(frames), reader.names
