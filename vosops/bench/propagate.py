"""Propagation throughput per preset: frames per second of the whole loop (features -> readout -> upsample ->
argmax -> memory update) in steady state, i.e. with a full memory.

<preset>-given       features given (a bank of random feature maps with the preset's channels and stride):
                     engine + kernels only.
<preset>-weightfree  the weight-free Lab+position extractor at the preset's stride (jointformer: 2 heads).
Frames are 480p (480x854) on GPU; on CPU the configurations are at 240x427 so the suite stays runnable on a
small machine (the config name says which). The timed call propagates one frame, so fps = 1000 / ms
(`frames_per_s` in the JSON). Baseline (GPU only): the same loop with every op on the reference backend.
No flow estimation is included (MAMP's target: >= 200 fps on an H100 without flow).
"""

from __future__ import annotations

import itertools

import torch

import vosops

from .registry import Case

# preset -> (feature channels, stride)
GIVEN_FEATURES = {"mamp": (64, 4), "maskvos": (128, 8), "ino": (384, 8), "dino": (384, 8),
                  "jointformer-memory": (768, 16)}
SIZES = {"cuda": (480, 854, "480p"), "cpu": (240, 427, "240p")}
WARM_FRAMES = 6  # at least this many, and enough for the preset's memory to fill (MAMP reads frame 5)


class _Bank:
    """An extractor returning precomputed features in turn: "given features", no extraction cost."""

    def __init__(self, feats, stride):
        self.feats, self.stride, self.i = feats, stride, 0

    def __call__(self, x):
        f = self.feats[self.i % len(self.feats)]
        self.i += 1
        return f


def make_runner(preset: str, mode: str, device: str, H: int, W: int, backend: str | None = None):
    """A zero-argument callable that propagates the next frame of an endless clip (memory already full)."""
    from vosops.propagation import LabPositionFeatures, Propagator, TopKAttentionReadout, get_preset

    p = get_preset(preset, heads=12 if mode == "given" else 2)
    C, stride = GIVEN_FEATURES[preset]
    g = torch.Generator(device="cpu").manual_seed(0)
    frames = [torch.randint(0, 256, (3, H, W), generator=g, dtype=torch.uint8).to(device) for _ in range(4)]
    Hp, Wp = -(-H // stride) * stride, -(-W // stride) * stride
    if mode == "given":
        feats = [torch.randn(1, C, Hp // stride, Wp // stride, generator=g).to(device) for _ in range(4)]
        extractor = _Bank(feats, stride)
    else:
        extractor = LabPositionFeatures(stride=stride)
        if isinstance(p.readout, TopKAttentionReadout):
            p.readout.heads = 2
    p.flow = None  # no flow estimation: the benchmark times the engine and its kernels
    eng = Propagator(extractor, device=device, **p.engine_kwargs())
    mask = torch.zeros(H, W, dtype=torch.uint8)
    mask[H // 4:H // 2, W // 4:W // 2] = 1
    mask[H // 2:3 * H // 4, W // 2:3 * W // 4] = 2
    gen = eng.propagate(itertools.cycle(frames), {0: mask})
    ctx = (lambda: vosops.use_backend(backend)) if backend else None

    def step():
        if ctx is None:
            return next(gen)[1]
        with ctx():
            return next(gen)[1]

    for _ in range(max(WARM_FRAMES, p.memory.horizon + 1)):
        step()
    return step


def cases(device: str) -> list[Case]:
    H, W, tag = SIZES[device]
    out = []
    for preset in GIVEN_FEATURES:
        for mode in ("given", "weightfree"):
            config = f"{preset}-{tag}-{mode}"
            impls = {"auto": None}
            if device == "cuda":  # the reference path takes minutes per frame on a small CPU
                impls["reference"] = "reference"
            for impl, backend in impls.items():
                def setup(preset=preset, mode=mode, backend=backend):
                    return make_runner(preset, mode, device, H, W, backend)

                out.append(Case(op="propagate", config=config, device=device, impl=impl, direction="fwd",
                                setup=setup, baseline=impl == "reference",
                                notes="one frame per call: frames/s = 1000 / ms"))
    return out


def frames_per_s(row: dict) -> float:
    return 1000.0 / row["ms"]

