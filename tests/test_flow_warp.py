"""flow_warp: every backend against the reference; the reference against F.grid_sample and cv2.remap."""

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import vosops
from vosops import reference, testing

from conftest import backend_device_params

MODES = ["bilinear", "nearest"]
PADDINGS = ["zeros", "border"]
BACKENDS = backend_device_params("flow_warp")
# the same and the reference: for rules the reference must keep on its own, not only as the others' baseline
WITH_REFERENCE = [pytest.param("reference", "cpu", id="reference-cpu")] + BACKENDS


def random_flow(B, H, W, *, dtype=torch.float64, device="cpu", far=True):
    """Flows of a few pixels, with some pointing far out of the frame (and one exactly at a pixel)."""
    flow = torch.randn(B, 2, H, W, dtype=dtype) * 2.5
    if far:
        far_mask = torch.rand(B, 1, H, W) < 0.15
        flow = torch.where(far_mask, flow * 40, flow)
    flow[:, :, 0, 0] = 1.0  # an integer displacement: a tap lands exactly on a pixel
    return flow.to(device)


def grid_sample_warp(x, flow, mode, padding_mode):
    """What users write today: build a normalised grid from the flow and call F.grid_sample."""
    B, _, H, W = x.shape
    ii, jj = torch.meshgrid(torch.arange(H, dtype=x.dtype, device=x.device),
                            torch.arange(W, dtype=x.dtype, device=x.device), indexing="ij")
    gx = (jj + flow[:, 0]) * (2.0 / max(W - 1, 1)) - 1.0
    gy = (ii + flow[:, 1]) * (2.0 / max(H - 1, 1)) - 1.0
    return F.grid_sample(x, torch.stack([gx, gy], dim=-1), mode=mode, padding_mode=padding_mode,
                         align_corners=True)


# --- the reference against the two external definitions -------------------------------------------------------

@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("padding_mode", PADDINGS)
@pytest.mark.parametrize("shape", [(2, 3, 7, 9), (1, 4, 16, 5)])
def test_reference_matches_grid_sample(mode, padding_mode, shape):
    B, C, H, W = shape
    x = torch.randn(shape, dtype=torch.float64)
    flow = random_flow(B, H, W)
    if mode == "nearest":  # keep rounding away from exact .5 ties, where grid_sample's float round trip decides
        flow = torch.where((flow - flow.floor() - 0.5).abs() < 1e-6, flow + 0.01, flow)
    out = reference.flow_warp(x, flow, mode, padding_mode)
    torch.testing.assert_close(out, grid_sample_warp(x, flow, mode, padding_mode), atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("mode,cv_interp", [("bilinear", cv2.INTER_LINEAR), ("nearest", cv2.INTER_NEAREST)])
@pytest.mark.parametrize("padding_mode,cv_border", [("zeros", cv2.BORDER_CONSTANT), ("border", cv2.BORDER_REPLICATE)])
def test_reference_matches_opencv_remap(mode, cv_interp, padding_mode, cv_border):
    H, W = 23, 31
    img = np.random.default_rng(1).uniform(0, 1, (H, W, 3)).astype(np.float32)
    flow = random_flow(1, H, W, dtype=torch.float32)
    flow = flow + 0.013  # off the exact half-pixel ties, where OpenCV's and PyTorch's rounding may differ
    jj, ii = np.meshgrid(np.arange(W, dtype=np.float32), np.arange(H, dtype=np.float32))
    map_x = jj + flow[0, 0].numpy()
    map_y = ii + flow[0, 1].numpy()
    expected = cv2.remap(img, map_x, map_y, cv_interp, borderMode=cv_border, borderValue=0)
    x = torch.from_numpy(img).permute(2, 0, 1)[None].double()
    out = reference.flow_warp(x, flow.double(), mode, padding_mode)[0].permute(1, 2, 0).numpy()
    # OpenCV quantises bilinear weights to 1/32 of a pixel; nearest must agree exactly.
    atol = 1.0 / 32 if mode == "bilinear" else 0.0
    np.testing.assert_allclose(out, expected, atol=atol + 1e-6)


@pytest.mark.parametrize("mode", ["bilinear", "nearest"])
def test_reference_takes_transposed_views(mode):
    """A flow (or x) stored with H and W swapped: the reference's gather indices inherit its strides (a .view of
    them used to fail)."""
    x = torch.randn(2, 3, 5, 4, dtype=torch.float64)
    flow = random_flow(2, 5, 4)
    x_t = x.transpose(2, 3).contiguous().transpose(2, 3)
    flow_t = flow.transpose(2, 3).contiguous().transpose(2, 3)
    exp = vosops.flow_warp(x, flow, mode=mode, backend="reference")
    torch.testing.assert_close(vosops.flow_warp(x_t, flow_t, mode=mode, backend="reference"), exp, atol=0, rtol=0)


def test_reference_gradcheck():
    x = torch.randn(2, 3, 6, 7, dtype=torch.float64, requires_grad=True)
    flow = random_flow(2, 6, 7).add_(0.37).requires_grad_()  # keep taps off the integer kinks
    for padding_mode in PADDINGS:
        testing.check_gradcheck(lambda a, f: reference.flow_warp(a, f, "bilinear", padding_mode), (x, flow))


# --- every backend against the reference -----------------------------------------------------------------------

@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("padding_mode", PADDINGS)
@pytest.mark.parametrize("layout", ["contiguous", "noncontiguous", "channels_last"])
def test_backend_matches_reference(backend, device, mode, padding_mode, layout):
    for dtype in testing.backend_dtypes(backend, device):
        for shape in [(2, 3, 7, 9), (1, 5, 1, 6), (3, 1, 13, 2)]:
            B, C, H, W = shape
            x = torch.randn(shape, device=device)
            flow = random_flow(B, H, W, dtype=torch.float32, device=device)
            if mode == "nearest" and dtype in (torch.float16, torch.bfloat16):
                flow = flow.round() + 0.25  # far from ties, so low-precision rounding cannot move the tap
            grads = ("x", "flow") if mode == "bilinear" else ("x",)
            testing.check_against_reference(
                lambda x, flow: vosops.flow_warp(x, flow, mode=mode, padding_mode=padding_mode, backend=backend),
                lambda x, flow: reference.flow_warp(x, flow, mode, padding_mode),
                {"x": x, "flow": flow}, dtype=dtype, grad_inputs=grads, layout=layout,
                # the flow gradient jumps at integer points; low precision can put a tap on the other side
                grad_atol=0.1 if dtype in (torch.float16, torch.bfloat16) else None,
            )


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("mode", MODES)
def test_backend_frames_spanning_several_pixel_blocks(backend, device, mode):
    """More pixels than one program's block (the Triton kernels take 256 pixels a program; the shapes above fit in
    one): 2 x 11 x 13 = 286 pixels, so a second, partial block, with batch 1 starting inside the first; forward and
    gradients, border padding, against the reference."""
    B, C, H, W = 2, 3, 11, 13
    x = torch.randn(B, C, H, W, device=device)
    flow = random_flow(B, H, W, dtype=torch.float32, device=device)
    testing.check_against_reference(
        lambda x, flow: vosops.flow_warp(x, flow, mode=mode, padding_mode="border", backend=backend),
        lambda x, flow: reference.flow_warp(x, flow, mode, "border"),
        {"x": x, "flow": flow}, dtype=torch.float32, grad_inputs=("x", "flow") if mode == "bilinear" else ("x",),
    )


@pytest.mark.parametrize("backend,device", [p for p in BACKENDS if p.values[0] == "cpu"])
def test_cpu_gradcheck(backend, device):
    x = torch.randn(2, 3, 6, 7, dtype=torch.float64, requires_grad=True)
    flow = random_flow(2, 6, 7).add_(0.37).requires_grad_()
    for padding_mode in PADDINGS:
        testing.check_gradcheck(
            lambda a, f: vosops.flow_warp(a, f, padding_mode=padding_mode, backend=backend), (x, flow))
    testing.check_gradcheck(
        lambda a: vosops.flow_warp(a, flow.detach(), mode="nearest", backend=backend), (x,))


@pytest.mark.parametrize("backend,device", [p for p in BACKENDS if p.values[0] == "cpu"])
@pytest.mark.parametrize("mode,wrt", [("bilinear", ("x", "flow")), ("bilinear", ("x",)), ("bilinear", ("flow",)),
                                      ("nearest", ("x",))])
@pytest.mark.parametrize("padding_mode", PADDINGS)
def test_cpu_tiles_channel_groups_and_single_gradients(backend, device, mode, wrt, padding_mode):
    """Frames spanning several of the CPU kernels' pixel tiles (the last one partial), channel counts that are not a
    multiple of their channel groups, and each gradient alone (separate kernels); the backward's outputs are
    allocated poisoned too, so a d(x) plane the kernel forgets to zero fails. The last shape is large enough for
    the forward and the flow-only backward to split their tiles between two threads."""
    gen = torch.Generator().manual_seed(3)
    threads = torch.get_num_threads()
    torch.set_num_threads(max(2, threads))
    try:
        _check_cpu_tiles(backend, mode, wrt, padding_mode, gen)
    finally:
        torch.set_num_threads(threads)


def _check_cpu_tiles(backend, mode, wrt, padding_mode, gen):
    for dtype in (torch.float64, torch.float32, torch.bfloat16):
        for B, C, H, W in [(1, 9, 41, 37), (3, 6, 23, 50)] + ([(2, 16, 64, 80)] if dtype == torch.float32 else []):
            x = torch.randn(B, C, H, W, generator=gen).to(dtype)
            flow = random_flow(B, H, W, dtype=torch.float32)
            # j + flow exact in the dtype and never on a kink (an integer for bilinear, a .5 tie for nearest), so no
            # tap can flip sides through rounding
            if mode == "nearest":
                flow = flow.round() + 0.25
            elif dtype == torch.bfloat16:  # 8 significant bits: flows within +-8 on a 1/16 grid, off by 1/32
                flow = (random_flow(B, H, W, dtype=torch.float32, far=False).clamp(-7.9, 7.9) * 16).round() / 16
                flow = flow + 1 / 32
            else:
                flow = (flow * 64).round() / 64 + 1 / 128
            flow = flow.to(dtype)
            g = torch.randn(B, C, H, W, generator=gen).to(dtype)
            with testing.poisoned_outputs():
                leaves = {"x": x.clone().requires_grad_("x" in wrt), "flow": flow.clone().requires_grad_("flow" in wrt)}
                out = vosops.flow_warp(leaves["x"], leaves["flow"], mode=mode, padding_mode=padding_mode,
                                       backend=backend)
                grads = torch.autograd.grad(out, [leaves[n] for n in wrt], g)
            ref_leaves = {"x": x.double().requires_grad_("x" in wrt),
                          "flow": flow.double().requires_grad_("flow" in wrt)}
            ref = reference.flow_warp(ref_leaves["x"], ref_leaves["flow"], mode, padding_mode)
            ref_grads = torch.autograd.grad(ref, [ref_leaves[n] for n in wrt], g.double())
            testing.assert_close(out, ref, dtype, "output")
            for n, gr, rg in zip(wrt, grads, ref_grads):
                testing.assert_close(gr, rg, dtype, f"grad of {n}", grad=True,
                                     atol=0.1 if dtype == torch.bfloat16 and n == "flow" else None)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_zero_flow_is_identity_and_integer_flow_is_a_shift(backend, device):
    x = torch.randn(2, 3, 8, 10, device=device)
    zero = torch.zeros(2, 2, 8, 10, device=device)
    for mode in MODES:
        torch.testing.assert_close(vosops.flow_warp(x, zero, mode=mode, backend=backend), x)
    shift = zero.clone()
    shift[:, 0] = 2.0  # sample two pixels to the right
    out = vosops.flow_warp(x, shift, backend=backend)
    torch.testing.assert_close(out[..., :-2], x[..., 2:])
    assert not out[..., -2:].any()


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_non_finite_flow_samples_nothing(backend, device):
    x = torch.randn(1, 2, 5, 6, device=device)
    flow = torch.zeros(1, 2, 5, 6, device=device)
    flow[0, 0, 1, 1] = float("nan")
    flow[0, 1, 2, 2] = float("inf")
    flow[0, 0, 3, 3] = 1e30
    for mode in MODES:
        out = vosops.flow_warp(x, flow, mode=mode, backend=backend)
        assert torch.isfinite(out).all()
        assert not out[0, :, 1, 1].any() and not out[0, :, 2, 2].any() and not out[0, :, 3, 3].any()
        torch.testing.assert_close(out[0, :, 0], x[0, :, 0])


@pytest.mark.parametrize("backend,device", [("reference", "cpu")] + BACKENDS)
def test_non_finite_flow_with_border_padding(backend, device):
    """Border padding clamps +-inf to the edge (grid_sample does); NaN still samples nothing."""
    x = torch.arange(1.0, 21.0, device=device).view(1, 1, 4, 5)
    flow = torch.zeros(1, 2, 4, 5, device=device)
    flow[0, 0, 1, 1] = float("nan")
    flow[0, 0, 2, 2] = float("inf")  # clamped to the last column
    flow[0, 1, 3, 3] = float("-inf")  # clamped to the first row
    for mode in MODES:
        out = vosops.flow_warp(x, flow, mode=mode, padding_mode="border", backend=backend)[0, 0].cpu()
        assert out[1, 1] == 0 and out[2, 2] == x[0, 0, 2, 4].cpu() and out[3, 3] == x[0, 0, 0, 3].cpu(), (mode, out)


@pytest.mark.parametrize("backend,device", [("reference", "cpu")] + BACKENDS)
def test_non_finite_x_outside_the_taps_stays_out_of_the_output(backend, device):
    """An out-of-frame tap adds nothing, even where x holds inf or NaN (grid_sample's rule): no 0 * inf."""
    x = torch.rand(1, 2, 4, 5, device=device)
    x[0, :, 0, 0] = float("inf")  # offset 0 of every plane: what an out-of-frame tap used to read
    x[0, 1, 2, 0] = float("nan")
    flow = torch.zeros(1, 2, 4, 5, device=device)
    flow[0, 0, 2, 3] = -100.0  # far left of the frame
    flow[0, 0, 1, 2] = -2.5  # between columns -0.5 and 0.5: one in-frame column of taps
    for mode in MODES:
        out = vosops.flow_warp(x, flow, mode=mode, backend=backend).cpu()
        exp = grid_sample_warp(x.cpu(), flow.cpu(), mode, "zeros")
        torch.testing.assert_close(out, exp, equal_nan=True)
        assert (out[0, :, 2, 3] == 0).all()


@pytest.mark.parametrize("backend,device", [("reference", "cpu")] + BACKENDS)
def test_flow_gradient_at_a_sampling_point_of_minus_one(backend, device):
    """At px = -1 exactly the tap x = 0 is in the frame with weight 0: out is 0 but d(out)/d(px) = x[.., 0]."""
    x = torch.rand(1, 1, 5, 5, dtype=torch.float32, device=device) + 1  # W - 1 = H - 1 = 4: exact grid round trip
    flow = torch.zeros(1, 2, 5, 5, device=device)
    flow[0, 0, 1, 2] = -3.0  # px = -1
    flow[0, 1, 3, 1] = -4.0  # py = -1
    flow.requires_grad_()
    vosops.flow_warp(x, flow, backend=backend).sum().backward()
    f2 = flow.detach().cpu().double().requires_grad_()
    grid_sample_warp(x.cpu().double(), f2, "bilinear", "zeros").sum().backward()
    torch.testing.assert_close(flow.grad.cpu().double(), f2.grad, atol=1e-6, rtol=1e-6)
    assert flow.grad[0, 0, 1, 2] == x[0, 0, 1, 0] and flow.grad[0, 1, 3, 1] == x[0, 0, 0, 1]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_reference_positions_in_float32_for_half_inputs(dtype):
    """Half precision cannot hold the column index past 256 (bf16) or 2048 (fp16): the reference computes positions
    and weights in float32 as the kernels, so a zero flow is the identity and return_valid is exact."""
    x = torch.randn(1, 2, 3, 300).to(dtype)
    assert torch.equal(vosops.flow_warp(x, torch.zeros(1, 2, 3, 300, dtype=dtype), backend="reference"), x)
    flow = torch.full((1, 2, 3, 300), 0.3, dtype=dtype)
    exp = vosops.flow_warp(x.float(), flow.float(), backend="reference").to(dtype)
    torch.testing.assert_close(vosops.flow_warp(x, flow, backend="reference"), exp, atol=0, rtol=0)
    W = 2100  # fp16 holds only even integers past 2048
    g = torch.Generator().manual_seed(0)
    wide = (torch.rand(1, 2, 2, W, generator=g) * 3 - 1.5).to(torch.float16)
    _, valid = vosops.flow_warp(torch.zeros(1, 1, 2, W, dtype=torch.float16), wide, return_valid=True)
    px = torch.arange(W, dtype=torch.float64) + wide[0, 0].double()  # exact: fp16 values are float64 values
    py = torch.arange(2, dtype=torch.float64)[:, None] + wide[0, 1].double()
    assert torch.equal(valid[0, 0], (px >= 0) & (px <= W - 1) & (py >= 0) & (py <= 1))


# --- registration, compile, validity, errors ---------------------------------------------------------------------

@pytest.mark.parametrize("mode", MODES)
def test_opcheck_native(mode):
    x = torch.randn(2, 3, 5, 6, requires_grad=True)
    flow = random_flow(2, 5, 6, dtype=torch.float32).requires_grad_(mode == "bilinear")
    testing.check_opcheck(torch.ops.vosops.flow_warp.default, (x, flow, mode, "zeros"))
    testing.check_opcheck(torch.ops.vosops.flow_warp.default, (x, flow, mode, "border"))


@pytest.mark.parametrize("mode", MODES)
def test_opcheck_triton(mode):
    pytest.importorskip("triton")
    from vosops.triton import flow_warp as tfw

    x = torch.randn(2, 3, 5, 6, requires_grad=True)
    flow = random_flow(2, 5, 6, dtype=torch.float32).requires_grad_(mode == "bilinear")
    testing.check_opcheck(tfw.flow_warp_triton, (x, flow, mode, "zeros"))


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_torch_compile_fullgraph(backend, device):
    x = torch.randn(2, 3, 5, 6, device=device, requires_grad=True)
    flow = random_flow(2, 5, 6, dtype=torch.float32, device=device).requires_grad_()
    testing.check_compile(lambda a, f: vosops.flow_warp(a, f, backend=backend), (x, flow))


def test_return_valid_marks_points_inside_the_frame():
    x = torch.randn(1, 1, 4, 5)
    flow = torch.zeros(1, 2, 4, 5)
    flow[0, 0, 0, 0] = -0.5   # x = -0.5: outside
    flow[0, 0, 1, 4] = 0.0    # x = 4 = W-1: inside
    flow[0, 1, 3, 2] = 0.4    # y = 3.4 > H-1: outside for bilinear, rounds to 3 for nearest
    _, valid = vosops.flow_warp(x, flow, return_valid=True)
    assert valid.shape == (1, 1, 4, 5) and valid.dtype == torch.bool
    assert not valid[0, 0, 0, 0] and valid[0, 0, 1, 4] and not valid[0, 0, 3, 2]
    assert valid.sum() == 4 * 5 - 2
    _, valid_nearest = vosops.flow_warp(x, flow, mode="nearest", return_valid=True)
    # nearest judges the rounded point: -0.5 rounds half to even (0) and 3.4 rounds to 3, both inside
    assert valid_nearest.all()


@pytest.mark.parametrize(
    "x,flow,kwargs,exc,match",
    [
        (torch.randn(3, 4, 5), torch.randn(3, 2, 4, 5), {}, ValueError, "x must have 4 dimensions"),
        (torch.randn(1, 3, 4, 5), torch.randn(1, 3, 4, 5), {}, ValueError, "flow must be .B, 2, H, W."),
        (torch.randn(2, 3, 4, 5), torch.randn(1, 2, 4, 5), {}, ValueError, "batch and spatial"),
        (torch.randn(1, 3, 4, 5), torch.randn(1, 2, 4, 6), {}, ValueError, "batch and spatial"),
        (torch.randn(1, 3, 4, 5), torch.randn(1, 2, 4, 5).double(), {}, TypeError, "flow has dtype"),
        (torch.randint(0, 3, (1, 3, 4, 5)), torch.randn(1, 2, 4, 5), {}, TypeError, "x must be float32"),
        (torch.randn(0, 3, 4, 5), torch.randn(0, 2, 4, 5), {}, ValueError, "x must not be empty"),
        (torch.randn(1, 3, 4, 5), torch.randn(1, 2, 4, 5), {"mode": "bicubic"}, ValueError, "mode must be"),
        (torch.randn(1, 3, 4, 5), torch.randn(1, 2, 4, 5), {"padding_mode": "reflection"}, ValueError,
         "padding_mode must be"),
        ([1.0], torch.randn(1, 2, 4, 5), {}, TypeError, "x must be a torch.Tensor"),
        (torch.randn(1, 3, 4, 5), torch.randn(1, 2, 4, 5, device="meta"), {}, ValueError, "flow is on meta"),
    ],
)
@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_bad_input_raises_clear_errors(x, flow, kwargs, exc, match, backend):
    """On the reference backend too: the Python checks are all that guards the Triton kernels, and on the cpu
    backend the C++ checks would hide a missing one."""
    with vosops.use_backend(backend), pytest.raises(exc, match=match):
        vosops.flow_warp(x, flow, **kwargs)


def test_native_op_checks_its_arguments_too():
    """Calling torch.ops.vosops.flow_warp directly must not crash on bad input."""
    with pytest.raises(ValueError, match="flow must be"):
        torch.ops.vosops.flow_warp(torch.randn(1, 3, 4, 5), torch.randn(1, 3, 4, 5), "bilinear", "zeros")
    with pytest.raises(ValueError, match="mode must be"):
        torch.ops.vosops.flow_warp(torch.randn(1, 3, 4, 5), torch.randn(1, 2, 4, 5), "cubic", "zeros")
    with pytest.raises(TypeError, match="same dtype"):
        torch.ops.vosops.flow_warp(torch.randn(1, 3, 4, 5), torch.randn(1, 2, 4, 5).double(), "bilinear", "zeros")


def test_triton_rejects_float64_clearly():
    pytest.importorskip("triton")
    if vosops._backends.why_unusable("triton", "flow_warp", "cpu") is not None:
        pytest.skip("triton backend not usable on CPU here")
    with pytest.raises(TypeError, match="triton backend takes float32"):
        vosops.flow_warp(torch.randn(1, 1, 3, 3, dtype=torch.float64), torch.zeros(1, 2, 3, 3, dtype=torch.float64),
                         backend="triton")


@pytest.mark.cuda
def test_cuda_uses_current_stream():
    x = torch.randn(2, 3, 32, 40, device="cuda")
    flow = torch.randn(2, 2, 32, 40, device="cuda")
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        out = vosops.flow_warp(x, flow, backend="cuda")
    s.synchronize()
    torch.testing.assert_close(out, reference.flow_warp(x, flow, "bilinear", "zeros"), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend,device", WITH_REFERENCE)
@pytest.mark.parametrize("padding_mode", PADDINGS)
def test_nearest_flow_gradient_is_zero(backend, device, padding_mode):
    """Nearest sampling is piecewise constant in the flow: every backend gives a zero flow gradient (grid_sample's
    rule), also when only the flow requires grad, rather than failing for want of a graph or giving garbage."""
    x = torch.randn(2, 3, 5, 7, device=device)
    flow = (random_flow(2, 5, 7, dtype=torch.float32).round() + 0.25).to(device).requires_grad_()
    out = vosops.flow_warp(x, flow, mode="nearest", padding_mode=padding_mode, backend=backend)
    (grad,) = torch.autograd.grad(out, flow, torch.randn_like(out))
    assert torch.equal(grad, torch.zeros_like(flow))
    testing.assert_close(out, reference.flow_warp(x.double(), flow.detach().double(), "nearest", padding_mode),
                         torch.float32, "output")


@pytest.mark.parametrize("backend,device", WITH_REFERENCE)
def test_flow_warp_nearest_rounds_half_to_even(backend, device):
    """Catches reference nearest rounding as floor(p + 0.5) (grid_sample rounds half to even)."""
    x = torch.arange(5.0).view(1, 1, 1, 5)
    flow = torch.zeros(1, 2, 1, 5)
    flow[:, 0] = 0.5
    out = vosops.flow_warp(x.to(device), flow.to(device), mode="nearest", backend=backend).cpu()
    assert out.flatten().tolist() == [0.0, 2.0, 2.0, 4.0, 4.0]
    grid = torch.stack([(torch.arange(5.0) + 0.5) / 4 * 2 - 1, torch.zeros(5)], -1).view(1, 1, 5, 2)
    gs = F.grid_sample(x.double(), grid.double(), mode="nearest", padding_mode="zeros", align_corners=True)
    assert gs.flatten().tolist() == [0.0, 2.0, 2.0, 4.0, 4.0]


@pytest.mark.parametrize("padding_mode", ["zeros", "border"])
@pytest.mark.parametrize("backend,device", WITH_REFERENCE)
def test_flow_warp_nan_flow_next_to_inf_x_samples_nothing(backend, device, padding_mode):
    """Catches the reference sending a non-finite sampling point to (-1, -1) instead of (-2, -2): its bilinear taps
    then reach pixel (0, 0) with weight 0, and 0 * inf = NaN (the docstring: a NaN flow samples nothing)."""
    x = torch.randn(1, 2, 4, 5)
    x[:, :, 0, 0] = float("inf")
    flow = torch.zeros(1, 2, 4, 5)
    flow[0, :, 2, 3] = float("nan")
    out = vosops.flow_warp(x.to(device), flow.to(device), padding_mode=padding_mode, backend=backend).cpu()
    assert (out[0, :, 2, 3] == 0).all()


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_border_flow_gradient_is_zero_exactly_on_the_edge_pixels(backend, device):
    """Border padding: a sampling point exactly on the first or last pixel is clamped, so its flow gradient is 0
    (grid_sample's rule, the reference's _clip): integer flows that land exactly on 0 and W-1 / H-1, one point
    strictly inside as a control."""
    H, W = 5, 6
    ii = torch.arange(H, dtype=torch.float64).view(H, 1).expand(H, W)
    jj = torch.arange(W, dtype=torch.float64).view(1, W).expand(H, W)
    fx = torch.where(jj < W / 2, -jj, (W - 1) - jj) + 0.0  # px exactly 0 or W-1
    fy = torch.where(ii < H / 2, -ii, (H - 1) - ii) + 0.0
    flow = torch.stack([fx, fy]).unsqueeze(0).contiguous()
    flow[..., 0, 0] += 0.25
    x = torch.randn(1, 3, H, W, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    dtype = torch.float32 if backend == "triton" else torch.float64
    xb, fb = x.to(device, dtype).requires_grad_(), flow.to(device, dtype).requires_grad_()
    out = vosops.flow_warp(xb, fb, padding_mode="border", backend=backend)
    g = torch.randn_like(out)
    gx, gf = torch.autograd.grad(out, (xb, fb), g)
    xr, fr = x.clone().requires_grad_(), flow.clone().requires_grad_()
    ref = reference.flow_warp(xr, fr, "bilinear", "border")
    rgx, rgf = torch.autograd.grad(ref, (xr, fr), g.double().cpu())
    testing.assert_close(out, ref, dtype, "output")
    testing.assert_close(gx, rgx, dtype, "grad of x", grad=True)
    testing.assert_close(gf, rgf, dtype, "grad of flow", grad=True)
    assert (rgf[0, :, 1:, 1:] == 0).all()  # every point but the control sits on an edge
