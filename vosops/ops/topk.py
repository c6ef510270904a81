"""vosops top-k softmax aggregation: global_topk, topk_aggregate, merge_topk and topk_attention.

Semantics (ordering, invalid keys, padding with index -1 / logit -inf, empty rows) are defined in
vosops/reference/topk.py; every backend is held to that module.
"""

from __future__ import annotations

import math

import torch

from .. import _backends, _native, _validate
from .._autocast import autocast_policy
from ..reference import topk as _ref
from . import _topk_rules as _rules
from ._double_backward import refuse_double_backward

GLOBAL_TOPK_BACKENDS = ("reference", "cpu", "cuda", "triton")
AGGREGATE_BACKENDS = ("reference", "cpu", "cuda", "triton")
ATTENTION_BACKENDS = ("reference", "cpu", "cuda", "triton")
MERGE_BACKENDS = ("reference", "cpu", "cuda", "triton")


def _int(name: str, value, lo: int, hi: int | None = None, what: str = "") -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < lo or (hi is not None and value > hi):
        rng = f"[{lo}, {hi}]" if hi is not None else f">= {lo}"
        raise ValueError(f"{name} must be in {rng}{what}, got {value}")
    return value


def _scale(value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"scale must be a float, got {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"scale must be finite, got {value}")
    return float(value)


def _index_tensor(name: str, t, shape) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype != torch.int64:
        raise TypeError(f"{name} must be int64, got {t.dtype}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have the shape of the logits {tuple(shape)}, got {tuple(t.shape)}")


# --- global_topk ------------------------------------------------------------------------------------------------

# The checks of each op's arguments are shared by the public functions and the Triton ops (which a user may call
# directly as torch.ops.vosops.*_triton, and which must then raise, not read out of bounds); the native ops check
# the same in C++.

def check_global_topk_args(q, k, topk, scale, key_mask) -> float:
    """Returns the scale as a float."""
    _validate.tensor("q", q, dim=3)
    _validate.tensor("k", k, dim=3)
    _validate.same_device_dtype(("q", "k"), (q, k))
    if k.shape[0] != q.shape[0] or k.shape[2] != q.shape[2]:
        raise ValueError(f"k {tuple(k.shape)} must be (B, L, C) with q's B and C, q is {tuple(q.shape)}")
    _validate.non_empty("q", q)
    _validate.non_empty("k", k)
    _int("topk", topk, 1, k.shape[1], " (1 <= topk <= L, the number of keys)")
    scale = _scale(scale)
    if key_mask is not None:
        if not isinstance(key_mask, torch.Tensor) or key_mask.dtype != torch.bool:
            raise TypeError(f"key_mask must be a bool tensor, got {getattr(key_mask, 'dtype', type(key_mask))}")
        if tuple(key_mask.shape) != (k.shape[0], k.shape[1]):
            raise ValueError(f"key_mask must be (B, L) = {(k.shape[0], k.shape[1])}, got {tuple(key_mask.shape)}")
        if key_mask.device != k.device:
            raise ValueError(f"key_mask is on {key_mask.device} but k is on {k.device}; they must match")
    return scale


@autocast_policy("lower", "q", "k")
def global_topk(q: torch.Tensor, k: torch.Tensor, *, topk: int, scale: float = 1.0,
                key_mask: torch.Tensor | None = None, backend: str | None = None):
    """The `topk` largest logits scale * q·k of each query over all keys, without the (M x L) affinity.

    q (B, M, C), k (B, L, C); key_mask (B, L) bool, True = the key takes part (False excludes it).
    Returns (logits (B, M, topk) in q's dtype, index (B, M, topk) int64), sorted by logit descending, ties to
    the lower key index. Keys that are masked or whose logit is -inf/NaN are never selected; when a query has
    fewer than `topk` valid keys the remaining slots hold index -1 and logit -inf (topk_aggregate ignores them).
    Differentiable w.r.t. q and k through the returned logits. Memory O(B·M·topk) plus per-thread key tiles.
    """
    scale = check_global_topk_args(q, k, topk, scale, key_mask)
    chosen = _backends.select("global_topk", q.device, backend, GLOBAL_TOPK_BACKENDS, dtype=q.dtype)
    if chosen == "reference":
        return _ref.global_topk(q, k, topk=topk, scale=scale, key_mask=key_mask)
    if chosen == "triton":
        from ..triton import topk as _triton_topk

        return _triton_topk.global_topk_triton(q, k, topk, scale, key_mask)
    return torch.ops.vosops.global_topk(q, k, topk, scale, key_mask)


# --- merge_topk --------------------------------------------------------------------------------------------------

def _check_candidates(name: str, logits, index) -> None:
    _validate.tensor(f"{name} logits", logits, dim=3)
    _index_tensor(f"{name} index", index, logits.shape)
    if index.device != logits.device:
        raise ValueError(f"{name} index is on {index.device} but its logits on {logits.device}")


def check_merge_args(logits, index, topk) -> None:
    """The merge op's arguments: the candidate lists already concatenated, (B, M, N) each."""
    _check_candidates("candidates", logits, index)
    _int("topk", topk, 1, logits.shape[2], " (at most the total number of candidates)")


def merge_topk(candidates, topk: int, *, backend: str | None = None):
    """Top-`topk` of the union of candidate lists [(logits (B, M, K_i), index (B, M, K_i) int64), ...].

    The caller has already offset every list's indices into one memory (e.g. frame 0 searched globally, other
    frames within a local window). Ties go to the lower index; invalid entries (index -1 or logit -inf/NaN) sort
    last and the result is padded with index -1 / logit -inf when fewer than `topk` are valid. Duplicate indices
    are not removed. Differentiable w.r.t. the logits (the gradient goes to the selected entries).
    """
    if not isinstance(candidates, (list, tuple)) or not candidates:
        raise TypeError("candidates must be a non-empty list of (logits, index) pairs")
    first = None
    for n, pair in enumerate(candidates):
        if not isinstance(pair, (list, tuple)) or len(pair) != 2:
            raise TypeError(f"candidates[{n}] must be a (logits, index) pair, got {type(pair).__name__}")
        logits, index = pair
        _check_candidates(f"candidates[{n}]", logits, index)
        if first is None:
            first = logits
        else:
            _validate.same_device_dtype(("candidates[0] logits", f"candidates[{n}] logits"), (first, logits))
            if logits.shape[:2] != first.shape[:2]:
                raise ValueError(f"candidates[{n}] is {tuple(logits.shape)}; every list must share (B, M) = "
                                 f"{tuple(first.shape[:2])}")
    total = sum(c[0].shape[2] for c in candidates)
    topk = _int("topk", topk, 1, total, " (at most the total number of candidates)")
    chosen = _backends.select("merge_topk", first.device, backend, MERGE_BACKENDS, dtype=first.dtype)
    if chosen == "reference":
        return _ref.merge_topk(candidates, topk)
    logits = torch.cat([c[0] for c in candidates], dim=-1)
    index = torch.cat([c[1] for c in candidates], dim=-1)
    if chosen == "triton":
        from ..triton import merge_topk as _triton_merge

        out = _triton_merge.merge_topk_triton(logits, index, topk)
    else:
        out = torch.ops.vosops.merge_topk(logits, index, topk)
    return out[0], out[1]


# --- topk_aggregate ----------------------------------------------------------------------------------------------

def check_aggregate_args(logits, index, values, normalize, k) -> None:
    """k: None unless normalize is "threshold" (the ops pass 0 for None). The index range is checked apart."""
    _validate.tensor("logits", logits, dim=3)
    _index_tensor("index", index, logits.shape)
    _validate.tensor("values", values, dim=3)
    _validate.same_device_dtype(("logits", "values"), (logits, values))
    if index.device != logits.device:
        raise ValueError(f"index is on {index.device} but logits is on {logits.device}; they must match")
    if values.shape[0] != logits.shape[0]:
        raise ValueError(f"values {tuple(values.shape)} must be (B, L, Cv) with the logits' B = {logits.shape[0]}")
    _validate.non_empty("values", values)
    _validate.choice("normalize", normalize, _ref.NORMALIZE)
    if normalize == "threshold":
        if k is None:
            raise ValueError("k is required with normalize='threshold' (keep logits >= the k-th largest)")
        _int("k", k, 1)
    elif k is not None:
        raise ValueError(f"k is only used with normalize='threshold', got k={k!r} with normalize='softmax'")


def check_aggregate_backward_args(grad_out, logits, index, values, normalize, k) -> None:
    check_aggregate_args(logits, index, values, normalize, k)
    B, M, _ = logits.shape
    _validate.matches("grad_out", grad_out, (B, M, values.shape[2]), values, what="the output's (B, M, Cv) = ")


@autocast_policy("widest", "logits", "values")
def topk_aggregate(logits: torch.Tensor, index: torch.Tensor, values: torch.Tensor, *, normalize: str = "softmax",
                   k: int | None = None, check_index: bool = True, backend: str | None = None) -> torch.Tensor:
    """Softmax-weighted sum of the candidates' values: out[b, m] = sum_j w[b, m, j] values[b, index[b, m, j]].

    logits (B, M, K), index (B, M, K) int64 in [-1, L), values (B, L, Cv) -> (B, M, Cv).
    normalize="softmax": max-subtracted softmax over the valid candidates (index >= 0, logit > -inf).
    normalize="threshold" (DINO/INO): keep the valid candidates >= the k-th largest valid logit, ties kept.
    A row with no valid candidate outputs 0 with zero gradient. Differentiable w.r.t. logits and values.
    check_index: raise a ValueError for an index outside [-1, L). On a GPU that check synchronises with the host,
    so a loop whose indices come from vosops' own top-k ops passes False; unchecked, an out-of-range candidate is
    dropped like an empty slot (never read), except on CPU tensors with the cpu and triton backends, which always
    check.
    """
    check_aggregate_args(logits, index, values, normalize, k)
    chosen = _backends.select("topk_aggregate", logits.device, backend, AGGREGATE_BACKENDS,
                              dtype=values.dtype)
    # data-dependent, so not traced; on CPU tensors the cpu and triton kernels check it themselves
    if check_index and not torch.compiler.is_compiling() and (chosen == "reference" or index.device.type != "cpu"):
        _check_index_range(index, values.shape[1])
    if chosen == "reference":
        return _ref.topk_aggregate(logits, index, values, normalize=normalize, k=k)
    if chosen == "triton":
        from ..triton import topk_aggregate as _triton_agg

        return _triton_agg.topk_aggregate_triton(logits, index, values, normalize, k if k is not None else 0)
    return torch.ops.vosops.topk_aggregate(logits, index, values, normalize, k if k is not None else 0)


def _check_index_range(index: torch.Tensor, L: int) -> None:
    if index.numel() and bool(((index < -1) | (index >= L)).any()):
        bad = index[(index < -1) | (index >= L)][0].item()
        raise ValueError(f"index must be in [-1, L) = [-1, {L}) (-1 marks an empty slot), found {bad}")


# --- topk_attention ----------------------------------------------------------------------------------------------

def _check_qkv(q, k, v) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        _validate.tensor(name, t, dim=4)
    _validate.same_device_dtype(("q", "k", "v"), (q, k, v))
    if k.shape[:2] != q.shape[:2] or k.shape[3] != q.shape[3]:
        raise ValueError(f"k {tuple(k.shape)} must be (B, H, L, D) with q's B, H and D, q is {tuple(q.shape)}")
    if v.shape[:3] != k.shape[:3]:
        raise ValueError(f"v {tuple(v.shape)} must be (B, H, L, Dv) with k's B, H and L, k is {tuple(k.shape)}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        _validate.non_empty(name, t)


def check_attention_args(q, k, v, topk, scale, dense_keys) -> float:
    """scale None: 1/sqrt(D). Returns the scale as a float."""
    _check_qkv(q, k, v)
    L = k.shape[2]
    _int("topk", topk, 1, L, " (1 <= topk <= L, the number of keys)")
    _int("dense_keys", dense_keys, 0, L, " (0 <= dense_keys <= L)")
    return q.shape[3] ** -0.5 if scale is None else _scale(scale)


def check_attention_backward_args(grad_out, q, k, v, out, lse, index, scale, dense_keys) -> None:
    """The forward's inputs and saved (out, lse, index); index entries outside the sparse keys are the kernels'
    to skip (a range check would synchronise with the host)."""
    _check_qkv(q, k, v)
    B, H, M, _ = q.shape
    L = k.shape[2]
    _int("dense_keys", dense_keys, 0, L, " (0 <= dense_keys <= L)")
    _scale(scale)
    rows = (B, H, M, v.shape[3])
    _validate.matches("grad_out", grad_out, rows, q, what="the output's (B, H, M, Dv) = ")
    _validate.matches("out", out, rows, q, what="the forward's (B, H, M, Dv) = ")
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    _validate.matches("lse", lse, (B, H, M), q, dtype=acc, what="the forward's (B, H, M) = ")
    kk = index.shape[-1] if isinstance(index, torch.Tensor) and index.dim() == 4 else -1
    _validate.matches("index", index, (B, H, M, kk if 0 <= kk <= L - dense_keys else L - dense_keys), q,
                      dtype=torch.int64, what="the forward's (B, H, M, kept) with kept <= L - dense_keys: ")


@autocast_policy("lower", "q", "k", "v")
def topk_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, topk: int, scale: float | None = None,
                   dense_keys: int = 0, backend: str | None = None) -> torch.Tensor:
    """Multi-head attention that keeps the first `dense_keys` keys and the `topk` best of the rest.

    SDPA layout: q (B, H, M, D), k (B, H, L, D), v (B, H, L, Dv) -> (B, H, M, Dv). Logits scale * q·k (scale
    defaults to 1/sqrt(D)); keys [0, dense_keys) are always kept (JointFormer's current tokens), among keys
    [dense_keys, L) the `topk` largest logits (ties to the lower index); one max-subtracted softmax over the kept
    set. topk >= L - dense_keys keeps every key (= F.scaled_dot_product_attention). Differentiable w.r.t. q, k
    and v; the native kernels never hold an (M x L) tensor.

    Precision of the kernels' backward: like FlashAttention's, it recomputes the weights from a float32 log-sum-exp
    saved per query, whose rounding is relative to the largest logit, so a weight's relative error is about
    |max logit| * 6e-8: negligible at the logits of normalised features (|logit| <= 100: ~6e-6), 1e-3 at
    |logit| ~ 1e4. With larger logits use backend="reference" for gradients (it keeps the weights).
    """
    scale = check_attention_args(q, k, v, topk, scale, dense_keys)
    chosen = _backends.select("topk_attention", q.device, backend, ATTENTION_BACKENDS, dtype=q.dtype)
    if chosen == "reference":
        return _ref.topk_attention(q, k, v, topk=topk, scale=scale, dense_keys=dense_keys)
    if chosen == "triton":
        from ..triton import topk as _triton_topk

        return _triton_topk.topk_attention(q, k, v, topk, scale, dense_keys)
    return torch.ops.vosops.topk_attention(q, k, v, topk, scale, dense_keys)[0]


# --- registrations of the native ops ---------------------------------------------------------------------------

def kept_sparse(topk: int, L: int, dense_keys: int) -> int:
    """How many sparse keys topk_attention keeps per query (0 when every key is dense or all are kept)."""
    return 0 if topk >= L - dense_keys else topk


def attention_autograd_rules(backward_op):
    """(backward, setup_context) for a topk_attention forward op returning (out, lse, index)."""

    def setup_context(ctx, inputs, output):
        q, k, v, topk, scale, dense_keys, *extra = inputs
        out, lse, index = output
        ctx.save_for_backward(q, k, v, out, lse, index)
        # extra: a backend's own trailing arguments (the Triton op's product precision), handed on unchanged
        ctx.scale, ctx.dense_keys, ctx.extra = scale, dense_keys, tuple(extra)
        # lse and index never receive a gradient: do not have autograd allocate and fill zeros for them.
        ctx.set_materialize_grads(False)

    def backward(ctx, grad_out, _grad_lse, _grad_index):
        no_grads = (None,) * (3 + len(ctx.extra))
        if grad_out is None:
            return (None, None, None) + no_grads
        q, k, v, out, lse, index = ctx.saved_tensors
        dq, dk, dv = backward_op(grad_out, q, k, v, out, lse, index, ctx.scale, ctx.dense_keys, *ctx.extra)
        return (dq, dk, dv) + no_grads

    return backward, setup_context


def attention_fake(q, k, v, topk, scale, dense_keys, *_backend_args):
    B, H, M, _ = q.shape
    L = k.shape[2]
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    out = q.new_empty(B, H, M, v.shape[3])
    lse = q.new_empty(B, H, M, dtype=acc)
    index = q.new_empty(B, H, M, kept_sparse(topk, L, dense_keys), dtype=torch.int64)
    return out, lse, index


# global_topk's backward is a gather/scatter of O(M·topk·C): plain tensor ops, shared by the native and Triton ops.
def gt_setup(ctx, inputs, output):
    q, k, topk, scale, key_mask = inputs
    ctx.save_for_backward(q, k, output[1])
    ctx.scale = scale


def gt_backward(ctx, grad_logits, _grad_index):
    # logits[b, m, j] = scale * q[b, m] . k[b, idx]
    q, k, index = ctx.saved_tensors
    B, M, K = index.shape
    C = q.shape[2]
    g = torch.where(index >= 0, grad_logits, torch.zeros_like(grad_logits)) * ctx.scale
    safe = index.clamp(min=0).reshape(B, M * K, 1).expand(B, M * K, C)
    dq = dk = None
    if ctx.needs_input_grad[0]:
        kg = torch.gather(k, 1, safe).reshape(B, M, K, C)
        dq = (g.unsqueeze(-1) * kg).sum(2)
    if ctx.needs_input_grad[1]:
        contrib = (g.unsqueeze(-1) * q.unsqueeze(2)).reshape(B, M * K, C)
        dk = torch.zeros_like(k).scatter_add_(1, safe, contrib)
    return dq, dk, None, None, None


def global_topk_fake(q, k, topk, scale, key_mask):
    B, M, _ = q.shape
    return q.new_empty(B, M, topk), q.new_empty(B, M, topk, dtype=torch.int64)


def _register_native() -> None:
    torch.library.register_fake("vosops::topk_attention")(attention_fake)

    @torch.library.register_fake("vosops::topk_attention_backward")
    def _(grad_out, q, k, v, out, lse, index, scale, dense_keys):
        return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)

    refuse_double_backward("vosops::topk_attention_backward")
    backward, setup_context = attention_autograd_rules(torch.ops.vosops.topk_attention_backward)
    torch.library.register_autograd("vosops::topk_attention", backward, setup_context=setup_context)

    torch.library.register_fake("vosops::global_topk")(global_topk_fake)

    torch.library.register_autograd("vosops::global_topk", gt_backward, setup_context=gt_setup)

    torch.library.register_fake("vosops::topk_aggregate")(_rules.aggregate_fake)
    torch.library.register_fake("vosops::topk_aggregate_backward")(_rules.aggregate_backward_fake)
    refuse_double_backward("vosops::topk_aggregate_backward")
    agg_backward, agg_setup = _rules.aggregate_autograd_rules(torch.ops.vosops.topk_aggregate_backward)
    torch.library.register_autograd("vosops::topk_aggregate", agg_backward, setup_context=agg_setup)
    _rules.register_native()


if _native.LOADED and "topk_attention" in _backends._KERNELS["CPU"]:
    _register_native()
