"""Every op registered under torch.ops.vosops (the native ones and the Triton ones, forward and backward) checks
its own arguments: a user may call it directly, bypassing the checks of the vosops.* functions, and a malformed
tensor must then raise a clear error, never read out of bounds (which crashed the process on the CPU and would
poison the CUDA context on a GPU).

One valid call of each op is recorded while the public functions run (forward and backward), then each tensor
argument in turn gets one extra leading dimension, or one more entry along its first (batch) dimension, which no
op accepts."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import vosops
from vosops import _backends


class _RecordFirstCalls(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "vosops" and func.name() not in self.calls:
            self.calls[func.name()] = (func, [a.clone() if isinstance(a, torch.Tensor) else a for a in args])
        return func(*args, **(kwargs or {}))


def _exercise_public_ops(backend: str):
    """Runs every op of `backend` forward and backward at small odd sizes; returns {op name: (op, args)}."""
    g = torch.Generator().manual_seed(0)

    def rnd(*shape, grad=True):
        return torch.randn(*shape, generator=g).requires_grad_(grad)

    B, C, H, W = 2, 3, 5, 6
    rec = _RecordFirstCalls()
    with vosops.use_backend(backend), rec:
        vosops.flow_warp(rnd(B, C, H, W), rnd(B, 2, H, W)).sum().backward()
        q, k, v = rnd(B, C, H, W), rnd(B, 2, C, H, W), rnd(B, 2, 2, H, W)
        off = rnd(B, 2, 2, H, W, grad=False)
        out, (lg, _) = vosops.local_attention(q, k, v, radius=1, topk=4, offsets=off, return_topk=True)
        (out.sum() + lg.sum()).backward()
        a = vosops.local_affinity(q, k, radius=1, offsets=off)
        w = torch.softmax(a.flatten(1, 2), 1).view_as(a)
        vosops.local_aggregate(w, v, radius=1, offsets=off).sum().backward()
        qq, kk, vv = rnd(B, 7, 4), rnd(B, 11, 4), rnd(B, 11, 3)
        lg, ix = vosops.global_topk(qq, kk, topk=3, key_mask=torch.rand(B, 11, generator=g) > 0.2)
        vosops.topk_aggregate(lg, ix, vv).sum().backward()
        l1 = lg.detach().requires_grad_()
        ml, _ = vosops.merge_topk([(l1, ix), (l1 - 1, ix + 11)], topk=4)
        ml.sum().backward()
        vosops.topk_attention(rnd(B, 2, 5, 4), rnd(B, 2, 9, 4), rnd(B, 2, 9, 3), topk=2,
                              dense_keys=3).sum().backward()
        x = torch.randn(B, 20, 3, generator=g)
        vosops.kmeans(x, 3, iters=2, seed=0)
        vosops.kmeans(x, 3, iters=2, seed=0, batch_size=8)
        vosops.kmeans_predict(x, torch.randn(B, 3, 3, generator=g))
    return rec.calls


def _malformed(args):
    for i, a in enumerate(args):
        if isinstance(a, torch.Tensor):
            yield f"argument {i} with an extra leading dimension", i, a.unsqueeze(0)
            if a.dim() >= 1:
                yield f"argument {i} with one more batch entry", i, torch.cat([a, a[:1]], 0)


def _usable(backend):
    return _backends.why_unusable(backend, "topk_attention", "cpu") is None


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_every_op_rejects_malformed_tensors(backend):
    if not _usable(backend):
        pytest.skip(f"the {backend} backend is not usable on CPU tensors here")
    calls = _exercise_public_ops(backend)
    suffix = "_triton" if backend == "triton" else ""
    expected = ["flow_warp", "local_attention", "local_affinity", "local_aggregate", "topk_aggregate",
                "topk_attention"]
    for name in expected:  # the recording saw every forward and backward op it should
        assert f"vosops::{name}{suffix}" in calls and f"vosops::{name}{suffix}_backward" in calls, name
    for name in ("global_topk", "merge_topk", "kmeans_step", "kmeans_assign") + (("kmeans_lloyd",) if not suffix else ()):
        assert f"vosops::{name}{suffix}" in calls, name
    accepted = []
    for name, (op, args) in sorted(calls.items()):
        op(*args)  # the recorded call itself is valid
        for what, i, bad in _malformed(args):
            call = list(args)
            call[i] = bad
            try:
                op(*call)
            except (ValueError, TypeError) as e:
                assert "unpack" not in str(e), f"{name}, {what}: not the op's own check: {e}"
            else:
                accepted.append(f"{name}: {what}")
    assert not accepted, "malformed arguments accepted:\n" + "\n".join(accepted)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize("field,value,message", [("radius", 1024, "radius must be <= 1023"),
                                                 ("dilation", 2**31, "dilation must be <= 1023")])
def test_window_geometry_is_bounded(backend, field, value, message):
    """Every backend enumerates the (2r+1)^2 window columns (a huge radius ran the process out of memory) and bounds
    rounded offsets by H + W + dilation*radius in int32 (a huge dilation overflowed it)."""
    if not _usable(backend):
        pytest.skip(f"the {backend} backend is not usable on CPU tensors here")
    q, k, v = torch.randn(1, 2, 3, 4), torch.randn(1, 1, 2, 3, 4), torch.randn(1, 1, 2, 3, 4)
    geometry = {"radius": 1, "dilation": 1, field: value}
    with pytest.raises(ValueError, match=message):
        vosops.local_attention(q, k, v, **geometry, backend=backend)
    with pytest.raises(ValueError, match=message):
        vosops.local_affinity(q, k, **geometry, backend=backend)
    if backend == "cpu":  # the native op checks the same without the Python function
        with pytest.raises(ValueError, match=message):
            torch.ops.vosops.local_affinity(q, k, None, geometry["radius"], geometry["dilation"], "square", 1.0,
                                            "mask")
    else:
        from vosops.triton import local_affinity as triton_affinity

        with pytest.raises(ValueError, match=message):
            triton_affinity.local_affinity_triton(q, k, None, geometry["radius"], geometry["dilation"], "square",
                                                  1.0, "mask")


def test_triton_topk_attention_backward_skips_impossible_indices():
    """An index entry outside the sparse keys [dense_keys, L), which only a direct call can hand the backward, is
    skipped like an empty slot (-1) by the Triton kernels, never read through (a host check would synchronise)."""
    if not _usable("triton"):
        pytest.skip("the triton backend is not usable on CPU tensors here")
    from vosops.triton import topk as triton_topk

    g = torch.Generator().manual_seed(5)
    B, H, M, L, D, Dv, topk, dense = 1, 2, 6, 20, 4, 3, 3, 4
    q, k, v = (torch.randn(B, H, n, d, generator=g) for n, d in ((M, D), (L, D), (L, Dv)))
    out, lse, index = triton_topk.topk_attention_triton(q, k, v, topk, 0.5, dense, "ieee")
    grad = torch.randn(B, H, M, Dv, generator=g)
    corrupted, emptied = index.clone(), index.clone()
    for (h, m), bad in zip(((0, 1), (1, 4), (1, 0)), (L, 10**12, dense - 1)):
        corrupted[0, h, m, 1] = bad
        emptied[0, h, m, 1] = -1
    got = triton_topk.topk_attention_triton_backward(grad, q, k, v, out, lse, corrupted, 0.5, dense, "ieee")
    want = triton_topk.topk_attention_triton_backward(grad, q, k, v, out, lse, emptied, 0.5, dense, "ieee")
    clean = triton_topk.topk_attention_triton_backward(grad, q, k, v, out, lse, index, 0.5, dense, "ieee")
    for name, x, y, z in zip(("dq", "dk", "dv"), got, want, clean):
        torch.testing.assert_close(x, y, atol=1e-6, rtol=1e-6, msg=name)
        assert not torch.allclose(y, z), name  # the emptied slots did carry gradient


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_every_op_with_a_scale_rejects_a_non_finite_one(backend):
    """A NaN or infinite scale makes every score NaN or +-inf, which the selections read as "no key": the ops
    returned empty rows or NaN silently when called directly."""
    if not _usable(backend):
        pytest.skip(f"the {backend} backend is not usable on CPU tensors here")
    checked = []
    for name, (op, args) in sorted(_exercise_public_ops(backend).items()):
        names = [a.name for a in op._schema.arguments]
        if "scale" not in names:
            continue
        i = names.index("scale")
        for bad in (float("nan"), float("inf"), float("-inf")):
            call = list(args)
            call[i] = bad
            with pytest.raises(ValueError, match="scale must be finite"):
                op(*call)
        checked.append(name.split("::")[1])
    suffix = "_triton" if backend == "triton" else ""
    for name in ("local_attention", "global_topk", "topk_attention", "topk_attention_backward"):
        assert any(c.startswith(name.replace("_backward", "")) and c.endswith(
            suffix + ("_backward" if "backward" in name else "")) for c in checked), (name, checked)


@pytest.mark.parametrize("dtype,portable", [(torch.float64, False), (torch.float32, True), (torch.float32, False)])
def test_topk_attention_backward_takes_an_index_that_repeats_a_key(dtype, portable, monkeypatch):
    """A directly passed index may name one key many times in a row (the forward never does): the cpu backward's
    per-key scratch was sized for at most max(M, 64) queries per key, and the portable path (float64, or
    VOSOPS_TOPK_PORTABLE=1) wrote past it (heap corruption, an abort). Each repeat counts as one more kept pair."""
    if _backends.why_unusable("cpu", "topk_attention", "cpu") is not None:
        pytest.skip("no native CPU kernel for topk_attention in this build")
    import os
    import pathlib
    import subprocess
    import sys

    script = f"""
import torch, vosops
M, L = 1, 400
q, k = torch.ones(1, 1, M, 1, dtype={dtype}), torch.ones(1, 1, L, 1, dtype={dtype})
v = torch.arange(L, dtype={dtype}).view(1, 1, L, 1)
out, lse, g = torch.ones(1, 1, M, 1, dtype={dtype}), torch.zeros(1, 1, M, dtype=torch.{'float64' if dtype == torch.float64 else 'float32'}), torch.ones(1, 1, M, 1, dtype={dtype})
index = torch.zeros(1, 1, M, L, dtype=torch.long)  # key 0, L times
for _ in range(20):
    dq, dk, dv = torch.ops.vosops.topk_attention_backward(g, q, k, v, out, lse, index, 1.0, 0)
# p = exp(q.k - lse) = e per pair, L pairs on key 0: dv[0] = L * e * g
assert abs(dv[0, 0, 0, 0].item() - L * 2.718281828459045) < 1e-3 * L, dv[0, 0, 0, 0].item()
assert torch.isfinite(dq).all() and torch.isfinite(dk).all() and (dv[0, 0, 1:] == 0).all()
print("ok")
"""
    env = dict(os.environ)
    env.pop("VOSOPS_TOPK_PORTABLE", None)
    if portable:
        env["VOSOPS_TOPK_PORTABLE"] = "1"
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120,
                         cwd=str(pathlib.Path(__file__).resolve().parents[1]))
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stdout + res.stderr
