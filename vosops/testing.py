"""The backend-testing harness shared by every op's tests.

A backend is checked against the reference the same way for every op:
  * fresh random inputs (the caller's factory), the reference run in float64, the backend in the dtype under test,
    compared with per-dtype tolerances;
  * every op output freshly allocated while poisoning is on, so an element a kernel never writes is NaN and fails;
  * gradients compared through a random upstream gradient; `gradcheck` in float64 where a backend takes float64;
  * inputs re-laid as non-contiguous or channels-last views with the same values;
  * `torch.library.opcheck` on the registered op and `torch.compile(fullgraph=True)` on the public function.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any, Callable, Sequence

import torch

from . import _alloc, _backends

# (atol, rtol) against a float64 reference, for outputs of order 1.
TOLERANCES = {
    torch.float64: (1e-9, 1e-7),
    torch.float32: (2e-5, 2e-5),
    torch.float16: (3e-3, 3e-3),
    torch.bfloat16: (2.5e-2, 2e-2),
}
# Gradients accumulate more rounding (sums over many terms), so they get a looser bound.
GRAD_SCALE = 5.0


def tolerance(dtype: torch.dtype, *, grad: bool = False) -> tuple[float, float]:
    atol, rtol = TOLERANCES[dtype]
    return (atol * GRAD_SCALE, rtol * GRAD_SCALE) if grad else (atol, rtol)


_poison_depth = 0
_poison_lock = threading.Lock()


@contextlib.contextmanager
def poisoned_outputs():
    """Fill every op output with NaN (integers: -7777) when it is allocated, for the duration of the block.

    Blocks nest, and blocks in several threads overlap: poisoning stays on until the last one open ends (a
    process-wide count, not per thread: the CUDA backward runs on autograd's own threads)."""
    global _poison_depth
    with _poison_lock:
        _poison_depth += 1
        if _poison_depth == 1:
            _alloc.set_poison_outputs(True)
    try:
        yield
    finally:
        with _poison_lock:
            _poison_depth -= 1
            if _poison_depth == 0:
                _alloc.set_poison_outputs(False)


def usable_backends(op: str, device_type: str, supported: Sequence[str] = _backends.BACKENDS) -> list[str]:
    """The backends (reference excluded) that can run `op` on `device_type` tensors here."""
    return [
        b for b in supported
        if b != "reference" and _backends.why_unusable(b, op, device_type) is None
    ]


def backend_dtypes(backend: str, device_type: str) -> list[torch.dtype]:
    """The dtypes a backend is tested in: fp64 on reference/cpu; bf16 on GPU and the C++ CPU kernels, not under
    the Triton interpreter (its bf16 is wrong)."""
    dtypes = [torch.float32, torch.float16]
    if backend in ("reference", "cpu"):
        dtypes.insert(0, torch.float64)
    if device_type == "cuda" or backend == "cpu":
        dtypes.append(torch.bfloat16)
    return dtypes


def relayout(t: torch.Tensor, layout: str) -> torch.Tensor:
    """The same values as `t` in another memory layout: "contiguous", "noncontiguous" (every other element of a
    larger buffer, so no stride is the contiguous one), or "channels_last" (4-d tensors)."""
    if layout == "contiguous":
        return t.contiguous()
    if layout == "channels_last":
        if t.dim() != 4:
            return t
        return t.contiguous(memory_format=torch.channels_last)
    if layout == "noncontiguous":
        big = torch.full((*t.shape[:-1], 2 * t.shape[-1]), float("nan") if t.is_floating_point() else -1,
                         dtype=t.dtype, device=t.device)
        big[..., ::2] = t
        view = big[..., ::2]
        assert not view.is_contiguous() or t.shape[-1] <= 1
        return view
    raise ValueError(f"layout must be contiguous, noncontiguous or channels_last, got {layout!r}")


def _flatten(out) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _flatten(o)]
    if out is None:
        return []
    if hasattr(out, "_fields"):  # named tuples
        return [t for o in out for t in _flatten(o)]
    raise TypeError(f"unexpected op output of type {type(out).__name__}")


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str, *,
                 grad: bool = False, atol: float | None = None, rtol: float | None = None) -> None:
    """Floating outputs within the dtype's tolerance (relative to the reference's scale); others exactly."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    if not expected.is_floating_point():
        torch.testing.assert_close(actual.cpu(), expected.cpu(), atol=0, rtol=0, msg=lambda m: f"{what}: {m}")
        return
    a0, r0 = tolerance(dtype, grad=grad)
    scale = max(1.0, float(expected.detach().abs().max())) if expected.numel() else 1.0
    torch.testing.assert_close(
        actual.detach().double().cpu(), expected.detach().double().cpu(),
        atol=(atol if atol is not None else a0) * scale, rtol=rtol if rtol is not None else r0,
        equal_nan=False, msg=lambda m: f"{what} ({dtype}): {m}",
    )


def check_against_reference(
    fn: Callable[..., Any],
    ref_fn: Callable[..., Any],
    inputs: dict[str, torch.Tensor],
    *,
    dtype: torch.dtype,
    grad_inputs: Sequence[str] = (),
    layout: str = "contiguous",
    atol: float | None = None,
    rtol: float | None = None,
    grad_atol: float | None = None,
    seed: int = 0,
) -> None:
    """Compare `fn(**inputs)` (the backend, in `dtype`) with `ref_fn(**inputs)` in float64.

    Floating inputs are cast to `dtype` for the backend and to float64 for the reference, from the same values
    (the dtype-rounded ones, so both see identical inputs). Outputs are allocated poisoned. Integer outputs must
    match exactly. When `grad_inputs` names inputs, gradients of a random linear function of the floating outputs
    are compared too.
    """
    cast, ref_in = {}, {}
    for name, t in inputs.items():
        if isinstance(t, torch.Tensor) and t.is_floating_point():
            low = t.detach().to(dtype)
            cast[name] = relayout(low, layout).requires_grad_(name in grad_inputs)
            ref_in[name] = low.double().requires_grad_(name in grad_inputs)
        elif isinstance(t, torch.Tensor):
            cast[name] = relayout(t, layout)
            ref_in[name] = t
        else:
            cast[name] = ref_in[name] = t
    with poisoned_outputs():
        out = _flatten(fn(**cast))
    ref = _flatten(ref_fn(**ref_in))
    assert len(out) == len(ref), f"backend returned {len(out)} tensors, reference {len(ref)}"
    for k, (o, r) in enumerate(zip(out, ref)):
        assert_close(o, r, dtype, f"output {k}", atol=atol, rtol=rtol)
    if not grad_inputs:
        return
    gen = torch.Generator().manual_seed(seed)
    pairs = [(o, r) for o, r in zip(out, ref) if r.is_floating_point() and r.requires_grad]
    assert pairs, "grad_inputs given but no differentiable output"
    weights = [torch.randn(r.shape, generator=gen, dtype=torch.float64) for _, r in pairs]
    loss = sum((o.double() * w.to(o.device)).sum() for (o, _), w in zip(pairs, weights))
    ref_loss = sum((r * w.to(r.device)).sum() for (_, r), w in zip(pairs, weights))
    names = list(grad_inputs)
    grads = torch.autograd.grad(loss, [cast[n] for n in names], allow_unused=True)
    ref_grads = torch.autograd.grad(ref_loss, [ref_in[n] for n in names], allow_unused=True)
    for n, g, rg in zip(names, grads, ref_grads):
        if rg is None:
            assert g is None or not g.abs().any(), f"grad of {n}: reference has none, backend is non-zero"
            continue
        assert g is not None, f"grad of {n}: backend returned none"
        assert_close(g, rg, dtype, f"grad of {n}", grad=True, atol=grad_atol)


def check_gradcheck(fn: Callable[..., Any], inputs: Sequence[torch.Tensor], **kwargs) -> None:
    """torch.autograd.gradcheck in float64 (the inputs must already be float64 and require grad as wanted)."""
    assert torch.autograd.gradcheck(fn, tuple(inputs), eps=1e-6, atol=1e-5, rtol=1e-4, **kwargs)


def check_opcheck(op, args: Sequence[Any], kwargs: dict | None = None) -> None:
    """torch.library.opcheck: schema, fake kernel, autograd registration and AOT dispatch."""
    torch.library.opcheck(op, tuple(args), kwargs or {})


def check_compile(fn: Callable[..., Any], args: Sequence[Any], kwargs: dict | None = None, *,
                  backend: str = "aot_eager", dtype: torch.dtype = torch.float32) -> None:
    """`torch.compile(fn, fullgraph=True)` traces without a graph break and matches eager, outputs and grads."""
    kwargs = kwargs or {}
    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend=backend)
    eager_out = _flatten(fn(*args, **kwargs))
    comp_out = _flatten(compiled(*args, **kwargs))
    for k, (c, e) in enumerate(zip(comp_out, eager_out)):
        assert_close(c, e.double() if e.is_floating_point() else e, dtype, f"compiled output {k}")
    diff = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
    if diff:
        pairs = [(c, e) for c, e in zip(comp_out, eager_out) if c.requires_grad]
        g1 = torch.autograd.grad(sum(c.float().sum() for c, _ in pairs), diff)
        g2 = torch.autograd.grad(sum(e.float().sum() for _, e in pairs), diff)
        for k, (a, b) in enumerate(zip(g1, g2)):
            assert_close(a, b.double(), dtype, f"compiled grad {k}", grad=True)
