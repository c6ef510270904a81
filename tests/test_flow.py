"""vosops.flow: sign and scale of estimated flow checked by warping a shifted textured image with flow_warp."""

import numpy as np
import pytest
import torch

import vosops
from vosops import flow as vflow


def _texture(H=64, W=80, seed=0):
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (H // 4 + 2, W // 4 + 2, 3)).astype(np.uint8)
    import cv2

    big = cv2.resize(small, (W + 8, H + 8), interpolation=cv2.INTER_CUBIC)
    return cv2.GaussianBlur(big, (3, 3), 0)


@pytest.mark.parametrize("method", ["dis", "farneback"])
def test_sign_and_scale_by_warping(method):
    big = _texture()
    sx, sy = 3, -2
    # b is a shifted by (sx, sy): b(y, x) = a(y - sy, x - sx), so a(p) = b(p + (sx, sy))
    a = big[4:-4, 4:-4]
    b = big[4 - sy:big.shape[0] - 4 - sy, 4 - sx:big.shape[1] - 4 - sx]
    ta = torch.from_numpy(a).permute(2, 0, 1)[None].float() / 255
    tb = torch.from_numpy(b).permute(2, 0, 1)[None].float() / 255
    flow = vflow.estimate_flow(ta, tb, method=method)
    assert flow.shape == (1, 2, 64, 80) and flow.dtype == torch.float32
    inner = flow[:, :, 12:-12, 12:-12]
    assert abs(inner[:, 0].median().item() - sx) < 0.5
    assert abs(inner[:, 1].median().item() - sy) < 0.5
    warped = vosops.flow_warp(tb, flow, backend="reference")
    err = (warped - ta).abs()[:, :, 12:-12, 12:-12].mean().item()
    base = (tb - ta).abs()[:, :, 12:-12, 12:-12].mean().item()
    assert err < 0.25 * base


def test_batched_inputs_and_numpy():
    big = _texture(seed=1)
    a = big[4:-4, 4:-4]
    b = big[4:-4, 3:-5]  # b(x) = a(x - 1) -> a(x) = b(x + 1): dx = +1
    f1 = vflow.estimate_flow([a, a], [b, a])
    assert f1.shape == (2, 2, 64, 80)
    assert abs(f1[0, 0, 12:-12, 12:-12].median().item() - 1) < 0.5
    assert f1[1].abs().max().item() < 0.5  # identical frames: no motion


def test_resize_and_clamp_round():
    flow = torch.zeros(1, 2, 8, 12)
    flow[:, 0] = 4.0
    flow[:, 1] = -8.0
    r = vflow.resize_flow(flow, (2, 3))
    torch.testing.assert_close(r[:, 0], torch.full((1, 2, 3), 1.0))
    torch.testing.assert_close(r[:, 1], torch.full((1, 2, 3), -2.0))
    s = vflow.flow_to_stride(torch.ones(1, 2, 9, 13) * 8, 4)
    assert s.shape == (1, 2, 3, 4)
    torch.testing.assert_close(s[:, 0], torch.full((1, 3, 4), 8 * 4 / 13))
    big = torch.tensor([[[[30.0, -2.5], [0.5, 1.6]], [[-9.0, 2.4], [1.5, 0.0]]]])
    out = vflow.clamp_round_flow(big)
    torch.testing.assert_close(out, torch.tensor([[[[2.0, -2.0], [0.0, 2.0]], [[-2.0, 2.0], [2.0, 0.0]]]]))


def test_flow_bad_input():
    a = np.zeros((8, 8, 3), np.uint8)
    with pytest.raises(ValueError, match="method"):
        vflow.estimate_flow(a, a, method="raft")
    with pytest.raises(ValueError, match="same number"):
        vflow.estimate_flow([a, a], [a])
    with pytest.raises(ValueError, match="same size"):
        vflow.estimate_flow(a, np.zeros((9, 8, 3), np.uint8))
    with pytest.raises(TypeError, match="uint8"):
        vflow.estimate_flow(a.astype(np.float32), a)
    with pytest.raises(ValueError, match="flow"):
        vflow.resize_flow(torch.zeros(1, 3, 4, 4), (2, 2))
    with pytest.raises(ValueError, match="preset"):
        vflow.estimate_flow(a, a, preset="slow")
    with pytest.raises(ValueError, match="at least one frame"):
        vflow.estimate_flow([], [])
    with pytest.raises(ValueError, match=r"a must be \(B, 3, H, W\)"):
        vflow.estimate_flow(torch.zeros(1, 2, 8, 8), torch.zeros(1, 2, 8, 8))
    with pytest.raises(TypeError, match="uint8 or float"):
        vflow.estimate_flow(torch.zeros(1, 3, 8, 8, dtype=torch.int32), torch.zeros(1, 3, 8, 8, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"b\[1\] as a numpy array must be \(H, W, 3\) RGB or \(H, W\) gray"):
        vflow.estimate_flow([a, a], [a, np.zeros((8, 8, 4), np.uint8)])
    with pytest.raises(TypeError, match="a must be a tensor, a uint8 numpy array or a list"):
        vflow.estimate_flow("frame.png", a)
    with pytest.raises(ValueError, match="size must be positive"):
        vflow.resize_flow(torch.zeros(1, 2, 4, 4), (0, 2))
    with pytest.raises(ValueError, match="stride must be >= 1"):
        vflow.flow_to_stride(torch.zeros(1, 2, 4, 4), 0)
    with pytest.raises(ValueError, match="flow must be a"):
        vflow.clamp_round_flow(np.zeros((1, 2, 4, 4)))


@pytest.mark.parametrize("size", [(4, 33), (11, 11)])
def test_dis_on_frames_too_small_is_a_clear_error(size):
    """OpenCV's DIS asserts on tiny frames (cv2.error, a traceback from the CLI); it is a ValueError naming the
    size, and Farneback takes them."""
    a = np.random.default_rng(0).integers(0, 255, (*size, 3)).astype(np.uint8)
    with pytest.raises(ValueError, match=rf"DIS flow failed on frames of {size[0]}x{size[1]}.*farneback"):
        vflow.estimate_flow(a, a)
    assert vflow.estimate_flow(a, a, method="farneback").shape == (1, 2, *size)


# Sizes where OpenCV's DIS, given the frames as they are, reads out of bounds and kills the process (8-15 rows
# from 40 columns for every preset, up to 31 rows from 96 for the fast ones).
DIS_CRASH_SIZES = [(8, 48), (12, 48), (15, 40), (13, 200), (24, 96), (31, 128)]


def test_dis_on_wide_frames_of_few_rows_does_not_crash():
    """Run in a child process, so that a regression fails this test instead of ending the test session."""
    import subprocess
    import sys

    code = (
        "import numpy as np\n"
        "from vosops import flow\n"
        f"for H, W in {DIS_CRASH_SIZES}:\n"
        "    a = np.random.default_rng(H * W).integers(0, 256, (H, W, 3)).astype(np.uint8)\n"
        "    for preset in ('ultrafast', 'fast', 'medium'):\n"
        "        assert flow.estimate_flow(a, np.roll(a, 1, axis=1), preset=preset).shape == (1, 2, H, W)\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, f"exit status {run.returncode}: {run.stderr[-2000:]}"


@pytest.mark.parametrize("size", [(40, 64), (48, 200)])
@pytest.mark.parametrize("preset", ["ultrafast", "medium"])
def test_dis_solved_transposed_keeps_dx_and_dy(size, preset):
    """Frames DIS solves transposed (wide, under 64 rows; these sizes do not crash it either way, so a regression
    fails here rather than ending the session): the flow comes back at the frames' size, dx in channel 0, dy in 1."""
    H, W = size
    big = _texture(H=H, W=W, seed=3)
    sx, sy = 3, -2
    a = big[4:-4, 4:-4]
    b = big[4 - sy:big.shape[0] - 4 - sy, 4 - sx:big.shape[1] - 4 - sx]
    flow = vflow.estimate_flow(a, b, preset=preset)
    assert flow.shape == (1, 2, H, W)
    inner = flow[:, :, 4:-4, 8:-8]
    assert abs(inner[:, 0].median().item() - sx) < 0.5
    assert abs(inner[:, 1].median().item() - sy) < 0.5


def test_every_frame_form_gives_the_same_flow():
    """RGB and gray, numpy and tensor, uint8 and float in [0, 1], single frames and batches: one flow."""
    big = _texture(seed=2)
    a, b = big[4:-4, 4:-4], big[4:-4, 3:-5]
    expected = vflow.estimate_flow(a, b)
    ga, gb = (cv2_gray(x) for x in (a, b))
    ta, tb = (torch.from_numpy(x).permute(2, 0, 1) for x in (a, b))
    forms = {
        "gray numpy": (ga, gb),
        "(3, H, W) uint8 tensors": (ta, tb),
        "(B, 3, H, W) float tensors": (ta[None].float() / 255, tb[None].float() / 255),
        "(B, 1, H, W) gray tensors": (torch.from_numpy(ga)[None, None], torch.from_numpy(gb)[None, None]),
    }
    for name, (x, y) in forms.items():
        torch.testing.assert_close(vflow.estimate_flow(x, y), expected, msg=name)


def cv2_gray(rgb):
    import cv2

    return cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)


def test_resize_flow_interpolates_with_align_corners_true():
    """MAMP resizes its flow with align_corners=True, vectors scaled by the size ratio."""
    fl = torch.zeros(1, 2, 1, 3)
    fl[0, 0, 0] = torch.tensor([0.0, 1.0, 4.0])
    r = vflow.resize_flow(fl, (1, 5))
    torch.testing.assert_close(r[0, 0, 0], torch.tensor([0.0, 0.5, 1.0, 2.5, 4.0]) * (5 / 3))


def test_clamp_round_flow_clamps_dx_by_width_and_dy_by_height():
    """dx is clamped by the width, dy by the height (a non-square flow tells them apart)."""
    fl = torch.full((1, 2, 2, 8), 100.0)
    out = vflow.clamp_round_flow(fl)
    assert (out[0, 0] == 8).all() and (out[0, 1] == 2).all()
    assert (vflow.clamp_round_flow(-fl)[0, 0] == -8).all()


def test_float_frames_are_rounded_to_the_nearest_grey_level_for_flow():
    """Float frames are rounded (not truncated) to grey levels before OpenCV's flow."""
    t = torch.full((1, 1, 4, 4), 100.6 / 255)
    assert (vflow._to_gray_batch(t, "a")[0] == 101).all()
