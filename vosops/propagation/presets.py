"""Presets: each paper's inference protocol (memory schedule, readout, label handling), given features.

Parameters are those of the released code / paper texts (see /work/shared/papers and the repositories named):

mamp  (MAMP, bo-miao/MAMP scripts/test_davis.sh + models/mamp.py): ResNet-18 features C=64 at stride 4; memory
      frames 0 and 5 (long-term) + t-1, t-3, t-5 (short-term) [get_davis_ref_index(i, 2, 5)]; correlation window
      r=12 square (test_corr_radius=12) over all memory frames, correlation / sqrt(C) (1/8), zero-padded borders,
      top-36 jointly over the N·625 candidates, softmax; labels downsampled by striding (x[::4, ::4]) as one-hot of
      the predicted ids (hard); padding to a multiple of 4 (pad_divisible=4); bilinear upsampling, argmax; flow from
      the query to each memory frame (--optical_flow_warp 1; RAFT at stride 4 there, OpenCV DIS here: flow="dis"),
      resized to the features, clamped to ±(w, h) and rounded once, displaces the windows.
maskvos (Mask-VOS, 0liliulei/Mask-VOS; CRW-style readout): stride-8 features; memory = the first frame + the 20
      previous frames (paper §4 "Testing": "its prior 20 frames"; Table 4b's best "First + Last 1:20"; released
      config CXT_SIZE 20); the first frame searched globally, the others in a circle r=12 (RADIUS 12); L2-normalised
      features, scale 1/0.05 (TEMP 0.05), top-10 (KNN 10) over the union, one softmax; soft label maps (bilinear
      downsampling) propagated. (The released code pads the first 20 frames' context with copies of frame 0; here
      a frame is read once.)
ino   (INO, appendix A.2): stride 8 (ViT-S/8); first frame + N_c=10 previous frames; square window N_r=40;
      L2-normalised features, temperature 0.1 (scale 10), top N_k=5 by the DINO threshold rule; soft labels; label
      handling of DINO's script, which INO follows ("the same label propagation strategy as [DINO, ...]"): see dino.
dino  (DINO eval_video_segmentation defaults): as ino with n_last_frames=7, size_mask_neighborhood=12, topk=5; the
      given masks downsampled by PIL's nearest resize (each cell's centre pixel: label_downsample="nearest"); the
      upsampled labels rescaled per channel by norm_mask before the argmax (argmax_norm="minmax").
jointformer-memory (JointFormer, inference section): memory of the first and the previous frame on DAVIS
      (YouTube-VOS: also every 5th frame, at most 3: `jointformer-memory-ytvos`); readout by multi-head top-k
      attention, 12 heads of D=64, scale 1/sqrt(64), top-60 (DAVIS) / top-120 (YouTube-VOS). Stride 16.
"""

from __future__ import annotations

from dataclasses import dataclass

from .memory import EveryS, FirstAndRecent, MampMemory, MemoryPolicy
from .readouts import CRWReadout, LocalReadout, TopKAttentionReadout


@dataclass
class Preset:
    name: str
    stride: int
    memory: MemoryPolicy
    readout: object
    label_downsample: str = "stride"
    memory_labels: str = "hard"
    argmax_norm: str = "none"
    flow: str | None = None  # the flow the protocol estimates (the engine's `flow` argument)

    def engine_kwargs(self) -> dict:
        return {"memory": self.memory, "readout": self.readout, "stride": self.stride,
                "label_downsample": self.label_downsample, "memory_labels": self.memory_labels,
                "argmax_norm": self.argmax_norm, "flow": self.flow}


def _mamp(**kw):
    return Preset("mamp", 4, MampMemory((0, 5), (1, 3, 5)),
                  LocalReadout(radius=12, topk=36, scale=kw.get("scale"), border="zero"),
                  "stride", "hard", flow="dis")


def _maskvos(**kw):
    return Preset("maskvos", 8, FirstAndRecent(20), CRWReadout(radius=12, topk=10, scale=1 / 0.05),
                  "bilinear", "soft")


def _ino(**kw):
    return Preset("ino", 8, FirstAndRecent(10),
                  LocalReadout(radius=40, topk=5, normalize="threshold", scale=1 / 0.1, l2_normalize=True),
                  "nearest", "soft", "minmax")


def _dino(**kw):
    return Preset("dino", 8, FirstAndRecent(7),
                  LocalReadout(radius=12, topk=5, normalize="threshold", scale=1 / 0.1, l2_normalize=True),
                  "nearest", "soft", "minmax")


def _jointformer(**kw):
    return Preset("jointformer-memory", 16, EveryS(every=5, max_frames=0, previous=True),
                  TopKAttentionReadout(topk=60, heads=kw.get("heads", 12)), "bilinear", "hard")


def _jointformer_ytvos(**kw):
    return Preset("jointformer-memory-ytvos", 16, EveryS(every=5, max_frames=3, previous=True),
                  TopKAttentionReadout(topk=120, heads=kw.get("heads", 12)), "bilinear", "hard")


PRESETS = {"mamp": _mamp, "maskvos": _maskvos, "ino": _ino, "dino": _dino, "jointformer-memory": _jointformer,
           "jointformer-memory-ytvos": _jointformer_ytvos}


def get_preset(name: str, **overrides) -> Preset:
    """A fresh Preset (policies hold per-video state). Overrides: scale (mamp), heads (jointformer)."""
    if name not in PRESETS:
        raise ValueError(f"preset must be one of {tuple(PRESETS)}, got {name!r}")
    return PRESETS[name](**overrides)
