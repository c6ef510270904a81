"""The propagation engine's finer rules, each pinned by a test that a plausible slip in the code fails: void (255)
pixels in given masks, which frames the readout treats as global, what a given frame stores in memory, rescaling
over the frame rather than its padding, the presets' parameters, label resampling, position features, and the
readouts' caps on top-k."""

import math

import numpy as np
import pytest
import torch

from vosops.propagation import CRWReadout, LabPositionFeatures, LocalReadout, MampMemory, Propagator, first_last, get_preset
from vosops.propagation import labels as L
from vosops.propagation.synthetic import synthetic_video


def _small_engine(**kw):
    return Propagator(LabPositionFeatures(stride=4), kw.pop("memory", MampMemory()),
                      kw.pop("readout", LocalReadout(radius=8, topk=36, scale=40.0)), **kw)


class _Spy:
    """A readout that records what the engine hands it and returns fixed soft labels (background everywhere,
    0.6 vs 0.4 for the first object), so nothing depends on the features."""

    uses_offsets = False

    def __init__(self):
        self.calls = []

    def __call__(self, q, k, v, offsets=None, is_global=None):
        self.calls.append({"k": k.clone(), "v": v.clone(), "is_global": list(is_global)})
        K = v.shape[2]
        soft = torch.zeros(1, K, *q.shape[-2:])
        soft[0, 0] = 0.6
        soft[0, 1] = 0.4
        return soft


def test_void_255_in_the_first_mask_is_accepted_and_becomes_background():
    """Void (255) in the first mask is accepted and becomes background; it never reaches the output."""
    frames, gts = synthetic_video(T=3, H=32, W=32, seed=1)
    first = gts[0].copy()
    first[:4, :4] = 255
    out = [ids.numpy() for _, ids in _small_engine().propagate(frames, {0: first})]
    assert not any((o == 255).any() for o in out)
    assert (out[0][:4, :4] == 0).all()
    np.testing.assert_array_equal(out[0][4:], gts[0][4:])


def test_a_mask_of_only_void_holds_no_object():
    """Void (255) is not an object id."""
    frames, gts = synthetic_video(T=3, H=32, W=32, seed=1)
    only_void = np.where(gts[0] > 0, 255, 0).astype(np.uint8)
    with pytest.raises(ValueError, match="no object"):
        list(_small_engine().propagate(frames, {0: only_void}))


def test_void_in_a_later_mask_does_not_override_the_prediction():
    """A later mask's void pixels keep the prediction (they are not written into the output)."""
    frames, gts = synthetic_video(T=4, H=32, W=32, seed=1)
    later = np.zeros((32, 32), np.uint8)
    later[:8, :8] = 255
    plain = [ids.numpy() for _, ids in _small_engine().propagate(frames, {0: gts[0]})]
    got = [ids.numpy() for _, ids in _small_engine().propagate(frames, {0: gts[0], 2: later})]
    assert not (got[2] == 255).any()
    np.testing.assert_array_equal(got[2], plain[2])


def test_a_mask_past_the_end_is_rejected_before_any_frame_is_propagated():
    """With a video of known length the error comes up front, not only after
    every frame was propagated (and written)."""
    frames, gts = synthetic_video(T=3, H=32, W=32)
    gen = _small_engine().propagate(frames, {0: gts[0], 3: gts[2]})
    with pytest.raises(ValueError, match=r"masks given for frame\(s\) \[3\] of a 3-frame video"):
        next(gen)


def test_late_anchor_frames_are_global_for_the_readout():
    """Every frame with a given mask is global for the readout (CRW searches it over the whole frame), not only frame 0."""
    frames, gts = synthetic_video(T=5, H=32, W=32, seed=2)
    spy = _Spy()
    eng = Propagator(LabPositionFeatures(stride=4), first_last(1), spy)
    list(eng.propagate(frames, {0: gts[0], 2: gts[2]}))
    # query t=4 reads [0, 2, 3] (frame 2 an anchor, 3 the previous frame)
    assert spy.calls[-1]["is_global"] == [True, True, False]


def test_a_given_frame_stores_its_merged_hard_labels_even_with_soft_memory():
    """With memory_labels="soft", a frame with a given mask stores its merged hard labels, other frames their soft ones."""
    frames, gts = synthetic_video(T=4, H=32, W=32, seed=2)
    spy = _Spy()
    eng = Propagator(LabPositionFeatures(stride=4), first_last(1), spy, memory_labels="soft")
    first = gts[0]
    given2 = np.zeros((32, 32), np.uint8)
    given2[:16, :16] = 1
    list(eng.propagate(frames, {0: first, 2: given2}))
    v = spy.calls[-1]["v"]  # query t=3 reads [0, 2]
    v2 = v[0, 1]  # frame 2's labels, (K, 8, 8)
    ids2 = np.where(given2 > 0, given2, 0)  # prediction is background everywhere (0.6 > 0.4), merged with given2
    want = L.downsample(L.to_onehot(torch.from_numpy(ids2), [1, 3]), 4, "stride")[0]
    torch.testing.assert_close(v2, want)
    # and a non-given frame keeps its soft labels
    v1 = spy.calls[1]["v"][0, -1]  # query t=2 reads [0, 1]: frame 1's soft labels
    assert torch.allclose(v1[0], torch.full_like(v1[0], 0.6)) and torch.allclose(v1[1], torch.full_like(v1[1], 0.4))


def test_minmax_argmax_norm_uses_the_frame_not_the_padding():
    """argmax_norm='minmax' rescales over the frame, not the padding: a 25-row video padded to 32 at stride 8, whose last feature row's
    values appear only in the padding."""
    class Fixed:
        def __call__(self, feat, k, v, offsets=None, is_global=None):
            g = torch.Generator().manual_seed(0)
            soft = torch.rand(1, 2, *feat.shape[-2:], generator=g)
            soft[0, :, -1] = torch.tensor([[5.0], [-5.0]])  # the padding-only row: extreme values
            self.soft = soft
            return soft

    ro = Fixed()
    frames = [f[:25] for f in synthetic_video(T=3, H=32, W=32)[0][:2]]
    first = np.zeros((25, 32), np.uint8)
    first[4:12, 4:12] = 1
    eng = Propagator(LabPositionFeatures(stride=8), first_last(1), ro, argmax_norm="minmax")
    got = [ids for _, ids in eng.propagate(frames, {0: first})][1]
    scores = L.upsample(ro.soft, (32, 32))[..., :25, :]
    want = L.argmax_ids(L.minmax_channels(scores), torch.tensor([0, 1], dtype=torch.uint8))
    assert torch.equal(got, want)


def test_mamp_long_term_frame_is_read_without_the_previous_frame_in_the_short_term():
    """With short-term offsets (2,), frame 5 is
    long-term memory from query 6 on."""
    m = MampMemory(long_term=(0, 5), short_term=(2,))
    assert m.indices(6) == [0, 4, 5]
    assert m.indices(5) == [0, 3]


def test_presets_pin_the_papers_parameters():
    """Each preset's memory schedule and readout parameters,
    as presets.py's docstring states them from the papers' released code."""
    mamp = get_preset("mamp")
    assert mamp.memory.indices(20) == [0, 5, 15, 17, 19] and mamp.memory.indices(7) == [0, 2, 4, 5, 6]
    assert (mamp.readout.radius, mamp.readout.topk, mamp.readout.border, mamp.readout.window) == (12, 36, "zero",
                                                                                                   "square")
    assert mamp.stride == 4 and mamp.label_downsample == "stride" and mamp.memory_labels == "hard"
    dino = get_preset("dino")
    assert dino.memory.indices(20) == [0] + list(range(13, 20))
    assert (dino.readout.radius, dino.readout.topk, dino.readout.normalize, dino.readout.scale) == (
        12, 5, "threshold", 10.0)
    ino = get_preset("ino")
    assert ino.memory.indices(20) == [0] + list(range(10, 20))
    assert (ino.readout.radius, ino.readout.topk) == (40, 5)
    jf = get_preset("jointformer-memory")
    assert all(jf.memory.indices(t) == sorted({0, t - 1}) for t in range(1, 30))
    assert (jf.readout.topk, jf.readout.heads, jf.stride) == (60, 12, 16)
    jy = get_preset("jointformer-memory-ytvos")
    assert jy.memory.indices(21) == [0, 10, 15, 20] and jy.readout.topk == 120
    mv = get_preset("maskvos")
    assert (mv.stride, mv.label_downsample, mv.memory_labels) == (8, "bilinear", "soft")
    assert (mv.readout.radius, mv.readout.topk, mv.readout.window) == (12, 10, "circle")


def test_bilinear_label_downsampling_is_antialiased():
    """Bilinear label downsampling is antialiased: a one-pixel object at (0, 0) is not sampled by plain bilinear at stride 4
    (cell centre 1.5 px) but an antialiased resize sees it."""
    lab = torch.zeros(1, 1, 8, 8)
    lab[0, 0, 0, 0] = 1.0
    d = L.downsample(lab, 4, "bilinear")
    assert d[0, 0, 0, 0] > 0.01


def test_upsample_is_bilinear_with_align_corners_false():
    """Upsampling is bilinear with align_corners=False."""
    x = torch.tensor([0.0, 1.0]).view(1, 1, 1, 2)
    torch.testing.assert_close(L.upsample(x, (1, 4))[0, 0, 0], torch.tensor([0.0, 0.25, 0.75, 1.0]))


def test_minmax_leaves_a_channel_whose_maximum_is_zero():
    """DINO's norm_mask rescales only channels with a positive maximum."""
    x = torch.tensor([-1.0, 0.0]).view(1, 1, 1, 2)
    assert torch.equal(L.minmax_channels(x), x)


def test_local_readout_default_scale_is_one_over_sqrt_c():
    """LocalReadout's default scale is 1/sqrt(C)."""
    torch.manual_seed(0)
    C, h, w, N, K = 9, 5, 6, 2, 3
    q, k, v = torch.randn(1, C, h, w), torch.randn(1, N, C, h, w), torch.rand(1, N, K, h, w)
    a = LocalReadout(radius=2, topk=6)(q, k, v)
    b = LocalReadout(radius=2, topk=6, scale=1 / 3.0)(q, k, v)
    torch.testing.assert_close(a, b)


def test_position_features_are_x_then_y_at_cell_centres():
    """Position channels: x then y, sampled at the cell centres."""
    H, W, s = 16, 32, 4
    f = LabPositionFeatures(stride=s, position_weight=1.0)(torch.zeros(3, H, W, dtype=torch.uint8))
    diag = math.hypot(H, W)
    xs = (torch.arange(W // s) + 0.5) * s / diag
    ys = (torch.arange(H // s) + 0.5) * s / diag
    torch.testing.assert_close(f[0, 6], torch.cos(math.pi * xs).expand(H // s, W // s))
    torch.testing.assert_close(f[0, 7], torch.cos(math.pi * ys).view(-1, 1).expand(H // s, W // s))
    torch.testing.assert_close(f[0, 8], torch.sin(math.pi * xs).expand(H // s, W // s))


def test_float_frames_handed_to_the_flow_are_rounded_to_uint8():
    """Float frames kept for the flow are rounded (not truncated) to uint8."""
    frames = [torch.full((3, 32, 32), 100.6 / 255) for _ in range(3)]
    first = np.zeros((32, 32), np.uint8)
    first[8:16, 8:16] = 1
    seen = []

    def flow(query, mem):
        seen.append(int(query[0, 0, 0]))
        return torch.zeros(len(mem), 2, 32, 32)

    list(_small_engine(flow=flow, memory=first_last(1)).propagate(frames, {0: first}))
    assert seen == [101, 101]


def test_local_readout_topk_larger_than_its_candidates_is_capped():
    """LocalReadout caps its topk at the candidate count (N x window size); local_attention would refuse it."""
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 4, 5, 5), torch.randn(1, 1, 4, 5, 5), torch.rand(1, 1, 2, 5, 5)
    out = LocalReadout(radius=1, topk=36, scale=0.5)(q, k, v)
    torch.testing.assert_close(out, LocalReadout(radius=1, topk=9, scale=0.5)(q, k, v))


def test_crw_readout_on_a_feature_map_smaller_than_topk():
    """CRW's global top-k is capped at the number of keys (global_topk would refuse 10 of a 2 x 2 map)."""
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 4, 2, 2), torch.randn(1, 2, 4, 2, 2), torch.rand(1, 2, 3, 2, 2)
    out = CRWReadout(radius=2, topk=10)(q, k, v, is_global=[True, False])
    assert out.shape == (1, 3, 2, 2) and torch.isfinite(out).all()
    assert (out >= v.min() - 1e-6).all() and (out <= v.max() + 1e-6).all()  # a convex combination of v
