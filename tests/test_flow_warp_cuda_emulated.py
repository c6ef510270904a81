"""The flow_warp CUDA kernels' logic, run on the CPU: tests/cuda_emulation/flow_warp_emu.cpp compiles
csrc/flow_warp/flow_warp_cuda.cu as host code with one host thread per CUDA thread (block_emulation.h; the backward's
atomics into d(x) contend for real) and the launchers' geometry, in float32, float64, float16 and bfloat16, against
the reference, forward and backward. Timing and the glue need a GPU (the cuda-marked tests in test_flow_warp.py)."""

import pytest
import torch

import vosops
from _cuda_emulation import acc_dtype, build_emulation, dtype_code, ptr, sizes_strides as _shape

MODES = {"bilinear": 0, "nearest": 1}
PADDINGS = {"zeros": 0, "border": 1}


@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    return build_emulation(tmp_path_factory, "flow_warp_emu.cpp")


def emulated_flow_warp(emu, x, flow, mode: str, padding_mode: str, grad):
    """The emulated forward, then the backward of `grad`: (out, d(x) in the accumulation dtype, d(flow)); outputs
    start as NaN (d(x) as zeros: the kernel accumulates into it)."""
    code, m, p = dtype_code(x.dtype), MODES[mode], PADDINGS[padding_mode]
    out = torch.full(x.shape, float("nan"), dtype=x.dtype)
    assert emu.emu_flow_warp_forward(code, ptr(x), ptr(_shape(x)), ptr(flow), ptr(_shape(flow)), ptr(out), m,
                                     p) == 0
    grad_x = torch.zeros(x.shape, dtype=acc_dtype(x.dtype))
    grad_flow = torch.full(flow.shape, float("nan"), dtype=x.dtype)
    assert emu.emu_flow_warp_backward(code, ptr(grad), ptr(_shape(grad)), ptr(x), ptr(_shape(x)), ptr(flow),
                                      ptr(_shape(flow)), ptr(grad_x), ptr(grad_flow), m, p) == 0
    return out, grad_x, grad_flow


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mode", ["bilinear", "nearest"])
@pytest.mark.parametrize("padding_mode", ["zeros", "border"])
@pytest.mark.parametrize("B,C,H,W", [(2, 3, 7, 9), (1, 2, 17, 19), (2, 19, 5, 6)])  # 126 pixels: one block; 323: two;
# C=19: three forward channel groups, the last partial
def test_flow_warp_kernels(emu, dtype, mode, padding_mode, B, C, H, W):
    g = torch.Generator().manual_seed(H * W + C)
    x = torch.randn(B, H, W, C, generator=g).to(dtype).permute(0, 3, 1, 2)  # channels-last strides
    flow = (torch.randn(B, 2, H, W, generator=g) * 3).to(dtype)
    flow[0, :, 0, 0] = torch.tensor([1.0, 2.0], dtype=dtype)  # a sample exactly on a pixel
    flow[-1, 0, -1, :] = W + 2.0  # fully outside the frame
    grad = torch.randn(B, C, H, W, generator=g).to(dtype)
    out, grad_x, grad_flow = emulated_flow_warp(emu, x, flow, mode, padding_mode, grad)
    xr, fr = x.double().requires_grad_(), flow.double().requires_grad_()
    want = vosops.flow_warp(xr, fr, mode=mode, padding_mode=padding_mode, backend="reference")
    tol = {torch.float32: 1e-5, torch.float64: 1e-12, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    torch.testing.assert_close(out.double(), want.detach(), atol=tol, rtol=tol)

    want_gx, want_gf = torch.autograd.grad(want, (xr, fr), grad.double(), allow_unused=True)
    torch.testing.assert_close(grad_x.double(), want_gx, atol=10 * tol, rtol=10 * tol)
    if mode == "bilinear":
        torch.testing.assert_close(grad_flow.double(), want_gf, atol=10 * tol, rtol=10 * tol)


@pytest.mark.parametrize("mode", ["bilinear", "nearest"])
def test_out_of_frame_taps_and_the_minus_one_point(emu, mode):
    """An inf in x at an out-of-frame tap's offset adds nothing (no 0 * inf), and a point at px = -1 keeps its
    in-frame tap (weight 0) for the flow gradient."""
    x = torch.rand(1, 2, 5, 5, dtype=torch.float64) + 1
    x[0, :, 0, 0] = float("inf")
    flow = torch.zeros(1, 2, 5, 5, dtype=torch.float64)
    flow[0, 0, 2, 3] = -100.0  # far left
    flow[0, 0, 1, 2] = -3.0  # px = -1
    out = torch.full_like(x, float("nan"))
    code, m = dtype_code(torch.float64), MODES[mode]
    assert emu.emu_flow_warp_forward(code, ptr(x), ptr(_shape(x)), ptr(flow), ptr(_shape(flow)), ptr(out), m, 0) == 0
    want = vosops.flow_warp(x, flow, mode=mode, backend="reference")
    torch.testing.assert_close(out, want, equal_nan=True)
    assert (out[0, :, 2, 3] == 0).all()
    grad = torch.ones_like(x)
    grad_x = torch.zeros_like(x)
    grad_flow = torch.full_like(flow, float("nan"))
    x[0, :, 0, 0] = 1.0  # finite for the gradient check
    assert emu.emu_flow_warp_backward(code, ptr(grad), ptr(_shape(grad)), ptr(x), ptr(_shape(x)), ptr(flow),
                                      ptr(_shape(flow)), ptr(grad_x), ptr(grad_flow), m, 0) == 0
    if mode == "bilinear":  # d/d(px) with all-ones grad: the sum over channels of the in-frame tap's value
        torch.testing.assert_close(grad_flow[0, 0, 1, 2], x[0, :, 1, 0].sum())
