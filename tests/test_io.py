"""vosops.io: frames, masks, overlays and the DAVIS reader, by round trips through real files."""

import os

import numpy as np
import pytest
import torch
from PIL import Image

from vosops import io as vio


def _frames(T=4, H=24, W=32, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (H, W, 3), dtype=np.uint8) for _ in range(T)]


def test_palette_is_davis():
    assert vio.DAVIS_PALETTE[0].tolist() == [0, 0, 0]
    assert vio.DAVIS_PALETTE[1].tolist() == [128, 0, 0]
    assert vio.DAVIS_PALETTE[2].tolist() == [0, 128, 0]
    assert vio.DAVIS_PALETTE[3].tolist() == [128, 128, 0]
    assert vio.DAVIS_PALETTE[4].tolist() == [0, 0, 128]
    assert len({tuple(c) for c in vio.DAVIS_PALETTE}) == 256


def test_palette_mask_round_trip(tmp_path):
    rng = np.random.default_rng(1)
    ids = rng.choice([0, 1, 3, 7, 200], size=(17, 23)).astype(np.uint8)
    p = str(tmp_path / "sub" / "m.png")
    vio.write_mask(p, torch.from_numpy(ids))
    im = Image.open(p)
    assert im.mode == "P"
    assert np.array(im.getpalette()[:9]).tolist() == [0, 0, 0, 128, 0, 0, 0, 128, 0]
    np.testing.assert_array_equal(vio.read_mask(p), ids)
    # the same mask saved as RGB colours maps back to the same ids
    rgb = str(tmp_path / "rgb.png")
    Image.fromarray(vio.DAVIS_PALETTE[ids]).save(rgb)
    np.testing.assert_array_equal(vio.read_mask(rgb), ids)


def test_davis2016_binary_mask(tmp_path):
    a = np.zeros((10, 12), np.uint8)
    a[2:6, 3:9] = 255
    p = str(tmp_path / "b.png")
    Image.fromarray(a, mode="L").save(p)
    m = vio.read_mask(p)
    assert m.dtype == np.uint8 and set(np.unique(m).tolist()) == {0, 1}
    np.testing.assert_array_equal(m, (a == 255).astype(np.uint8))


def test_mask_bad_input(tmp_path):
    with pytest.raises(ValueError, match="ids"):
        vio.write_mask(str(tmp_path / "x.png"), np.zeros((2, 3, 4)))
    with pytest.raises(ValueError, match="0..255"):
        vio.write_mask(str(tmp_path / "x.png"), np.full((2, 3), 300))
    for bad in (np.full((2, 3), 1.7), np.full((2, 3), np.nan)):  # no silent truncation of non-integer ids
        with pytest.raises(TypeError, match="ids must be integer object ids, got dtype float64"):
            vio.write_mask(str(tmp_path / "x.png"), bad)
    vio.write_mask(str(tmp_path / "b.png"), np.eye(3, dtype=bool))
    np.testing.assert_array_equal(vio.read_mask(str(tmp_path / "b.png")), np.eye(3, dtype=np.uint8))
    with pytest.raises(ValueError, match="does not exist"):
        vio.read_mask(str(tmp_path / "none.png"))
    rgb = str(tmp_path / "odd.png")
    Image.fromarray(np.full((3, 3, 3), 7, np.uint8)).save(rgb)
    with pytest.raises(ValueError, match="palette"):
        vio.read_mask(rgb)


def test_frame_folder_streaming(tmp_path):
    frames = _frames()
    for i, f in enumerate(frames):
        Image.fromarray(f).save(tmp_path / f"{i * 5:05d}.png")  # lossless, names not contiguous
    (tmp_path / "notes.txt").write_text("ignored")
    r = vio.VideoReader(str(tmp_path))
    assert len(r) == 4 and r.names == ["00000", "00005", "00010", "00015"] and r.size == (24, 32)
    for got, want in zip(r, frames):
        np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(r[-1], frames[-1])
    t = vio.frame_to_tensor(frames[0])
    assert t.shape == (3, 24, 32) and t.dtype == torch.float32
    torch.testing.assert_close(t[:, 3, 5] * 255, torch.tensor(frames[0][3, 5], dtype=torch.float32))
    u = vio.frame_to_tensor(frames[0], normalize=None)
    assert u.dtype == torch.uint8 and torch.equal(u.permute(1, 2, 0), torch.from_numpy(frames[0]))
    im = vio.frame_to_tensor(frames[0], normalize="imagenet")
    torch.testing.assert_close(im[0], (t[0] - 0.485) / 0.229)
    streamed = list(r.tensors(normalize="unit"))
    assert len(streamed) == 4 and torch.equal(streamed[1], vio.frame_to_tensor(frames[1]))
    video, names = vio.read_video(str(tmp_path), normalize="unit")
    assert video.shape == (4, 3, 24, 32) and names == r.names


def test_video_file_round_trip(tmp_path):
    # smooth frames survive mp4v compression closely; check count, size and rough content
    H, W = 48, 64
    yy, xx = np.mgrid[0:H, 0:W]
    frames = [np.stack([(xx * 4 + 20 * t) % 256, yy * 5 % 256, np.full_like(xx, 60 * t)], -1).astype(np.uint8)
              for t in range(5)]
    path = str(tmp_path / "v.mp4")
    n = vio.write_overlay_video(path, frames, [np.zeros((H, W), np.uint8)] * 5, fps=10)
    assert n == 5
    r = vio.VideoReader(path)
    assert len(r) == 5 and r.names[0] == "00000" and r.size == (H, W)
    got = list(r)
    assert len(got) == 5
    assert np.abs(got[2].astype(int) - frames[2].astype(int)).mean() < 12


def test_video_file_of_odd_size_keeps_every_pixel(tmp_path):
    H, W = 37, 53
    frame = np.random.default_rng(0).integers(0, 256, (H, W, 3), dtype=np.uint8)
    frame[:, -1] = (250, 10, 10)  # a last column the encoder must not drop
    path = str(tmp_path / "odd.mp4")
    assert vio.write_overlay_video(path, [frame] * 3, [np.zeros((H, W), np.uint8)] * 3, fps=5) == 3
    r = vio.VideoReader(path)
    assert r.size == (H + 1, W + 1)
    got = next(iter(r)).astype(int)
    assert np.abs(got[:H, W - 1] - np.array([250, 10, 10])).mean() < 40


def test_frame_folder_in_numeric_order(tmp_path):
    # ffmpeg's %d.png names: 1, 2, 10 is the order, not the text order 1, 10, 2
    for i in (10, 1, 2, 11):
        Image.fromarray(np.full((4, 4, 3), i, np.uint8)).save(tmp_path / f"{i}.png")
    r = vio.VideoReader(str(tmp_path))
    assert r.names == ["1", "2", "10", "11"]
    assert [int(f[0, 0, 0]) for f in r] == [1, 2, 10, 11]
    assert vio.video.frame_sort_key("frame_9.jpg") < vio.video.frame_sort_key("frame_10.jpg")
    assert sorted(["00010.jpg", "00002.jpg"], key=vio.video.frame_sort_key) == ["00002.jpg", "00010.jpg"]


def test_frames_sharing_a_name_are_refused(tmp_path):
    """00000.jpg and 00000.png (a first-frame mask saved among the frames, or mixed extensions) would give two
    frames one mask name: the second's mask silently overwrote the first's."""
    for t in range(3):
        Image.fromarray(np.full((4, 4, 3), t, np.uint8)).save(tmp_path / f"{t:05d}.jpg")
    assert vio.VideoReader(str(tmp_path)).names == ["00000", "00001", "00002"]
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "00000.png")
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "00002.JPG")
    with pytest.raises(ValueError, match=r"share a name \(00000.jpg, 00000.png, 00002.JPG, 00002.jpg\)"):
        vio.VideoReader(str(tmp_path))


def test_truncated_mask_names_the_file(tmp_path):
    good = tmp_path / "good.png"
    vio.write_mask(str(good), np.random.default_rng(0).integers(0, 3, (64, 64)).astype(np.uint8))
    data = good.read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"mask '.*cut.png' cannot be read as an image"):
        vio.read_mask(str(tmp_path / "cut.png"))


def test_hidden_files_and_folders_are_not_frames_or_sequences(tmp_path):
    """macOS's ._00000.jpg companions and .ipynb_checkpoints folders: not frames, not sequences (they aborted runs)."""
    root = tmp_path / "davis"
    for seq in ("a", ".ipynb_checkpoints"):
        (root / "JPEGImages" / "480p" / seq).mkdir(parents=True)
        (root / "Annotations" / "480p" / seq).mkdir(parents=True)
    for t in range(2):
        Image.fromarray(np.full((4, 4, 3), t, np.uint8)).save(root / "JPEGImages" / "480p" / "a" / f"{t:05d}.jpg")
    (root / "JPEGImages" / "480p" / "a" / "._00000.jpg").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    vio.write_mask(str(root / "Annotations" / "480p" / "a" / "00000.png"), np.ones((4, 4), np.uint8))
    (root / "Annotations" / "480p" / "a" / "._00000.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    assert vio.VideoReader(str(root / "JPEGImages" / "480p" / "a")).names == ["00000", "00001"]
    ds = vio.DavisDataset(str(root))
    assert ds.sequences == ["a"] and ds.first_mask("a").sum() == 16


def test_jpeg_mask_with_blurred_ids_is_refused(tmp_path):
    yy, xx = np.mgrid[:32, :32]
    m = np.where((yy - 15.3) ** 2 + (xx - 16.7) ** 2 < 70, 255, 0).astype(np.uint8)  # a disc: edges off the blocks
    Image.fromarray(m).save(tmp_path / "m.jpg", quality=75)
    assert len(np.unique(np.array(Image.open(tmp_path / "m.jpg")))) > 2  # compression made values between
    with pytest.raises(ValueError, match="is a JPEG with values other than 0 and 255"):
        vio.read_mask(str(tmp_path / "m.jpg"))
    Image.fromarray(m).save(tmp_path / "clean.png")
    assert vio.read_mask(str(tmp_path / "clean.png")).max() == 1


def test_reader_bad_input(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        vio.VideoReader(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="no"):
        vio.VideoReader(str(tmp_path))
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"not a video")
    with pytest.raises(ValueError):
        vio.VideoReader(str(bad))
    with pytest.raises(TypeError, match="frame"):
        vio.frame_to_tensor(np.zeros((4, 4), np.uint8))


def test_overlay_and_contact_sheet(tmp_path):
    f = np.full((20, 30, 3), 100, np.uint8)
    ids = np.zeros((20, 30), np.uint8)
    ids[5:15, 5:15] = 2
    ov = vio.overlay(f, ids, alpha=0.5)
    assert ov.shape == f.shape
    assert ov[0, 0].tolist() == [100, 100, 100]  # background untouched
    assert ov[10, 10].tolist() == [50, 114, 50]  # blended with (0, 128, 0)
    assert ov[5, 10].tolist() == [0, 128, 0]  # boundary solid
    sheet = vio.contact_sheet([f, ov, ov], cols=2, width=15, pad=1)
    assert sheet.shape == (2 * (10 + 1) + 1, 2 * (15 + 1) + 1, 3)
    vio.write_overlays(str(tmp_path / "ov"), [f], [ids], ["00003"])
    assert os.path.isfile(tmp_path / "ov" / "00003.png")


def test_davis_dataset(tmp_path):
    for seq in ("b", "a"):
        fd = tmp_path / "JPEGImages" / "480p" / seq
        md = tmp_path / "Annotations" / "480p" / seq
        fd.mkdir(parents=True)
        md.mkdir(parents=True)
        for i, f in enumerate(_frames(3, 8, 10)):
            Image.fromarray(f).save(fd / f"{i:05d}.jpg")
        vio.write_mask(str(md / "00000.png"), np.eye(8, 10, dtype=np.uint8) * 2)
    ds = vio.DavisDataset(str(tmp_path))
    assert ds.sequences == ["a", "b"] and len(ds) == 2
    assert len(ds.frames("a")) == 3
    np.testing.assert_array_equal(ds.first_mask("a"), np.eye(8, 10, dtype=np.uint8) * 2)
    assert list(ds.masks("b")) == ["00000"]
    (tmp_path / "ImageSets" / "2017").mkdir(parents=True)
    (tmp_path / "ImageSets" / "2017" / "val.txt").write_text("b\n")
    assert vio.DavisDataset(str(tmp_path), imageset="2017/val.txt").sequences == ["b"]
    with pytest.raises(ValueError, match="JPEGImages"):
        vio.DavisDataset(str(tmp_path / "JPEGImages"))


def test_read_mask_takes_bilevel_and_16_bit_ids(tmp_path):
    ids = np.zeros((5, 6), np.uint8)
    ids[1:3, 2:5] = 1
    Image.fromarray(ids.astype(bool)).save(tmp_path / "one-bit.png")
    assert Image.open(tmp_path / "one-bit.png").mode == "1"
    np.testing.assert_array_equal(vio.read_mask(str(tmp_path / "one-bit.png")), ids)
    wide = np.zeros((5, 6), np.uint16)
    wide[0, :3] = [1, 2, 7]
    Image.fromarray(wide).save(tmp_path / "sixteen.png")
    assert Image.open(tmp_path / "sixteen.png").mode.startswith("I")
    np.testing.assert_array_equal(vio.read_mask(str(tmp_path / "sixteen.png")), wide.astype(np.uint8))
    wide[4, 5] = 300
    Image.fromarray(wide).save(tmp_path / "too-wide.png")
    with pytest.raises(ValueError, match=r"has ids outside 0..255 \(0..300\)"):
        vio.read_mask(str(tmp_path / "too-wide.png"))
    Image.fromarray(np.zeros((5, 6), np.float32)).save(tmp_path / "float.tif")
    with pytest.raises(ValueError, match="unsupported image mode 'F'"):
        vio.read_mask(str(tmp_path / "float.tif"))


def _davis_layout(root, seqs=("a",), annotate_first=True):
    for seq in seqs:
        fd = root / "JPEGImages" / "480p" / seq
        fd.mkdir(parents=True)
        for i, f in enumerate(_frames(2, 8, 10)):
            Image.fromarray(f).save(fd / f"{i:05d}.jpg")
        if annotate_first:
            md = root / "Annotations" / "480p" / seq
            md.mkdir(parents=True)
            vio.write_mask(str(md / "00000.png"), np.eye(8, 10, dtype=np.uint8))


def test_davis_dataset_bad_input(tmp_path):
    _davis_layout(tmp_path, seqs=("a",))
    _davis_layout(tmp_path / "second", seqs=("c",), annotate_first=False)
    with pytest.raises(ValueError, match="imageset '2017/test.txt' not found"):
        vio.DavisDataset(str(tmp_path), imageset="2017/test.txt")
    listing = tmp_path / "list.txt"
    listing.write_text("a\nmissing\n")
    with pytest.raises(ValueError, match=r"lists sequences with no frames: \['missing'\]"):
        vio.DavisDataset(str(tmp_path), imageset=str(listing))
    ds = vio.DavisDataset(str(tmp_path / "second"))
    assert list(ds) == ["c"] and ds.mask_paths("c") == {} and ds.masks("c") == {}
    with pytest.raises(ValueError, match="sequence 'c' has no annotation for its first frame '00000'"):
        ds.first_mask("c")


def test_reader_indexing_and_bad_arguments(tmp_path):
    frames = _frames(3, 8, 10)
    for i, f in enumerate(frames):
        Image.fromarray(f).save(tmp_path / f"{i:05d}.png")
    r = vio.VideoReader(tmp_path)  # a PathLike is taken too
    np.testing.assert_array_equal(r[-3], frames[0])
    for i in (3, -4):
        with pytest.raises(IndexError, match=f"frame index {i} out of range for 3 frames"):
            r[i]
    with pytest.raises(TypeError, match="path must be a folder of frames or a video file, got int"):
        vio.VideoReader(3)
    with pytest.raises(ValueError, match="normalize must be one of"):
        vio.frame_to_tensor(frames[0], normalize="zscore")
    (tmp_path / "00003.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="could not read image"):
        list(vio.VideoReader(tmp_path))


def test_overlay_bad_input(tmp_path):
    f = np.zeros((6, 8, 3), np.uint8)
    with pytest.raises(ValueError, match=r"frame must be \(H, W, 3\) RGB, got shape \(6, 8\)"):
        vio.overlay(f[..., 0], np.zeros((6, 8), np.uint8))
    with pytest.raises(ValueError, match=r"ids \(6, 7\) must have the frame's size \(6, 8\)"):
        vio.overlay(f, np.zeros((6, 7), np.uint8))
    with pytest.raises(ValueError, match="images must not be empty"):
        vio.contact_sheet([])
    (tmp_path / "taken.mp4").mkdir()  # a folder where the file should go
    with pytest.raises(ValueError, match="OpenCV cannot write an MP4"):
        vio.write_overlay_video(str(tmp_path / "taken.mp4"), [f], [np.zeros((6, 8), np.uint8)])


def test_an_all_foreground_davis2016_mask_is_object_one(tmp_path):
    """A DAVIS-2016 0/255 mask whose object fills the frame (only 255) is object 1, not void."""
    p = str(tmp_path / "full.png")
    Image.fromarray(np.full((6, 8), 255, np.uint8), mode="L").save(p)
    assert (vio.read_mask(p) == 1).all()


def test_write_mask_refuses_id_256(tmp_path):
    """Id 256 is refused (a uint8 cast would wrap it to background)."""
    with pytest.raises(ValueError, match="0..255"):
        vio.write_mask(str(tmp_path / "x.png"), np.full((2, 3), 256))


def test_video_reader_yields_no_more_frames_than_it_names(tmp_path):
    """A container that decodes more frames than it reports must not give more frames
    than there are names (the count is simulated by trimming the names)."""
    frames = [np.full((16, 16, 3), 40 * t, np.uint8) for t in range(4)]
    path = str(tmp_path / "v.mp4")
    assert vio.write_overlay_video(path, frames, [np.zeros((16, 16), np.uint8)] * 4, fps=10) == 4
    r = vio.VideoReader(path)
    r.names = r.names[:2]
    assert len(list(r)) == 2


def test_overlay_rounds_the_blend():
    """The blend is rounded to the nearest level, not truncated."""
    frame = np.full((5, 5, 3), 1, np.uint8)
    ids = np.ones((5, 5), np.uint8)  # id 1: (128, 0, 0); every pixel inside, no boundary (no other id)
    out = vio.overlay(frame, ids, alpha=0.5)
    assert out[2, 2].tolist() == [65, 1, 1]  # 0.5 * 1 + 0.5 * 128 = 64.5 -> 65; 0.5 -> 1


def test_overlay_draws_the_whole_boundary_inside_the_object():
    """The boundary is the object's pixels next to another id, on all four sides, in the object's colour; the
    background around it is left as it was (it used to be painted black on the right and bottom sides)."""
    frame = np.full((6, 8, 3), 200, np.uint8)
    ids = np.zeros((6, 8), np.uint8)
    ids[1:5, 2:6] = 1  # id 1: (128, 0, 0)
    out = vio.overlay(frame, ids, alpha=0.5)
    ring = np.zeros((6, 8), bool)
    ring[1:5, 2:6] = True
    ring[2:4, 3:5] = False
    assert (out[ring] == [128, 0, 0]).all()
    assert (out[2:4, 3:5] == [164, 100, 100]).all()  # inside: blended
    assert (out[ids == 0] == 200).all()  # background untouched, next to the object too
