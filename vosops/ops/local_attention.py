"""vosops.local_affinity / local_aggregate / local_attention: local-window attention over N reference frames.

Shapes: q (B, C, H, W); k (B, N, C, H, W); v (B, N, Cv, H, W); offsets (B, N, 2, H, W) float, channel 0 = dx,
1 = dy, in pixels, rounded half away from zero. Candidate (n, dy, dx), |dy|, |dx| <= radius, of query pixel (i, j)
is reference n at (i + round(oy) + dilation*dy, j + round(ox) + dilation*dx); its index is
n*P + (dy+r)(2r+1) + (dx+r) with P = (2r+1)^2 (the F.unfold / correlation-sampler order). window="circle" keeps
the candidates with dy^2 + dx^2 < r^2 (strict). border="mask": out-of-frame candidates are excluded; "zero": they
score exactly 0 and carry a zero value (so they can win a top-k slot when in-frame scores are negative). A
non-finite offset puts all candidates of that reference out of frame. Offsets are not differentiated.
radius is at most 1023 and dilation at most 1023 (MAX_RADIUS, MAX_DILATION).
"""

from __future__ import annotations

import math

import torch

from .. import _backends, _native, _validate
from .._autocast import autocast_policy
from ..reference.local_attention import local_affinity as _ref_affinity
from ..reference.local_attention import local_aggregate as _ref_aggregate
from ..reference.local_attention import local_attention as _ref_attention
from ..reference.local_attention import offset_limit

WINDOWS = ("square", "circle")
BORDERS = ("mask", "zero")
NORMALIZE = ("softmax", "threshold")

# Backends that implement each public op here.
ATTENTION_BACKENDS = ("reference", "cpu", "cuda", "triton")
AFFINITY_BACKENDS = ("reference", "cpu", "cuda", "triton")  # local_affinity and local_aggregate
CUDA_MAX_TOPK = 128  # the CUDA kernel keeps its top-k list in registers (csrc/local_attention, kCudaMaxTopk)
# Every backend enumerates the window's columns, and the kernels bound rounded offsets by H + W + dilation*radius in
# int32: far beyond any useful window (csrc/local_attention/local_attention_math.h, kMaxRadius, kMaxDilation).
MAX_RADIUS = 1023
MAX_DILATION = 1023


def _auto_candidates(dtype: torch.dtype, topk) -> tuple[str, ...]:
    """The backends "auto" may pick for this call: float64 runs on reference/cpu only, topk > 128 not on cuda.
    An explicitly requested backend is not filtered; it raises its own clear error instead."""
    names = ATTENTION_BACKENDS
    if dtype == torch.float64:
        names = tuple(b for b in names if b not in ("cuda", "triton"))
    if topk is not None and topk > CUDA_MAX_TOPK:
        names = tuple(b for b in names if b != "cuda")
    return names


def _unfused_backend(op: str, device: torch.device, dtype: torch.dtype, backend: str | None) -> str:
    """The backend for local_affinity / local_aggregate; "auto" keeps float64 off cuda/triton (fp32 kernels)."""
    auto = (backend if backend is not None else _backends.current_backend()) == "auto"
    supported = AFFINITY_BACKENDS
    if auto and dtype == torch.float64:
        supported = tuple(b for b in supported if b not in ("cuda", "triton"))
    return _backends.select(op, device, backend, supported=supported)


def _check_int(name: str, value, low: int, high: int | None = None, why: str = "") -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")
    if high is not None and value > high:
        raise ValueError(f"{name} must be <= {high}{why}, got {value}")
    return value


def _check_geometry(radius, dilation) -> None:
    _check_int("radius", radius, 0, MAX_RADIUS, " (a window of (2*radius+1)^2 candidates per reference)")
    _check_int("dilation", dilation, 1, MAX_DILATION, " (keeps the rounded offsets' bound in int32)")


def _check_scale(scale) -> float:
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a float, got {type(scale).__name__}")
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale}")
    return float(scale)


def _no_grad(offsets):
    """Offsets are not differentiated: detached, so an output requires grad only through q, k, v or weights on
    every backend (the reference rounds them with no graph; the ops' outputs required grad through them)."""
    return None if offsets is None else offsets.detach()


def _check_offsets(offsets, ref: torch.Tensor, N: int, radius: int, dilation: int) -> None:
    if offsets is None:
        return
    _validate.tensor("offsets", offsets, dim=5)
    B, H, W = ref.shape[0], ref.shape[-2], ref.shape[-1]
    if offset_limit(H, W, radius, dilation) > 2**31 - 1:  # the kernels round offsets to int32, clamped to +-it
        raise ValueError(f"with offsets, H + W + dilation * radius must be below 2^31 - 1 (offsets are rounded to "
                         f"int32), got H = {H}, W = {W}")
    if tuple(offsets.shape) != (B, N, 2, H, W):
        raise ValueError(
            f"offsets must be (B, N, 2, H, W) = {(B, N, 2, H, W)} with channel 0 = dx and 1 = dy, "
            f"got shape {tuple(offsets.shape)}"
        )
    if offsets.device != ref.device:
        raise ValueError(f"offsets is on {offsets.device} but the features are on {ref.device}; they must match")


def _check_qk(q, k) -> None:
    _validate.tensor("q", q, dim=4)
    _validate.tensor("k", k, dim=5)
    B, C, H, W = q.shape
    if k.shape[1] == 0:
        raise ValueError(f"k must hold at least one reference frame (N >= 1), got shape {tuple(k.shape)}")
    if k.shape[0] != B or k.shape[2] != C or tuple(k.shape[3:]) != (H, W):
        raise ValueError(f"k must be (B, N, C, H, W) matching q {tuple(q.shape)}, got shape {tuple(k.shape)}")
    _validate.same_device_dtype(("q", "k"), (q, k))
    _validate.non_empty("q", q)


def _check_v(v, like, N: int) -> None:
    _validate.tensor("v", v, dim=5)
    B, H, W = like.shape[0], like.shape[-2], like.shape[-1]
    if v.shape[0] != B or v.shape[1] != N or tuple(v.shape[3:]) != (H, W):
        raise ValueError(f"v must be (B, N, Cv, H, W) with B, N, H, W = {(B, N, H, W)}, got shape {tuple(v.shape)}")
    if v.shape[2] == 0:
        raise ValueError(f"v must have at least one channel, got shape {tuple(v.shape)}")


def candidate_count(radius: int, window: str, N: int = 1) -> int:
    """Number of in-window candidates over N references."""
    return N * window_size(radius, window)


def window_size(radius: int, window: str) -> int:
    """len(window_columns(radius, window)) by counting per row (no enumeration, no cache for dynamo to trace):
    a circle keeps dx^2 < r^2 - dy^2, i.e. |dx| <= isqrt(r^2 - dy^2 - 1) on rows where r^2 - dy^2 >= 1."""
    if window == "square":
        return (2 * radius + 1) ** 2
    rows = (radius * radius - dy * dy for dy in range(-radius, radius + 1))
    return sum(2 * math.isqrt(m - 1) + 1 for m in rows if m >= 1)


# --- the checks of each op's arguments, shared by the public functions and the Triton ops (which a user may call
# directly as torch.ops.vosops.*_triton, and which must then raise, not read out of bounds); the native ops check
# the same in C++.

def _check_window(radius, dilation, window) -> None:
    _check_geometry(radius, dilation)
    _validate.choice("window", window, WINDOWS)
    if candidate_count(radius, window) == 0:
        raise ValueError(f"window='circle' with radius {radius} has no candidates (dy^2 + dx^2 < r^2); use radius >= 1")


def check_affinity_args(q, k, offsets, radius, dilation, window, scale, border) -> float:
    """Returns the scale as a float."""
    _check_qk(q, k)
    _check_window(radius, dilation, window)
    _validate.choice("border", border, BORDERS)
    scale = _check_scale(scale)
    _check_offsets(offsets, q, k.shape[1], radius, dilation)
    return scale


def check_affinity_backward_args(grad, q, k, offsets, radius, dilation, window, scale) -> None:
    check_affinity_args(q, k, offsets, radius, dilation, window, scale, "mask")  # the border is not an argument
    B, N, _, H, W = k.shape
    _validate.matches("grad", grad, (B, N, (2 * radius + 1) ** 2, H, W), q, what="the affinity's (B, N, P, H, W) = ")


def check_aggregate_args(weights, v, offsets, radius, dilation) -> None:
    _validate.tensor("weights", weights, dim=5)
    _check_geometry(radius, dilation)
    B, N, P, H, W = weights.shape
    if N == 0:
        raise ValueError(f"weights must hold at least one reference frame (N >= 1), got shape {tuple(weights.shape)}")
    if P != (2 * radius + 1) ** 2:
        raise ValueError(f"weights must be (B, N, P, H, W) with P = (2*radius+1)^2 = {(2 * radius + 1) ** 2}, "
                         f"got shape {tuple(weights.shape)}")
    _check_v(v, weights, N)
    _validate.same_device_dtype(("weights", "v"), (weights, v))
    _validate.non_empty("weights", weights)
    _check_offsets(offsets, weights, N, radius, dilation)


def check_aggregate_backward_args(grad_out, weights, v, offsets, radius, dilation) -> None:
    check_aggregate_args(weights, v, offsets, radius, dilation)
    B, N, Cv, H, W = v.shape
    _validate.matches("grad_out", grad_out, (B, Cv, H, W), v, what="the output's (B, Cv, H, W) = ")


def check_attention_args(q, k, v, offsets, radius, dilation, scale, topk, normalize, window, border,
                         return_topk) -> float:
    """topk None: every candidate. Returns the scale as a float."""
    _check_qk(q, k)
    N = k.shape[1]
    _check_v(v, q, N)
    _validate.same_device_dtype(("q", "v"), (q, v))
    _check_window(radius, dilation, window)
    _validate.choice("normalize", normalize, NORMALIZE)
    _validate.choice("border", border, BORDERS)
    scale = _check_scale(scale)
    _check_offsets(offsets, q, N, radius, dilation)
    count = candidate_count(radius, window, N)
    if topk is not None:
        _check_int("topk", topk, 1)
        if topk > count:
            raise ValueError(f"topk must be <= the number of candidates ({count} = N * window size), got {topk}")
    if normalize == "threshold" and topk is None:
        raise ValueError("normalize='threshold' needs topk (keep every logit >= the topk-th largest)")
    if return_topk and topk is None:
        raise ValueError("return_topk=True needs topk")
    return scale


@autocast_policy("lower", "q", "k")
def local_affinity(q, k, *, radius, dilation=1, window="square", offsets=None, scale=1.0, border="mask",
                   backend: str | None = None):
    """Logits scale * <q[:, :, i, j], k[:, n] at candidate p> as (B, N, P, H, W).

    Candidates outside a circle window, and out-of-frame ones with border="mask", are -inf; with border="zero"
    out-of-frame candidates are exactly 0. Materialises the full (B, N, P, H, W) affinity (use local_attention to
    avoid that). Differentiable w.r.t. q and k; the -inf and border-zero candidates are constants (zero gradient);
    offsets are not differentiated. cpu/cuda/triton accumulate in fp32 (fp64 for fp64 inputs on cpu)."""
    scale = check_affinity_args(q, k, offsets, radius, dilation, window, scale, border)
    offsets = _no_grad(offsets)
    chosen = _unfused_backend("local_affinity", q.device, q.dtype, backend)
    if chosen == "reference":
        return _ref_affinity(q, k, radius, dilation, window, offsets, scale, border)
    args = (q, k, offsets, radius, dilation, window, scale, border)
    if chosen == "triton":
        from ..triton import local_affinity as _triton

        return _triton.local_affinity_triton(*args)
    return torch.ops.vosops.local_affinity(*args)


@autocast_policy("lower", "weights", "v")
def local_aggregate(weights, v, *, radius, dilation=1, offsets=None, backend: str | None = None):
    """out (B, Cv, H, W) = sum over n, p of weights (B, N, P, H, W) times the value of candidate (n, p) (zero for
    out-of-frame candidates; every column of the square window takes part, whatever window made the weights).
    Differentiable w.r.t. weights (zero gradient at out-of-frame candidates) and v; offsets are not
    differentiated. The cpu/cuda/triton kernels skip out-of-frame candidates, so a non-finite weight there does not
    propagate (the reference multiplies it by a zero value: inf * 0 = NaN); finite weights give the same results."""
    check_aggregate_args(weights, v, offsets, radius, dilation)
    offsets = _no_grad(offsets)
    chosen = _unfused_backend("local_aggregate", v.device, v.dtype, backend)
    if chosen == "reference":
        return _ref_aggregate(weights, v, radius, dilation, offsets)
    args = (weights, v, offsets, radius, dilation)
    if chosen == "triton":
        from ..triton import local_affinity as _triton

        return _triton.local_aggregate_triton(*args)
    return torch.ops.vosops.local_aggregate(*args)


@autocast_policy("lower", "q", "k", "v")
def local_attention(q, k, v, *, radius, scale=1.0, topk=None, normalize="softmax", window="square", dilation=1,
                    offsets=None, border="mask", return_topk=False, backend: str | None = None):
    """Fused local attention: out (B, Cv, H, W) = sum over kept candidates of weight * value, never materialising
    the (N*P)-wide affinity (on the native and Triton backends).

    normalize="softmax": softmax over all in-window candidates, or over the `topk` largest (ties go to the lower
    candidate index). normalize="threshold" (DINO/INO): keep every candidate whose logit is >= the `topk`-th largest
    (ties kept, so more than topk may survive), weights exp(logit) / sum. Max-subtracted exponentials throughout.
    A query with no valid candidate outputs 0 with zero gradient. A NaN logit (a NaN or inf feature) ranks first, as
    torch.sort puts it, so a query whose window holds one outputs NaN and lists it first. Differentiable w.r.t. q,
    k, v (through the kept candidates; first order on the native and Triton backends); offsets are not
    differentiated.

    return_topk=True (needs topk) also returns (logits, indices), each (B, H, W, topk): the topk largest logits of
    every query in descending order (ties: lower index first) and their candidate indices n*P + p (int64), for
    merging with a global memory. With threshold, these are the first topk of the kept set. Excluded candidates
    that fill a short list have logit -inf.
    """
    scale = check_attention_args(q, k, v, offsets, radius, dilation, scale, topk, normalize, window, border,
                                 return_topk)
    offsets = _no_grad(offsets)
    auto = (backend if backend is not None else _backends.current_backend()) == "auto"
    supported = _auto_candidates(q.dtype, topk) if auto else ATTENTION_BACKENDS
    chosen = _backends.select("local_attention", q.device, backend, supported=supported)
    if chosen == "reference":
        return _ref_attention(q, k, v, radius, scale, topk, normalize, window, dilation, offsets, border,
                              return_topk)
    args = (q, k, v, offsets, radius, dilation, scale, topk or 0, normalize, window, border, return_topk)
    if chosen == "triton":
        from ..triton import local_attention as _triton

        out, lg, idx = _triton.local_attention(*args)
    else:
        out, _, lg, idx = torch.ops.vosops.local_attention(*args)
    if return_topk:
        return out, (lg, idx)
    return out


if _native.LOADED:
    # Fake kernels and autograd of the native op live next to its schema's Python side.
    from . import _local_affinity_native, _local_attention_native  # noqa: F401
