"""vosops.propagation: memory schedules against the papers' code, labels and padding, readouts against dense
computations, and the engine on small synthetic videos (multi-object, non-contiguous and late-appearing ids)."""

import numpy as np
import pytest
import torch

import vosops
from vosops import metrics
from vosops.propagation import (CRWReadout, EveryS, LabPositionFeatures, LocalReadout, MampMemory, MaskWriter,
                                Propagator, TopKAttentionReadout, first_fifo, first_last, get_preset, PRESETS)
from vosops.propagation import labels as L
from vosops.propagation.readouts import local_candidates_to_memory_index
from vosops.propagation.synthetic import synthetic_video


# -- memory schedules ------------------------------------------------------------------------------------------
def mamp_released(i, mem_gap=2):
    """bo-miao/MAMP functions.get_davis_ref_index(i, mem_gap, ref=5), transcribed; the query frame is i + 1."""
    ref_index = list(filter(lambda x: x <= i, [0, 5])) + list(
        filter(lambda x: x > 0, range(i, i - mem_gap * 3, -mem_gap)))[::-1]
    return sorted(set(ref_index))


def test_mamp_schedule_matches_released_code():
    m = MampMemory()
    for t in range(1, 80):
        assert m.indices(t) == mamp_released(t - 1), t
    assert m.indices(1) == [0]
    assert m.indices(7) == [0, 2, 4, 5, 6]
    assert m.indices(20) == [0, 5, 15, 17, 19]


def dino_released(t, n):
    """DINO eval_video_segmentation: frame 0 + a queue of at most n previous frames (frame 0 never queued)."""
    que = []
    for cnt in range(1, t + 1):
        used = [0] + que
        if cnt == t:
            return used
        if len(que) == n:
            que.pop(0)
        que.append(cnt)


def test_presets_follow_the_papers_protocols():
    # Mask-VOS tests with the first frame and "its prior 20 frames" (CRW's protocol)
    assert get_preset("maskvos").memory.indices(30) == [0] + list(range(10, 30))
    assert get_preset("maskvos").memory.indices(3) == [0, 1, 2]
    # MAMP displaces its windows by flow; DINO / INO sample the given masks at cell centres and rescale the
    # upsampled label channels before the argmax
    assert get_preset("mamp").engine_kwargs()["flow"] == "dis"
    for name in ("dino", "ino"):
        kw = get_preset(name).engine_kwargs()
        assert (kw["label_downsample"], kw["argmax_norm"], kw["flow"]) == ("nearest", "minmax", None)
    for name in ("maskvos", "jointformer-memory"):
        assert get_preset(name).engine_kwargs()["argmax_norm"] == "none"


def test_first_last_and_fifo_schedules():
    for n in (5, 7, 10):
        for pol in (first_last(n), first_fifo(n)):
            for t in range(1, 40):
                assert pol.indices(t) == dino_released(t, n), (n, t)
    assert first_last(7).indices(20) == [0, 13, 14, 15, 16, 17, 18, 19]
    assert first_fifo(5).indices(10) == [0, 5, 6, 7, 8, 9]


def test_every_s_schedule():
    yt = EveryS(every=5, max_frames=3)
    assert yt.indices(1) == [0]
    assert yt.indices(6) == [0, 5]
    assert yt.indices(21) == [0, 10, 15, 20]
    assert yt.indices(23) == [0, 10, 15, 20, 22]
    davis = EveryS(every=5, max_frames=0)
    assert all(davis.indices(t) == sorted({0, t - 1}) for t in range(1, 30))


@pytest.mark.parametrize("pol", [MampMemory(), first_last(7), first_fifo(5), EveryS(5, 3), EveryS(5, 0)],
                         ids=repr)
def test_retain_covers_every_later_read(pol):
    pol.with_anchors([0, 9])
    for t in range(0, 60):
        keep = pol.retain(t)
        for t2 in range(t + 1, t + 40):
            needed = {f for f in pol.indices(t2) if f <= t}
            assert needed <= keep, (t, t2, needed - keep)
    assert 9 in pol.indices(30)  # anchors are always read


def test_memory_bad_input():
    with pytest.raises(ValueError, match="t must be"):
        MampMemory().indices(0)
    with pytest.raises(ValueError, match="n must be"):
        first_last(0)
    with pytest.raises(ValueError, match="every"):
        EveryS(every=0)


# -- labels and padding ----------------------------------------------------------------------------------------
def test_onehot_argmax_non_contiguous_ids():
    ids = torch.tensor([[0, 3, 3], [9, 0, 200]])
    oh = L.to_onehot(ids, [3, 9])
    assert oh.shape == (1, 3, 2, 3)
    assert oh[0, 0].tolist() == [[1, 0, 0], [0, 1, 1]]  # unknown id 200 -> background
    table = torch.tensor([0, 3, 9], dtype=torch.uint8)
    assert L.argmax_ids(oh, table).tolist() == [[0, 3, 3], [9, 0, 0]]


@pytest.mark.parametrize("H,W,s", [(17, 23, 4), (16, 16, 4), (33, 10, 8), (5, 7, 1)])
def test_pad_unpad_round_trip(H, W, s):
    x = torch.randn(2, 3, H, W)
    p, size = L.pad_to_multiple(x, s)
    assert p.shape[-2] % s == 0 and p.shape[-1] % s == 0 and p.shape[-2] - H < s and p.shape[-1] - W < s
    assert torch.equal(L.unpad(p, size), x)
    assert torch.equal(p[..., :H, :W], x) and (p[..., H:, :] == 0).all() and (p[..., :, W:] == 0).all()


def test_downsample_upsample():
    lab = torch.arange(64.0).view(1, 1, 8, 8)
    assert L.downsample(lab, 4, "stride")[0, 0].tolist() == [[0, 4], [32, 36]]  # x[::4, ::4]
    assert L.downsample(lab, 4, "nearest")[0, 0].tolist() == [[18, 22], [50, 54]]  # x[2::4, 2::4]
    b = L.downsample(torch.ones(1, 2, 8, 8), 4, "bilinear")
    torch.testing.assert_close(b, torch.ones(1, 2, 2, 2))
    assert L.upsample(torch.rand(1, 3, 2, 2), (8, 9)).shape == (1, 3, 8, 9)
    with pytest.raises(ValueError, match="label_downsample"):
        L.downsample(lab, 4, "area")


@pytest.mark.parametrize("stride", [4, 8])
def test_nearest_downsample_is_pils_nearest_resize(stride):
    """DINO's read_seg downsamples the given mask with PIL's NEAREST resize: at an integer factor, "nearest"."""
    from PIL import Image

    ids = np.random.default_rng(stride).integers(0, 4, (6 * stride, 5 * stride)).astype(np.uint8)
    pil = np.asarray(Image.fromarray(ids).resize((5, 6), Image.NEAREST))
    ours = L.downsample(L.to_onehot(torch.from_numpy(ids), [1, 2, 3]), stride, "nearest")[0].argmax(0)
    assert np.array_equal(ours.numpy(), pil)


def dino_norm_mask(mask):
    """DINO's norm_mask on (C, H, W), written from its rule: a channel whose maximum is > 0 becomes
    (m - min) / max(m - min); the others are left as they are."""
    out = mask.clone()
    for c in range(mask.shape[0]):
        m = mask[c]
        if m.max() > 0:
            m = m - m.min()
            out[c] = m / m.max()
    return out


def test_minmax_channels_is_dinos_norm_mask():
    x = torch.randn(3, 4, 7, 9, dtype=torch.float64)
    x[1, 2] = -x[1, 2].abs()  # a channel whose maximum is <= 0 stays as it is
    x[2, 0] = 0.0
    got = L.minmax_channels(x)
    for b in range(3):
        torch.testing.assert_close(got[b], dino_norm_mask(x[b]), rtol=0, atol=0)
    # over the frame inside a padding: the padding's values do not move the minimum and maximum
    padded = torch.nn.functional.pad(x, (0, 3, 0, 1), value=50.0)
    torch.testing.assert_close(L.unpad(L.minmax_channels(padded, (7, 9)), (7, 9)), got, rtol=0, atol=0)
    assert torch.equal(L.minmax_channels(torch.full((1, 2, 3, 3), 0.5))[0, 0], torch.zeros(3, 3))  # not 0/0


def test_engine_argmax_norm_minmax_changes_the_winner_as_dino_does():
    # a readout giving background [1.0 left, 0.6 right] and object [0.0 left, 0.4 right]: the plain argmax says
    # background everywhere; after DINO's per-channel rescaling the object wins on the right
    class Fixed:
        def __call__(self, feat, k, v, offsets=None, is_global=None):
            h, w = feat.shape[-2:]
            soft = torch.zeros(1, 2, h, w)
            soft[0, 0, :, : w // 2], soft[0, 0, :, w // 2:] = 1.0, 0.6
            soft[0, 1, :, w // 2:] = 0.4
            return soft

    frames = synthetic_video(T=3, H=32, W=32)[0][:2]
    first = np.zeros((32, 32), np.uint8)
    first[8:16, 8:16] = 5

    def second(norm):
        eng = Propagator(LabPositionFeatures(stride=8), first_last(1), Fixed(), argmax_norm=norm)
        return [ids for _, ids in eng.propagate(frames, {0: first})][1]

    assert (second("none") == 0).all()
    right = second("minmax")
    assert (right[:, :12] == 0).all() and (right[:, 20:] == 5).all()


# -- readouts ----------------------------------------------------------------------------------------------------
def _dense_softmax_topk(q, k, v, scale, topk, allowed=None):
    """q (M, C), k (L, C), v (L, K): top-k over allowed keys, softmax, weighted sum; float64."""
    logits = scale * q @ k.T
    if allowed is not None:
        logits = logits.masked_fill(~allowed, float("-inf"))
    val, idx = logits.topk(topk, dim=1)
    w = torch.softmax(val, dim=1)
    return (w.unsqueeze(-1) * v[idx]).sum(1)


def test_crw_readout_matches_dense():
    torch.manual_seed(1)
    C, h, w, N, K, r = 6, 7, 9, 3, 3, 2
    q = torch.randn(1, C, h, w, dtype=torch.float64)
    k = torch.randn(1, N, C, h, w, dtype=torch.float64)
    v = torch.rand(1, N, K, h, w, dtype=torch.float64)
    ro = CRWReadout(radius=r, topk=4, scale=3.0, window="circle")
    out = ro(q, k, v, is_global=[True, False, False])
    qn = torch.nn.functional.normalize(q, dim=1)[0].flatten(1).T  # (M, C)
    kn = torch.nn.functional.normalize(k, dim=2)[0].permute(0, 2, 3, 1).reshape(N * h * w, C)
    vf = v[0].permute(0, 2, 3, 1).reshape(N * h * w, K)
    ii, jj = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    qy, qx = ii.flatten(), jj.flatten()
    allowed = torch.zeros(h * w, N * h * w, dtype=torch.bool)
    allowed[:, :h * w] = True  # frame 0 global
    ky, kx = qy.repeat(N), qx.repeat(N)
    near = (ky.view(1, -1) - qy.view(-1, 1)) ** 2 + (kx.view(1, -1) - qx.view(-1, 1)) ** 2 < r * r
    allowed[:, h * w:] = near[:, h * w:]
    want = _dense_softmax_topk(qn, kn, vf, 3.0, 4, allowed).T.reshape(1, K, h, w)
    torch.testing.assert_close(out, want)


def test_topk_attention_readout_matches_dense():
    torch.manual_seed(2)
    C, h, w, N, K, H = 8, 4, 5, 2, 3, 2
    q = torch.randn(1, C, h, w, dtype=torch.float64)
    k = torch.randn(1, N, C, h, w, dtype=torch.float64)
    v = torch.rand(1, N, K, h, w, dtype=torch.float64)
    out = TopKAttentionReadout(topk=7, heads=H)(q, k, v)
    D = C // H
    vf = v[0].permute(0, 2, 3, 1).reshape(N * h * w, K)
    heads = []
    for hd in range(H):
        qh = q[0, hd * D:(hd + 1) * D].flatten(1).T
        kh = k[0, :, hd * D:(hd + 1) * D].permute(0, 2, 3, 1).reshape(N * h * w, D)
        heads.append(_dense_softmax_topk(qh, kh, vf, D ** -0.5, 7))
    want = torch.stack(heads).mean(0).T.reshape(1, K, h, w)
    torch.testing.assert_close(out, want)
    with pytest.raises(ValueError, match="heads"):
        TopKAttentionReadout(topk=3, heads=3)(q, k, v)


def test_local_candidate_indices_gather_the_right_values():
    torch.manual_seed(3)
    C, h, w, N, K, r = 4, 6, 7, 2, 3, 2
    q = torch.randn(1, C, h, w)
    k = torch.randn(1, N, C, h, w)
    v = torch.rand(1, N, K, h, w)
    off = torch.randint(-2, 3, (1, N, 2, h, w)).float()
    out, (logits, cand) = vosops.local_attention(q, k, v, radius=r, topk=5, offsets=off, return_topk=True)
    idx = local_candidates_to_memory_index(cand, r, 1, h, w, offsets=off)
    idx = torch.where(torch.isfinite(logits), idx, torch.full_like(idx, -1))
    flat = v.permute(0, 1, 3, 4, 2).reshape(1, N * h * w, K)
    again = vosops.topk_aggregate(logits.reshape(1, h * w, 5), idx.reshape(1, h * w, 5), flat)
    torch.testing.assert_close(again.transpose(1, 2).reshape(1, K, h, w), out)


# -- the engine ----------------------------------------------------------------------------------------------------
def _small_engine(**kw):
    return Propagator(LabPositionFeatures(stride=4), kw.pop("memory", MampMemory()),
                      kw.pop("readout", LocalReadout(radius=8, topk=36, scale=40.0)), **kw)


def test_engine_multi_object_on_synthetic_video():
    frames, gts = synthetic_video(T=8, H=96, W=128, seed=1)
    frames = [f[:95, :127] for f in frames]  # not multiples of the stride: padding and exact unpadding
    gts = [g[:95, :127] for g in gts]
    out = list(_small_engine().propagate(frames, {0: gts[0]}))
    assert [t for t, _ in out] == list(range(8))
    preds = [ids.numpy() for _, ids in out]
    assert all(p.shape == (95, 127) and p.dtype == np.uint8 for p in preds)
    np.testing.assert_array_equal(preds[0], gts[0])
    assert set(np.unique(np.concatenate([p.ravel() for p in preds]))) <= {0, 1, 3}
    s = metrics.summarize(metrics.evaluate_sequence(preds, gts))
    assert s["J&F-Mean"] > 0.7, s


@pytest.mark.parametrize("dtype", [np.uint16, np.uint32, np.int32, np.uint8])
def test_engine_takes_masks_of_any_integer_dtype(dtype):
    """A 16-bit mask PNG reads as uint16 (cv2.IMREAD_UNCHANGED); torch has no min/max for uint16/uint32, which
    made the id check fail with NotImplementedError."""
    frames, gts = synthetic_video(T=3, H=32, W=40, seed=1)
    expected = [ids.numpy() for _, ids in _small_engine().propagate(frames, {0: gts[0]})]
    got = [ids.numpy() for _, ids in _small_engine().propagate(frames, {0: gts[0].astype(dtype)})]
    for e, g in zip(expected, got):
        np.testing.assert_array_equal(g, e)
    with pytest.raises(ValueError, match=r"ids in 0..255.*got 0..300"):
        list(_small_engine().propagate(frames, {0: np.where(gts[0] > 0, 300, 0).astype(np.uint16)}))


def test_engine_late_appearing_object():
    frames, gts = synthetic_video(T=7, H=96, W=128, seed=2)
    first = np.where(gts[0] == 3, 0, gts[0])  # object 3 not given at frame 0
    late = np.where(gts[3] == 3, 3, 0)  # its own mask at frame 3
    preds = {t: ids.numpy() for t, ids in _small_engine().propagate(frames, {0: first, 3: late})}
    for t in (1, 2):
        assert not (preds[t] == 3).any()  # unknown before it appears
    assert ((preds[3] == 3) == (gts[3] == 3)).all()  # its given mask is used as is
    for t in (4, 5, 6):
        j = metrics.jaccard(preds[t] == 3, gts[t] == 3)
        assert j > 0.5, (t, j)
    assert (preds[3][gts[3] == 1] == 1).mean() > 0.5  # object 1 still predicted on the given frame


def test_engine_flow_displaced_windows_follow_fast_motion():
    # a smooth textured square jumps 12 px per frame over a static textured background; windows of radius 1 at
    # stride 4 (+-4 px) cannot follow it without flow, and follow it with the true flow or OpenCV DIS
    from vosops.propagation.synthetic import _smooth_texture

    rng = np.random.default_rng(0)
    H, W, T = 96, 192, 6
    bg = _smooth_texture(rng, H, W, 16, (128, 128, 128), 30).astype(np.uint8)
    tex = _smooth_texture(rng, 40, 40, 8, (128, 128, 128), 90).astype(np.uint8)
    frames, gts, x0 = [], [], {}
    for t in range(T):
        f, g = bg.copy(), np.zeros((H, W), np.uint8)
        x = 16 + 12 * t
        f[28:68, x:x + 40] = tex
        g[28:68, x:x + 40] = 2
        frames.append(f)
        gts.append(g)
        x0[f.tobytes()] = x

    def true_flow(query, mem):  # around the query's square: the displacement to the square in each memory frame
        xq = x0[query.tobytes()]
        out = torch.zeros(len(mem), 2, H, W)
        for n, m in enumerate(mem):
            out[n, 0, 20:76, max(0, xq - 8):xq + 48] = x0[m.tobytes()] - xq
        return out

    def run(flow):
        eng = _small_engine(readout=LocalReadout(radius=1, topk=4, scale=40.0), flow=flow, memory=first_last(1))
        preds = [ids.numpy() for _, ids in eng.propagate(frames, {0: gts[0]})]
        return np.mean([metrics.jaccard(p == 2, g == 2) for p, g in zip(preds[1:], gts[1:])])

    j_no, j_true, j_dis = run(None), run(true_flow), run("dis")
    assert j_true > 0.85 and j_dis > 0.7 and j_no < 0.5, (j_no, j_true, j_dis)


def test_flow_offsets_rounded_once_at_feature_resolution():
    """MAMP estimates the flow at stride 4, clamps it to +-(w, h) and rounds it once: a full-resolution flow is
    resized (its vectors scaled) first and rounded last. 5.9 px is 1.475 cells -> 1 (rounding 5.9 to 6 first gave
    1.5 -> 2); -6.2 px -> -1.55 -> -2; 1000 px is clamped to the feature map's width, 8 cells."""
    frames = synthetic_video(T=3, H=32, W=32)[0]
    values = torch.tensor([5.9, -6.2, 1000.0])

    def flow(query, mem):
        fl = torch.empty(len(mem), 2, 32, 32)
        fl[:, 0] = values.repeat_interleave(11)[:32].view(1, 1, 32)  # columns: 5.9 (11), -6.2 (11), 1000 (10)
        fl[:, 1] = 5.9
        return fl

    eng = _small_engine(flow=flow, memory=first_last(1))
    off = eng._offsets(frames[1], [frames[0]], 8, 8, (32, 32))
    assert off.shape == (1, 1, 2, 8, 8)
    assert (off[0, 0, 1] == 1).all()
    assert off[0, 0, 0, :, 0].eq(1).all() and off[0, 0, 0, :, 3:5].eq(-2).all() and off[0, 0, 0, :, 7].eq(8).all()


def test_one_propagator_runs_two_videos_at_once():
    """The anchors (frames with a given mask) belong to one propagate() call: a second video with a mask at frame
    3, started while the first is at frame 10, made the first look for its dropped frame 3 (KeyError) or, in
    another interleaving, read it as memory."""
    fa, ma = synthetic_video(T=12, H=32, W=40, seed=0)
    fb, mb = synthetic_video(T=12, H=32, W=40, seed=1)
    eng = _small_engine()
    alone_a = [ids.clone() for _, ids in eng.propagate(fa, {0: ma[0]})]
    alone_b = [ids.clone() for _, ids in eng.propagate(fb, {0: mb[0], 3: mb[3]})]
    ga = eng.propagate(fa, {0: ma[0]})
    out_a = [next(ga)[1].clone() for _ in range(10)]
    gb = eng.propagate(fb, {0: mb[0], 3: mb[3]})
    out_b = [next(gb)[1].clone() for _ in range(4)]
    out_a += [ids.clone() for _, ids in ga]
    out_b += [ids.clone() for _, ids in gb]
    for got, want in ((out_a, alone_a), (out_b, alone_b)):
        assert len(got) == len(want) and all(torch.equal(g, w) for g, w in zip(got, want))


def test_engine_keeps_its_own_copy_of_memory_frames_for_flow():
    """A decoder that refills one buffer: the memory frames handed to the flow must be the frames as they were."""
    frames, gts = synthetic_video(T=5, H=32, W=32, seed=3)
    seen = []

    def flow(query, mem):
        seen.append([(m == query).all() for m in mem])
        return torch.zeros(len(mem), 2, 32, 32)

    buf = np.empty_like(frames[0])

    def decoder():
        for f in frames:
            buf[...] = f
            yield buf

    list(_small_engine(flow=flow, memory=first_last(1)).propagate(decoder(), {0: gts[0]}))
    assert seen and not any(any(same) for same in seen), seen


def test_mask_writer_copies_what_it_is_given(tmp_path):
    """put() returns before the thread writes: a caller that refills its buffer must not change what is written."""
    from vosops.io import read_mask

    w = MaskWriter(str(tmp_path / "m"), overlay_folder=str(tmp_path / "o"))
    ids, frame = torch.zeros(6, 8, dtype=torch.uint8), np.zeros((6, 8, 3), np.uint8)
    for i in range(1, 9):
        ids.fill_(i)
        frame[...] = 10 * i
        w.put(f"{i:05d}", ids, frame=frame)
    w.close()
    for i in range(1, 9):
        assert (read_mask(str(tmp_path / "m" / f"{i:05d}.png")) == i).all(), i


def test_engine_bad_input():
    frames, gts = synthetic_video(T=3, H=32, W=32)
    eng = _small_engine()
    with pytest.raises(ValueError, match="frame 0"):
        list(eng.propagate(frames, {1: gts[1]}))
    with pytest.raises(ValueError, match="no object"):
        list(eng.propagate(frames, {0: np.zeros((32, 32), np.uint8)}))
    with pytest.raises(ValueError, match="size"):
        list(eng.propagate(frames, {0: gts[0][:30]}))
    with pytest.raises(ValueError, match="stride"):
        Propagator(lambda x: x, MampMemory(), LocalReadout(radius=1))
    with pytest.raises(TypeError, match="memory"):
        Propagator(LabPositionFeatures(), [0, 1], LocalReadout(radius=1))
    bad = Propagator(lambda x: torch.zeros(1, 4, 3, 3), MampMemory(), LocalReadout(radius=1), stride=4)
    with pytest.raises(ValueError, match="extractor"):
        list(bad.propagate(frames, {0: gts[0]}))


@pytest.mark.parametrize("frames,masks,match", [
    ("rgba", None, r"frames must be \(H, W, 3\) RGB arrays"),
    ("4-channel tensor", None, r"frame tensors must be \(3, H, W\)"),
    ("paths", None, "frames must be numpy arrays or tensors, got str"),
    ("resized", None, r"frame 1 has size \(32, 30\), frame 0 had \(32, 32\)"),
    (None, "3-D", r"masks\[0\] must be a 2-D \(H, W\) map of object ids"),
    (None, "negative frame", "mask frame indices must be >= 0"),
    (None, "id 300", r"masks\[0\] must hold ids in 0..255 \(0 background, 1..254 objects, 255 void\), got 0..300"),
    (None, "id -1", r"masks\[0\] must hold ids in 0..255 .*got -1..2"),
    (None, "id 1.5", r"masks\[0\] must hold integer object ids, got non-integer values"),
    (None, "mask past the end", r"masks given for frame\(s\) \[3, 9\] of a 3-frame video"),
    ("generator", "mask past the end", r"masks given for frame\(s\) \[3, 9\] of a 3-frame video"),
    (None, "later mask resized", r"masks\[2\] has size \(30, 32\) but the frames are \(32, 32\)"),
    (None, "list", "masks must be a dict"),
])
def test_engine_rejects_bad_frames_and_masks(frames, masks, match):
    video, gts = synthetic_video(T=3, H=32, W=32)
    given = {0: gts[0]}
    if frames == "rgba":
        video = [np.concatenate([f, f[..., :1]], 2) for f in video]
    elif frames == "4-channel tensor":
        video = [torch.zeros(4, 32, 32, dtype=torch.uint8)] * 3
    elif frames == "paths":
        video = ["00000.jpg"] * 3
    elif frames == "resized":
        video = [video[0], video[1][:, :30], video[2]]
    elif frames == "generator":  # no len(): found out after the last frame
        video = (f for f in video)
    if masks == "3-D":
        given = {0: gts[0][None]}
    elif masks == "negative frame":
        given = {0: gts[0], -1: gts[1]}
    elif masks == "id 300":
        given = {0: np.where(gts[0] > 0, 300, 0)}
    elif masks == "id -1":
        given = {0: np.where(gts[0] > 0, -1, 2)}
    elif masks == "id 1.5":
        given = {0: np.where(gts[0] > 0, 1.5, 0.0)}
    elif masks == "mask past the end":
        given = {0: gts[0], 9: gts[1], 3: gts[2]}
    elif masks == "later mask resized":
        given = {0: gts[0], 2: gts[2][:30]}
    elif masks == "list":
        given = [gts[0]]
    with pytest.raises((ValueError, TypeError), match=match):
        list(_small_engine().propagate(video, given))


@pytest.mark.parametrize("kw,exc,match", [
    ({"extractor": "lab"}, TypeError, "extractor must be callable"),
    ({"label_downsample": "area"}, ValueError, "label_downsample must be one of"),
    ({"argmax_norm": "softmax"}, ValueError, "argmax_norm must be one of"),
    ({"memory_labels": "probabilities"}, ValueError, "memory_labels must be 'hard' or 'soft'"),
    ({"flow": "raft"}, ValueError, "flow must be None, 'dis', 'farneback' or a callable"),
    ({"stride": True}, ValueError, "stride must be an int >= 1"),
])
def test_engine_rejects_bad_settings(kw, exc, match):
    kw = dict(kw)
    extractor = kw.pop("extractor", LabPositionFeatures(stride=4))
    with pytest.raises(exc, match=match):
        Propagator(extractor, MampMemory(), LocalReadout(radius=1), **kw)


def test_engine_rejects_a_flow_callable_of_the_wrong_shape():
    video, gts = synthetic_video(T=3, H=32, W=32)
    eng = _small_engine(flow=lambda frame, mem: torch.zeros(len(mem), 3, 32, 32))
    with pytest.raises(ValueError, match=r"flow must give \(N, 2, H, W\) with N = 1"):
        list(eng.propagate(video, {0: gts[0]}))
    eng = _small_engine(flow=lambda frame, mem: torch.zeros(len(mem), 2, 16, 16))
    with pytest.raises(ValueError, match=r"flow must be at the frames' resolution \(32, 32\)"):
        list(eng.propagate(video, {0: gts[0]}))


@pytest.mark.parametrize("at", ["video", "padded"])
def test_flow_callable_at_the_videos_size_or_the_padded_size(at):
    """A callable gets the padded frames; a flow at the video's own size (precomputed, say) is extended over the
    padding instead of being stretched onto it: a constant 5.9 px (1.475 cells at stride 4 -> 1) stays 1 in every
    cell of a 30 x 38 video (padded to 32 x 40)."""
    frames = [f[:30, :38] for f in synthetic_video(T=3, H=32, W=40)[0]]

    def flow(query, mem):
        assert query.shape[:2] == (32, 40)
        H, W = (30, 38) if at == "video" else (32, 40)
        return torch.full((len(mem), 2, H, W), 5.9)

    padded = [np.pad(f, ((0, 2), (0, 2), (0, 0))) for f in frames]  # what the engine hands the callable
    off = _small_engine(flow=flow, memory=first_last(1))._offsets(padded[1], [padded[0]], 8, 10, (30, 38))
    assert torch.equal(off, torch.ones(1, 1, 2, 8, 10))


def test_engine_takes_float_and_bool_masks_as_ids():
    video, gts = synthetic_video(T=4, H=32, W=32)
    want = [ids.numpy() for _, ids in _small_engine().propagate(video, {0: gts[0]})]
    for given in (gts[0].astype(np.float32), torch.from_numpy(gts[0]).double()):
        got = [ids.numpy() for _, ids in _small_engine().propagate(video, {0: given})]
        np.testing.assert_array_equal(np.stack(got), np.stack(want))
    one = gts[0] > 0
    got = [ids.numpy() for _, ids in _small_engine().propagate(video, {0: one})]
    assert set(np.unique(np.stack(got)).tolist()) <= {0, 1} and got[0].max() == 1


def test_features_weight_free():
    f = LabPositionFeatures()(torch.randint(0, 256, (3, 16, 24), dtype=torch.uint8))
    assert f.shape == (1, 10, 4, 6)
    norms = f.norm(dim=1)
    torch.testing.assert_close(norms, torch.full_like(norms, norms[0, 0, 0].item()))  # constant norm
    white = vosops.propagation.rgb_to_lab(torch.ones(1, 3, 1, 1))
    torch.testing.assert_close(white.flatten(), torch.tensor([100.0, 0.0, 0.0]), atol=1e-2, rtol=0)
    with pytest.raises(ValueError, match="multiple"):
        LabPositionFeatures()(torch.zeros(3, 10, 12))
    with pytest.raises(TypeError, match=r"frame must be a tensor \(3, H, W\) or \(B, 3, H, W\), got ndarray"):
        LabPositionFeatures()(np.zeros((16, 16, 3), np.uint8))
    with pytest.raises(ValueError, match=r"frame must be \(3, H, W\) or \(B, 3, H, W\) RGB, got shape \(1, 16, 16\)"):
        LabPositionFeatures()(torch.zeros(1, 16, 16))
    with pytest.raises(TypeError, match="frame must be uint8 or float in"):
        LabPositionFeatures()(torch.zeros(3, 16, 16, dtype=torch.int32))
    with pytest.raises(ValueError, match="stride must be an int >= 1, got 0"):
        LabPositionFeatures(stride=0)
    assert LabPositionFeatures().channels == 10
    with pytest.raises(ValueError, match="ids must be a 2-D"):
        L.to_onehot(torch.zeros(1, 4, 4, dtype=torch.long), [1])
    with pytest.raises(ValueError, match="multiple must be an int >= 1, got 0"):
        L.pad_to_multiple(torch.zeros(1, 3, 5, 5), 0)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_runs(name):
    frames, gts = synthetic_video(T=5, H=64, W=64, seed=3)
    p = get_preset(name, heads=2)
    kw = p.engine_kwargs()
    if isinstance(p.readout, LocalReadout):  # keep the reference path fast at this size
        p.readout.radius = min(p.readout.radius, 3)
    eng = Propagator(LabPositionFeatures(stride=p.stride), **kw)
    preds = [ids.numpy() for _, ids in eng.propagate(frames, {0: gts[0]})]
    assert len(preds) == 5 and all(x.shape == (64, 64) for x in preds)
    assert set(np.unique(preds[-1])) <= {0, 1, 3}


def test_mask_writer(tmp_path):
    from vosops.io import read_mask

    w = MaskWriter(str(tmp_path / "m"), overlay_folder=str(tmp_path / "o"))
    ids = torch.zeros(6, 8, dtype=torch.uint8)
    ids[1:3, 2:5] = 7
    w.put("00017", ids, frame=np.zeros((6, 8, 3), np.uint8))
    w.close()
    np.testing.assert_array_equal(read_mask(str(tmp_path / "m" / "00017.png")), ids.numpy())
    assert (tmp_path / "o" / "00017.png").exists() and w.written == 1


def test_mask_writer_reports_a_failed_write_to_the_producer(tmp_path):
    """The writer thread's error surfaces, chained, on the next put or at close; the frames before it are written.
    A bad input is a ValueError naming the cause (the CLI's one-line error)."""
    w = MaskWriter(str(tmp_path / "m"))
    w.put("00000", torch.ones(4, 4, dtype=torch.uint8))
    w.put("00001", torch.ones(2, 4, 4, dtype=torch.uint8))  # not a (H, W) map: write_mask refuses it
    with pytest.raises(ValueError, match="the mask writer failed: .*ids") as info:
        w.close()
    assert isinstance(info.value.__cause__, ValueError) and "ids" in str(info.value.__cause__)
    assert w.written == 1 and (tmp_path / "m" / "00000.png").exists()
    with pytest.raises(ValueError, match="the mask writer failed"):
        w.put("00002", torch.ones(4, 4, dtype=torch.uint8))


def test_mask_writer_names_an_unwritable_overlay_video(tmp_path):
    w = MaskWriter(str(tmp_path / "m"), overlay_video=str(tmp_path / "no-such-folder" / "o.mp4"))
    w.put("00000", torch.ones(4, 4, dtype=torch.uint8), frame=np.zeros((4, 4, 3), np.uint8))
    with pytest.raises(ValueError, match="the mask writer failed: OpenCV cannot write an MP4") as info:
        w.close()
    assert "OpenCV cannot write an MP4" in str(info.value.__cause__)


def test_mask_writer_reports_any_other_error_as_runtime_error(tmp_path, monkeypatch):
    import vosops.io

    def broken(*a, **k):
        raise KeyError("disk gremlin")

    monkeypatch.setattr(vosops.io, "write_mask", broken)  # before the writer thread imports it
    w = MaskWriter(str(tmp_path / "m"))
    w.put("00000", torch.ones(4, 4, dtype=torch.uint8))
    with pytest.raises(RuntimeError, match="the mask writer failed") as info:
        w.close()
    assert isinstance(info.value.__cause__, KeyError)


@pytest.mark.parametrize("size", [(7, 5), (33, 41), (1, 1), (480, 853)])
def test_mask_writer_overlay_video_keeps_odd_sizes(tmp_path, size):
    """MPEG-4 needs even sizes: the overlay video pads an odd side by one row or column (the encoder used to crop
    it, and a side of 1 could not be written at all), as write_overlay_video does."""
    import cv2

    H, W = size
    path = str(tmp_path / "o.mp4")
    w = MaskWriter(str(tmp_path / "m"), overlay_video=path)
    for t in range(2):
        w.put(f"{t:05d}", torch.ones(H, W, dtype=torch.uint8), frame=np.full((H, W, 3), 90, np.uint8))
    w.close()
    cap = cv2.VideoCapture(path)
    assert (int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT)), int(cap.get(cv2.CAP_PROP_FRAME_WIDTH))) == (H + H % 2,
                                                                                              W + W % 2)
    assert int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) == 2
    cap.release()


# aten ops whose result the host must read (a scalar, or an output sized by the data): on a GPU each one waits
# for the device
HOST_READS = {"_local_scalar_dense", "is_nonzero", "nonzero", "_unique2", "unique_dim", "unique_consecutive",
              "masked_select", "equal", "allclose", "_assert_async"}


@pytest.mark.parametrize("name", ["mamp", "maskvos", "ino", "dino", "jointformer-memory"])
def test_steady_state_loop_reads_nothing_back_to_the_host(name):
    """The CPU-side guard of the GPU test below: every aten op a steady-state frame runs is recorded, and none may
    be one whose result the host reads (an .item(), a bool() of a tensor, a nonzero, a boolean-mask index)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from vosops.bench.propagate import make_runner

    reads = []

    class RecordHostReads(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            op = func.overloadpacket.__name__
            bool_index = op == "index" and any(isinstance(i, torch.Tensor) and i.dtype == torch.bool
                                               for i in args[1] if i is not None)
            if op in HOST_READS or bool_index:
                reads.append(op)
            return func(*args, **(kwargs or {}))

    step = make_runner(name, "given", "cpu", 40, 56)  # the warm-up frames fill the memory first
    with RecordHostReads():
        for _ in range(2):
            ids = step()
        probe = torch.zeros(1)
        assert not reads
        bool(probe.sum() > 0)  # the recorder sees a host read when there is one
    assert reads == ["is_nonzero"] or reads == ["_local_scalar_dense"], reads
    assert ids.shape == (40, 56)


@pytest.mark.cuda
@pytest.mark.parametrize("name", ["mamp", "maskvos", "ino", "dino", "jointformer-memory"])
def test_gpu_loop_never_synchronises_per_frame(name):
    """Steady-state frames (memory full) on the GPU with every host synchronisation made an error."""
    from vosops.bench.propagate import make_runner

    step = make_runner(name, "given", "cuda", 96, 160)  # runs the warm-up frames (memory fill) first
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            ids = step()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert ids.is_cuda and ids.shape == (96, 160)
