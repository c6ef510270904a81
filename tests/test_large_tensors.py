"""Tensors of more than 2^31 elements: the CPU kernels and the reference index them with 64-bit offsets.

The large operands are `torch.empty` allocations of 8 GiB whose pages are never written except for the few rows a
test sets: Linux maps untouched pages to the zero page, so each test costs seconds and well under 3 GB of memory.
The rows that must win sit past element 2^31, where an int32 offset would wrap to the start of the tensor (or
before it) and read a different row.
"""

import pytest
import torch

import vosops

BACKENDS = ["reference", "cpu"]
BEYOND_INT32 = 2**31 + 64 * 1000  # elements: the last 1000 rows of 64 lie past 2^31
# The local ops' reference pads or gathers whole key frames (copies of the 8 GiB operand): CPU kernel only.
LOCAL_C, LOCAL_H, LOCAL_W = 64, 8, 8
LOCAL_N = BEYOND_INT32 // (LOCAL_C * LOCAL_H * LOCAL_W) + 1  # reference frames: the last ones lie past 2^31


def _needs_native(op):
    """These tests run the C++ kernels only; a build without them (the documented fallback) has nothing to test."""
    if vosops._backends.why_unusable("cpu", op, "cpu") is not None:
        pytest.skip(f"no native CPU kernel for {op} in this build")


def _big_empty(*shape):
    try:
        return torch.empty(*shape)
    except RuntimeError as exc:  # address space refused (strict overcommit): not a failure of the op
        pytest.skip(f"cannot reserve {torch.Size(shape).numel() * 4 / 2**30:.1f} GiB of address space: {exc}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_topk_aggregate_gathers_values_rows_past_2_31(backend):
    L, C = BEYOND_INT32 // 64, 64
    values = _big_empty(1, L, C)
    rows = torch.tensor([L - 1, L - 2, 5, L // 2 + 7])
    rows_values = torch.randn(4, C)
    values[0, rows] = rows_values
    logits = torch.tensor([[[0.5, 1.0, -2.0, 3.0]]])
    out = vosops.topk_aggregate(logits, rows.view(1, 1, 4), values, backend=backend)
    expected = (torch.softmax(logits[0, 0].double(), 0)[:, None] * rows_values.double()).sum(0)
    torch.testing.assert_close(out[0, 0].double(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_global_topk_finds_keys_past_2_31(backend):
    C = 64
    L = BEYOND_INT32 // C
    keys = _big_empty(1, L, C)  # zero rows except the three below
    keys[0, L - 1, 3], keys[0, L - 3, 5], keys[0, 1, 3] = 7.0, 9.0, 6.0
    q = torch.zeros(1, 2, C)
    q[0, 0, 3] = q[0, 1, 5] = 1.0
    logits, index = vosops.global_topk(q, keys, topk=2, backend=backend)
    # Query 1 ties the score 0 of every other key: ties go to the lower key index, key 0.
    assert index.tolist() == [[[L - 1, 1], [L - 3, 0]]]
    assert logits.tolist() == [[[7.0, 6.0], [9.0, 0.0]]]


@pytest.mark.parametrize("backend", BACKENDS)
def test_topk_attention_keeps_keys_past_2_31(backend):
    D = 64
    L = BEYOND_INT32 // D
    k, v = _big_empty(1, 1, L, D), torch.zeros(1, 1, L, 4)
    k[0, 0, L - 1, 3], k[0, 0, L - 3, 5] = 7.0, 9.0
    v[0, 0, L - 1], v[0, 0, L - 3] = torch.tensor([1.0, 2, 3, 4]), torch.tensor([5.0, 6, 7, 8])
    q = torch.zeros(1, 1, 2, D)
    q[0, 0, 0, 3] = q[0, 0, 1, 5] = 1.0
    out = vosops.topk_attention(q, k, v, topk=1, scale=1.0, backend=backend)  # one key kept: its value
    assert out.tolist() == [[[[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0]]]]


@pytest.mark.parametrize("backend", BACKENDS)
def test_merge_topk_keeps_memory_indices_past_2_31(backend):
    """Candidate indices address a memory, not a tensor: 2^40 and beyond pass through unchanged."""
    big = 2**40
    first = (torch.tensor([[[3.0, 1.0]]]), torch.tensor([[[big + 5, big + 1]]]))
    second = (torch.tensor([[[2.0, 4.0]]]), torch.tensor([[[3 * big, 7]]]))
    logits, index = vosops.merge_topk([first, second], 3, backend=backend)
    assert logits.tolist() == [[[4.0, 3.0, 2.0]]]
    assert index.tolist() == [[[7, big + 5, 3 * big]]]


def test_local_attention_reads_key_frames_past_2_31():
    """Frames past element 2^31 of k win their queries' top-1. k is channels-last, as the kernel reads it, so the
    8 GiB operand is not copied."""
    _needs_native("local_attention")
    C, H, W, N = LOCAL_C, LOCAL_H, LOCAL_W, LOCAL_N
    k = _big_empty(1, N, H, W, C).permute(0, 1, 4, 2, 3)
    u = torch.randn(C, generator=torch.Generator().manual_seed(0))
    k[0, N - 1, :, 3, 4] = u
    k[0, N - 3, :, 5, 1] = -u
    v = torch.zeros(1, N, 2, H, W)
    v[0, N - 1, :, 3, 4] = torch.tensor([1.0, 2.0])
    v[0, N - 3, :, 5, 1] = torch.tensor([3.0, 4.0])
    q = torch.zeros(1, C, H, W)
    q[0, :, 3, 4], q[0, :, 5, 1] = u, -u
    out, (logits, index) = vosops.local_attention(q, k, v, radius=0, topk=1, return_topk=True, backend="cpu")
    assert index[0, 3, 4].tolist() == [N - 1] and index[0, 5, 1].tolist() == [N - 3]
    assert index[0, 0, 0].tolist() == [0]  # every score 0: the tie goes to the lowest candidate
    torch.testing.assert_close(logits[0, 3, 4], (u * u).sum().view(1))
    assert out[0, :, 3, 4].tolist() == [1.0, 2.0] and out[0, :, 5, 1].tolist() == [3.0, 4.0]


def test_local_affinity_scores_key_frames_past_2_31():
    _needs_native("local_affinity")
    C, H, W, N = LOCAL_C, LOCAL_H, LOCAL_W, LOCAL_N
    k = _big_empty(1, N, H, W, C).permute(0, 1, 4, 2, 3)
    u = torch.randn(C, generator=torch.Generator().manual_seed(1))
    k[0, N - 1, :, 3, 4] = u
    q = torch.zeros(1, C, H, W)
    q[0, :, 3, 4] = u
    logits = vosops.local_affinity(q, k, radius=0, backend="cpu")  # (1, N, 1, H, W): 1/64 of k
    torch.testing.assert_close(logits[0, N - 1, 0, 3, 4], (u * u).sum())
    assert logits[0, N - 1].count_nonzero() == 1 and logits[0, : N - 1].count_nonzero() == 0


def test_local_aggregate_gathers_value_frames_past_2_31():
    _needs_native("local_aggregate")
    Cv, H, W, N = LOCAL_C, LOCAL_H, LOCAL_W, LOCAL_N
    v = _big_empty(1, N, Cv, H, W)
    u = torch.randn(Cv, generator=torch.Generator().manual_seed(2))
    v[0, N - 1, :, 3, 4], v[0, 2, :, 3, 4] = u, 2 * u
    weights = torch.zeros(1, N, 1, H, W)
    weights[0, N - 1, 0, 3, 4], weights[0, 2, 0, 3, 4] = 1.0, 0.25
    out = vosops.local_aggregate(weights, v, radius=0, backend="cpu")
    torch.testing.assert_close(out[0, :, 3, 4], 1.5 * u)
    out[0, :, 3, 4] = 0
    assert out.count_nonzero() == 0


def test_kmeans_labels_points_past_2_31():
    """Two points past element 2^31 form their own cluster (the reference's broadcast distances would not fit)."""
    _needs_native("kmeans_step")
    D = 64
    N = BEYOND_INT32 // D
    x = _big_empty(1, N, D)  # zero points except the last two
    u = torch.randn(D, generator=torch.Generator().manual_seed(3))
    x[0, N - 2], x[0, N - 1] = u, u
    init = torch.stack([torch.zeros(D), 0.5 * u])
    res = vosops.kmeans(x, 2, iters=3, init=init, backend="cpu")
    assert res.labels[0, N - 2:].tolist() == [1, 1] and res.labels[0, : N - 2].count_nonzero() == 0
    torch.testing.assert_close(res.centroids[0], torch.stack([torch.zeros(D), u]))
    assert float(res.inertia[0]) == 0.0
    labels = vosops.kmeans_predict(x, res.centroids, backend="cpu")
    assert torch.equal(labels, res.labels)


def test_flow_warp_backward_reads_channels_past_2_31():
    """d(flow) sums over channels; the channel that moves it lies past element 2^31 of x and grad_out. (The forward
    and d(x) are as large as x, 8 GiB written: not run here. They share the tap offsets of this kernel.)"""
    _needs_native("flow_warp")
    H = W = 8
    C = BEYOND_INT32 // (H * W) + 1
    x, grad_out = _big_empty(1, C, H, W), _big_empty(1, C, H, W)  # zero planes except the last one's taps
    x[0, C - 1, 3, 4], x[0, C - 1, 3, 5], x[0, C - 1, 4, 5] = 0.5, 2.0, 1.0
    grad_out[0, C - 1, 3, 4] = 3.0
    flow = torch.zeros(1, 2, H, W)
    flow[0, :, 3, 4] = torch.tensor([0.5, 0.25])
    _, grad_flow = torch.ops.vosops.flow_warp_backward(grad_out, x, flow, "bilinear", "zeros", False, True)
    last = flow.double().requires_grad_()
    out = vosops.flow_warp(x[:, C - 1:].double(), last, backend="reference")
    expected, = torch.autograd.grad(out, last, grad_out[:, C - 1:].double())
    assert expected[0, :, 3, 4].abs().min() > 1  # the taps move both components
    torch.testing.assert_close(grad_flow.double(), expected)


def _big_empty_half(*shape):
    try:
        return torch.empty(*shape, dtype=torch.float16)
    except RuntimeError as exc:  # address space refused (strict overcommit): not a failure of the op
        pytest.skip(f"cannot reserve {torch.Size(shape).numel() * 2 / 2**30:.1f} GiB of address space: {exc}")


def test_offsets_whose_rounded_bound_passes_int32_are_refused():
    """Offsets are rounded to int32, clamped to +-(H + W + dilation * radius + 1): a frame 2^31 pixels wide would
    wrap that bound (an in-frame offset became INT_MIN). The public functions and the native ops refuse it before
    reading anything (the operands here are untouched fp16 allocations)."""
    _needs_native("local_attention")
    W = 2**31 - 1
    q, k, v = _big_empty_half(1, 1, 1, W), _big_empty_half(1, 1, 1, 1, W), _big_empty_half(1, 1, 1, 1, W)
    offsets = _big_empty_half(1, 1, 2, 1, W)
    match = r"H \+ W \+ dilation \* radius must be below 2\^31 - 1"
    for backend in ("cpu", "reference"):
        with pytest.raises(ValueError, match=match):
            vosops.local_attention(q, k, v, radius=0, offsets=offsets, backend=backend)
        with pytest.raises(ValueError, match=match):
            vosops.local_affinity(q, k, radius=0, offsets=offsets, backend=backend)
        with pytest.raises(ValueError, match=match):
            vosops.local_aggregate(k, v, radius=0, offsets=offsets, backend=backend)
    with pytest.raises(ValueError, match=match):
        torch.ops.vosops.local_attention(q, k, v, offsets, 0, 1, 1.0, 0, "softmax", "square", "mask", False)
    with pytest.raises(ValueError, match=match):
        torch.ops.vosops.local_affinity(q, k, offsets, 0, 1, "square", 1.0, "mask")
    with pytest.raises(ValueError, match=match):
        torch.ops.vosops.local_aggregate(k, v, offsets, 0, 1)
