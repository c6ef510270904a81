"""Mask propagation: memory policies, readouts on vosops's fused ops, label handling, presets, and the loop.

    from vosops.propagation import Propagator, LabPositionFeatures, MampMemory, LocalReadout
    prop = Propagator(LabPositionFeatures(), MampMemory(), LocalReadout(radius=12, topk=36))
    for t, ids in prop.propagate(frames, {0: first_mask}): ...
"""

from .engine import MaskWriter, Propagator
from .features import LabPositionFeatures, rgb_to_lab
from .labels import argmax_ids, downsample, pad_to_multiple, to_onehot, unpad, upsample
from .memory import EveryS, FirstAndRecent, MampMemory, MemoryPolicy, first_fifo, first_last
from .presets import PRESETS, Preset, get_preset
from .readouts import CRWReadout, LocalReadout, TopKAttentionReadout, local_candidates_to_memory_index


def weight_free(device=None, radius: int = 12, topk: int = 36, scale: float = 40.0, memory=None):
    """The checkpoint-free default: Lab + position features at stride 4, MAMP's memory schedule and a local top-k
    readout (square window, masked borders)."""
    return Propagator(LabPositionFeatures(stride=4), memory or MampMemory(),
                      LocalReadout(radius=radius, topk=topk, scale=scale), stride=4, device=device)


__all__ = [
    "CRWReadout", "EveryS", "FirstAndRecent", "LabPositionFeatures", "LocalReadout", "MampMemory", "MaskWriter",
    "MemoryPolicy", "PRESETS", "Preset", "Propagator", "TopKAttentionReadout", "argmax_ids", "downsample",
    "first_fifo", "first_last", "get_preset", "local_candidates_to_memory_index", "pad_to_multiple", "rgb_to_lab",
    "to_onehot", "unpad", "upsample", "weight_free",
]
