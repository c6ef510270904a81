"""A DAVIS-layout dataset: JPEGImages/<res>/<seq>/*.jpg, Annotations/<res>/<seq>/*.png, optional ImageSets."""

from __future__ import annotations

import os

import numpy as np

from .masks import read_mask
from .video import VideoReader, frame_sort_key


class DavisDataset:
    """Sequences of a DAVIS-layout folder.

    `imageset` names a list file (e.g. "2017/val.txt" under ImageSets/, or a path); without it every sequence folder
    under JPEGImages/<resolution> is used, sorted.
    """

    def __init__(self, root: str, resolution: str = "480p", imageset: str | None = None):
        self.root = os.fspath(root)
        self.resolution = resolution
        self.image_root = os.path.join(self.root, "JPEGImages", resolution)
        self.mask_root = os.path.join(self.root, "Annotations", resolution)
        if not os.path.isdir(self.image_root):
            raise ValueError(f"root {self.root!r} is not a DAVIS-layout dataset: no folder JPEGImages/{resolution}")
        if imageset is not None:
            path = imageset if os.path.isfile(imageset) else os.path.join(self.root, "ImageSets", imageset)
            if not os.path.isfile(path):
                raise ValueError(f"imageset {imageset!r} not found (looked for {path!r})")
            with open(path) as f:
                self.sequences = [line.strip() for line in f if line.strip()]
            missing = [s for s in self.sequences if not os.path.isdir(os.path.join(self.image_root, s))]
            if missing:
                raise ValueError(f"imageset {imageset!r} lists sequences with no frames: {missing}")
        else:
            # hidden folders (.ipynb_checkpoints, .git) are not sequences
            self.sequences = sorted(d for d in os.listdir(self.image_root)
                                    if not d.startswith(".") and os.path.isdir(os.path.join(self.image_root, d)))

    def __len__(self) -> int:
        return len(self.sequences)

    def __iter__(self):
        return iter(self.sequences)

    def frames(self, seq: str) -> VideoReader:
        return VideoReader(os.path.join(self.image_root, seq))

    def mask_paths(self, seq: str) -> dict[str, str]:
        """{frame name: annotation path} for the annotated frames of a sequence."""
        folder = os.path.join(self.mask_root, seq)
        if not os.path.isdir(folder):
            return {}
        return {os.path.splitext(f)[0]: os.path.join(folder, f)
                for f in sorted(os.listdir(folder), key=frame_sort_key)
                if f.lower().endswith(".png") and not f.startswith(".")}

    def first_mask(self, seq: str) -> np.ndarray:
        """The annotation of the sequence's first frame as object ids."""
        names = self.frames(seq).names
        paths = self.mask_paths(seq)
        if names[0] not in paths:
            raise ValueError(f"sequence {seq!r} has no annotation for its first frame {names[0]!r}")
        return read_mask(paths[names[0]])

    def masks(self, seq: str) -> dict[str, np.ndarray]:
        return {name: read_mask(p) for name, p in self.mask_paths(seq).items()}
