"""The propagation loop: features of every frame computed once and cached while a memory policy may read them;
each query frame read out from its memory frames, upsampled, argmaxed, written.

On a GPU the loop never synchronises with the host per frame: features, readout, upsampling and argmax stay on the
device, and the finished (H, W) id map is handed to a writer thread through a non-blocking copy into pinned memory
and a CUDA event that only the writer waits on. (Flow estimation with OpenCV is CPU work by nature; bring your own
device flow to avoid it.)
"""

from __future__ import annotations

import copy
import queue
import threading
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import numpy as np
import torch

from . import labels as L
from .memory import MemoryPolicy

VOID_ID = 255


def _frame_tensor(frame, device) -> torch.Tensor:
    """uint8 RGB (H, W, 3) array or (3, H, W) tensor -> (1, 3, H, W) on device (uint8 kept)."""
    if isinstance(frame, np.ndarray):
        if frame.ndim != 3 or frame.shape[2] != 3:
            raise ValueError(f"frames must be (H, W, 3) RGB arrays, got shape {frame.shape}")
        t = torch.from_numpy(np.ascontiguousarray(frame)).permute(2, 0, 1)
    elif isinstance(frame, torch.Tensor):
        if frame.dim() != 3 or frame.shape[0] != 3:
            raise ValueError(f"frame tensors must be (3, H, W), got shape {tuple(frame.shape)}")
        t = frame
    else:
        raise TypeError(f"frames must be numpy arrays or tensors, got {type(frame).__name__}")
    return t.to(device, non_blocking=True).unsqueeze(0)


def _ids_tensor(ids, name) -> torch.Tensor:
    a = np.asarray(ids.cpu() if hasattr(ids, "cpu") else ids)
    if a.dtype.kind == "u" and a.itemsize > 1:  # uint16 (a 16-bit mask PNG), uint32: torch has no min/max for them
        a = a.astype(np.int64)
    t = torch.as_tensor(a)
    if t.dim() != 2:
        raise ValueError(f"{name} must be a 2-D (H, W) map of object ids, got shape {tuple(t.shape)}")
    if t.dtype.is_floating_point:
        if not bool(torch.isfinite(t).all()) or not bool((t == t.round()).all()):
            raise ValueError(f"{name} must hold integer object ids, got non-integer values of dtype {t.dtype}")
        t = t.long()
    elif t.dtype == torch.bool:
        t = t.long()
    elif t.dtype.is_complex:
        raise TypeError(f"{name} must hold integer object ids, got dtype {t.dtype}")
    if t.numel() and (int(t.min()) < 0 or int(t.max()) > VOID_ID):
        raise ValueError(f"{name} must hold ids in 0..255 (0 background, 1..254 objects, 255 void), "
                         f"got {int(t.min())}..{int(t.max())}")
    return t


@dataclass
class _Entry:
    feat: torch.Tensor  # (1, C, h, w)
    label: torch.Tensor  # (1, K, h, w)
    frame: np.ndarray | None  # uint8 RGB (padded) kept only when flow is estimated


class Propagator:
    """Propagate given masks through a video.

    extractor: callable (1, 3, Hp, Wp) frame (uint8 or float in [0, 1]) -> (1, C, Hp/stride, Wp/stride) features.
    memory: a MemoryPolicy. readout: a readout (see readouts.py).
    stride: the extractor's output stride; frames are zero-padded bottom/right to a multiple of it and the output
      cropped back exactly (MAMP's size-aware alignment).
    label_downsample: "stride" (MAMP: each cell's top-left pixel), "nearest" (DINO: each cell's centre pixel) or
      "bilinear".
    memory_labels: "hard" (one-hot of the predicted ids, MAMP) or "soft" (the readout's soft labels, DINO/CRW).
    argmax_norm: "none", or "minmax": each upsampled label channel rescaled to [0, 1] over the frame before the
      argmax (DINO's norm_mask; the memory keeps the readout's labels as they were).
    flow: None; "dis" / "farneback" (OpenCV, from the query to each memory frame); or a callable
      (query_frame, memory_frames) -> (N, 2, H, W) flow in the flow_warp convention, at the resolution of the frames
      it is given (padded to a multiple of the stride) or of the video's own frames (the padding then takes the
      flow of the nearest frame pixel). Used only by readouts that take offsets (LocalReadout): windows are displaced by the flow resized to
      the features (its vectors scaled), clamped and rounded once.
    """

    def __init__(self, extractor: Callable, memory: MemoryPolicy, readout, *, stride: int | None = None,
                 label_downsample: str = "stride", memory_labels: str = "hard", argmax_norm: str = "none",
                 flow=None, device=None,
                 feature_dtype: torch.dtype = torch.float32):
        if not callable(extractor):
            raise TypeError("extractor must be callable: frame (1, 3, H, W) -> features (1, C, h, w)")
        if not isinstance(memory, MemoryPolicy):
            raise TypeError(f"memory must be a MemoryPolicy, got {type(memory).__name__}")
        stride = stride if stride is not None else getattr(extractor, "stride", None)
        if isinstance(stride, bool) or not isinstance(stride, int) or stride < 1:
            raise ValueError(f"stride must be an int >= 1 (the extractor's output stride), got {stride!r}")
        if label_downsample not in L.DOWNSAMPLE:
            raise ValueError(f"label_downsample must be one of {L.DOWNSAMPLE}, got {label_downsample!r}")
        if memory_labels not in ("hard", "soft"):
            raise ValueError(f"memory_labels must be 'hard' or 'soft', got {memory_labels!r}")
        if argmax_norm not in L.ARGMAX_NORM:
            raise ValueError(f"argmax_norm must be one of {L.ARGMAX_NORM}, got {argmax_norm!r}")
        if flow is not None and not callable(flow) and flow not in ("dis", "farneback"):
            raise ValueError(f"flow must be None, 'dis', 'farneback' or a callable, got {flow!r}")
        self.extractor, self.memory, self.readout = extractor, memory, readout
        self.stride, self.label_downsample, self.memory_labels = stride, label_downsample, memory_labels
        self.argmax_norm = argmax_norm
        self.flow = flow
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.feature_dtype = feature_dtype

    # -- pieces -------------------------------------------------------------------------------------------------
    def _features(self, x: torch.Tensor) -> torch.Tensor:
        f = self.extractor(x)
        if not isinstance(f, torch.Tensor) or f.dim() != 4 or f.shape[0] != 1:
            raise ValueError(f"extractor must return (1, C, h, w) features, got {getattr(f, 'shape', type(f))}")
        h, w = x.shape[-2] // self.stride, x.shape[-1] // self.stride
        if tuple(f.shape[-2:]) != (h, w):
            raise ValueError(f"extractor returned features of size {tuple(f.shape[-2:])} for a {tuple(x.shape[-2:])} "
                             f"frame; stride {self.stride} needs {(h, w)}")
        return f.to(self.feature_dtype)

    def _labels_from_ids(self, ids_padded: torch.Tensor, object_ids) -> torch.Tensor:
        oh = L.to_onehot(ids_padded, object_ids)
        return L.downsample(oh, self.stride, self.label_downsample).to(self.feature_dtype)

    def _offsets(self, frame: np.ndarray, mem_frames: list[np.ndarray], h: int, w: int, size) -> torch.Tensor:
        from .. import flow as F

        if callable(self.flow):
            fl = self.flow(frame, mem_frames)
        else:
            fl = F.estimate_flow([frame] * len(mem_frames), mem_frames, method=self.flow)
        if not isinstance(fl, torch.Tensor) or fl.dim() != 4 or fl.shape[1] != 2 or fl.shape[0] != len(mem_frames):
            raise ValueError(f"flow must give (N, 2, H, W) with N = {len(mem_frames)}, got {getattr(fl, 'shape', fl)}")
        padded = tuple(frame.shape[:2])
        if tuple(fl.shape[-2:]) == tuple(size) != padded:  # the video's own size: extend it over the padding
            fl = torch.nn.functional.pad(fl, (0, padded[1] - size[1], 0, padded[0] - size[0]), mode="replicate")
        elif tuple(fl.shape[-2:]) != padded:
            raise ValueError(f"flow must be at the frames' resolution {tuple(size)} (or padded, {padded}), got "
                             f"{tuple(fl.shape[-2:])}")
        # MAMP estimates the flow at feature resolution and clamps and rounds it once: resize first, round last
        fl = F.clamp_round_flow(F.resize_flow(fl.float(), (h, w)))
        return fl.unsqueeze(0).to(self.device, self.feature_dtype)

    # -- the loop -----------------------------------------------------------------------------------------------
    def propagate(self, frames: Iterable, masks: dict) -> Iterator[tuple[int, torch.Tensor]]:
        """Yield (t, ids) for every frame, ids a (H, W) uint8 tensor on the device.

        masks: {frame index: (H, W) ids}; frame 0 must be given. Ids need not be contiguous; 0 is background and 255
        is void (treated as background). A mask given at a later frame adds the objects it shows (late-appearing
        objects): its non-zero pixels override the prediction there and the frame becomes a permanent memory anchor.
        """
        if not isinstance(masks, dict) or 0 not in masks:
            raise ValueError("masks must be a dict {frame index: ids} that includes frame 0")
        given = {int(t): _ids_tensor(m, f"masks[{t}]") for t, m in masks.items()}
        if any(t < 0 for t in given):
            raise ValueError(f"mask frame indices must be >= 0, got {sorted(given)}")
        if hasattr(frames, "__len__") and max(given) >= len(frames):
            raise ValueError(f"masks given for frame(s) {[t for t in sorted(given) if t >= len(frames)]} of a "
                             f"{len(frames)}-frame video")
        object_ids = sorted({int(i) for m in given.values() for i in torch.unique(m).tolist()} - {0, VOID_ID})
        if not object_ids:
            raise ValueError("the given masks hold no object (every pixel is 0 or 255)")
        id_table = torch.tensor([0] + object_ids, dtype=torch.uint8, device=self.device)
        onehot_table = id_table.long()  # built once: no host-to-device copy inside the loop
        # this call's own policy: the anchors are per video, and one Propagator may run several at once
        memory = copy.copy(self.memory).with_anchors(given.keys())
        given_dev = {t: m.to(self.device, non_blocking=True) for t, m in given.items()}
        cache: dict[int, _Entry] = {}
        size = None
        for t, frame in enumerate(frames):
            x = _frame_tensor(frame, self.device)
            if size is None:
                size = tuple(x.shape[-2:])
            elif tuple(x.shape[-2:]) != size:
                raise ValueError(f"frame {t} has size {tuple(x.shape[-2:])}, frame 0 had {size}")
            xp, _ = L.pad_to_multiple(x, self.stride)
            Hp, Wp = xp.shape[-2:]
            h, w = Hp // self.stride, Wp // self.stride
            feat = self._features(xp)
            np_frame = None
            if self.flow is not None and getattr(self.readout, "uses_offsets", False):
                # a copy: for a CPU uint8 frame the conversion is a view of the caller's array, which a decoder
                # may refill before this frame leaves the memory
                np_frame = xp[0].permute(1, 2, 0).to("cpu", torch.uint8).numpy().copy() if xp.dtype == torch.uint8 \
                    else (xp[0].permute(1, 2, 0).clamp(0, 1) * 255 + 0.5).to("cpu", torch.uint8).numpy()
            if t == 0:
                ids_p, _ = L.pad_to_multiple(given_dev[0], self.stride)
                if tuple(given_dev[0].shape) != size:
                    raise ValueError(f"masks[0] has size {tuple(given_dev[0].shape)} but the frames are {size}")
                ids_p = torch.where(ids_p == VOID_ID, torch.zeros_like(ids_p), ids_p)
                label = self._labels_from_ids(ids_p, onehot_table)
                ids = ids_p
            else:
                mem = memory.indices(t)
                k = torch.stack([cache[f].feat[0] for f in mem]).unsqueeze(0)
                v = torch.stack([cache[f].label[0] for f in mem]).unsqueeze(0)
                offsets = None
                if np_frame is not None:
                    offsets = self._offsets(np_frame, [cache[f].frame for f in mem], h, w, size)
                is_global = [f in memory.anchors or f == 0 for f in mem]
                soft = self.readout(feat, k, v, offsets=offsets, is_global=is_global)
                scores = L.upsample(soft.float(), (Hp, Wp))
                if self.argmax_norm == "minmax":
                    scores = L.minmax_channels(scores, size)
                ids = L.argmax_ids(scores, id_table)
                label = soft.to(self.feature_dtype) if self.memory_labels == "soft" else None
                if t in given_dev:
                    g = given_dev[t]
                    if tuple(g.shape) != size:
                        raise ValueError(f"masks[{t}] has size {tuple(g.shape)} but the frames are {size}")
                    g, _ = L.pad_to_multiple(g, self.stride)
                    g = g.to(ids.dtype)
                    ids = torch.where((g > 0) & (g != VOID_ID), g, ids)
                    label = None  # a given frame stores its (merged) hard labels
                if label is None:
                    label = self._labels_from_ids(ids, onehot_table)
            cache[t] = _Entry(feat, label, np_frame)
            keep = memory.retain(t)
            for f in [f for f in cache if f not in keep]:
                del cache[f]
            yield t, L.unpad(ids, size).to(torch.uint8)
        seen = 0 if size is None else t + 1
        unused = [g for g in sorted(given) if g >= seen]
        if unused:  # frames of unknown length: found out only at their end
            raise ValueError(f"masks given for frame(s) {unused} of a {seen}-frame video")


class MaskWriter:
    """Writes finished id maps in a background thread, so the propagation loop never waits for the host.
    `put(name, ids)` starts a non-blocking device->host copy (pinned memory + CUDA event on GPU); the thread waits
    for the copy and writes `<folder>/<name>.png` (palette PNG) and an optional overlay."""

    def __init__(self, folder: str, overlay_folder: str | None = None, overlay_video: str | None = None,
                 fps: float = 24.0, max_pending: int = 16):
        import os

        os.makedirs(folder, exist_ok=True)
        self.folder, self.overlay_folder = folder, overlay_folder
        self.overlay_video, self.fps, self._video = overlay_video, fps, None
        self.q: queue.Queue = queue.Queue(maxsize=max_pending)
        self.error: BaseException | None = None
        self.written = 0
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def put(self, name: str, ids: torch.Tensor, frame: np.ndarray | None = None) -> None:
        if self.error is not None:
            self._raise_error()
        if ids.is_cuda:
            host = torch.empty(ids.shape, dtype=ids.dtype, pin_memory=True)
            host.copy_(ids, non_blocking=True)  # on ids' device's current stream: the event must follow that one
            ev = torch.cuda.Event()
            ev.record(torch.cuda.current_stream(ids.device))
        else:
            host, ev = ids.clone(), None  # the caller may reuse its tensor before the thread writes it
        self.q.put((name, host, ev, None if frame is None else np.array(frame, copy=True)))

    def _run(self):
        import os

        from PIL import Image

        from ..io import overlay, write_mask
        from ..io.overlay import pad_to_even

        while True:
            item = self.q.get()
            if item is None:
                return
            name, host, ev, frame = item
            try:
                if ev is not None:
                    ev.synchronize()
                a = host.numpy()
                write_mask(os.path.join(self.folder, f"{name}.png"), a)
                if frame is not None and (self.overlay_folder or self.overlay_video):
                    ov = overlay(frame, a)
                    if self.overlay_folder is not None:
                        os.makedirs(self.overlay_folder, exist_ok=True)
                        Image.fromarray(ov).save(os.path.join(self.overlay_folder, f"{name}.png"))
                    if self.overlay_video is not None:
                        self._write_video_frame(pad_to_even(ov))
                self.written += 1
            except BaseException as e:  # reported to the producer on its next put/close
                self.error = e

    def _write_video_frame(self, ov: np.ndarray) -> None:
        import cv2

        if self._video is None:
            h, w = ov.shape[:2]
            self._video = cv2.VideoWriter(self.overlay_video, cv2.VideoWriter_fourcc(*"mp4v"), self.fps, (w, h))
            if not self._video.isOpened():
                raise ValueError(f"OpenCV cannot write an MP4 to {self.overlay_video!r}")
        self._video.write(cv2.cvtColor(ov, cv2.COLOR_RGB2BGR))

    def close(self) -> None:
        self.q.put(None)
        self.thread.join()
        if self._video is not None:
            self._video.release()
        if self.error is not None:
            self._raise_error()

    def _raise_error(self) -> None:
        """The writer thread's error, chained; a bad input or an unwritable file (ValueError, OSError) as a
        ValueError, which the CLI reports in one line."""
        if isinstance(self.error, (ValueError, OSError)):
            raise ValueError(f"the mask writer failed: {self.error}") from self.error
        raise RuntimeError("the mask writer failed") from self.error
