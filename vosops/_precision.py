"""The precision of the float32 matrix products inside the Triton kernels: PyTorch's TF32 switch, read as
FlexAttention reads it.

By default every float32 product is exact (`tl.dot(..., input_precision="ieee")`, FMA units). A user who allowed
TF32 for float32 matmuls, with `torch.backends.cuda.matmul.fp32_precision = "tf32"` or the older
`torch.set_float32_matmul_precision("high")` / `torch.backends.cuda.matmul.allow_tf32 = True`, gets TF32 tensor-core
products in the Triton kernels too (10-bit mantissas, fp32 accumulation; several times the FMA rate on Ampere and
Hopper), as torch.matmul, torch.compile's Triton templates and FlexAttention then do. Top-k selections may then
differ from the exact ones where two logits lie within TF32's rounding of each other.

The CUDA C++ kernels compute with FMA and ignore the switch; so do float16/bfloat16 inputs (already on tensor cores).
"""

from __future__ import annotations

import contextlib

import torch


def _matmul_precision_setting() -> str:
    """'tf32', 'ieee' or 'none' (unset) from the new API, or 'tf32'/'ieee' from the legacy one."""
    matmul = torch.backends.cuda.matmul
    setting = getattr(matmul, "fp32_precision", None)
    if setting is None:  # PyTorch before 2.9: only the legacy API exists
        return "tf32" if torch.get_float32_matmul_precision() != "highest" else "ieee"
    if setting == "none":
        # unset for matmuls: the generic setting, then the legacy getter, as FlexAttention falls back to it
        generic = getattr(torch.backends, "fp32_precision", "none")
        if generic != "none":
            return generic
        return "tf32" if torch.get_float32_matmul_precision() != "highest" else "ieee"
    return setting


# torch.compile cannot trace PyTorch's precision getters (C functions): under it the switch is read once, when the
# graph is compiled, and the compiled graph keeps that precision, as Inductor's own Triton templates do.
@torch.compiler.assume_constant_result
def fp32_dot_precision() -> str:
    """`input_precision` for the float32 `tl.dot`s of a call: "tf32" when PyTorch allows TF32 for float32 matmuls,
    else "ieee". Read once per op call (and handed to its backward), never inside a kernel."""
    if torch.version.hip:  # as FlexAttention: not every ROCm GPU has TF32 (xf32) products
        return "ieee"
    try:
        setting = _matmul_precision_setting()
    except RuntimeError:
        # PyTorch refuses to answer its legacy getter after the old and new APIs were mixed; exact is the safe side
        return "ieee"
    return "tf32" if setting == "tf32" else "ieee"


def check_precision(precision: str) -> None:
    """The precision argument of the Triton ops, which a direct call may pass wrong."""
    if precision not in ("ieee", "tf32"):
        raise ValueError(f"precision: expected 'ieee' or 'tf32', got {precision!r}")


def _switch() -> tuple[str, object, object]:
    """(attribute of torch.backends.cuda.matmul, its TF32 value, its exact value): the new API where it exists
    (PyTorch >= 2.9), since reading the legacy `allow_tf32` raises once a user has set the new one."""
    if hasattr(torch.backends.cuda.matmul, "fp32_precision"):
        return "fp32_precision", "tf32", "ieee"
    return "allow_tf32", True, False


def allow_tf32() -> None:
    """Sets PyTorch's TF32 switch for float32 matmuls (`vosops bench --tf32`)."""
    attr, tf32, _ = _switch()
    setattr(torch.backends.cuda.matmul, attr, tf32)


@contextlib.contextmanager
def tf32_matmuls(allowed: bool):
    """PyTorch's TF32 switch set to `allowed` inside, the caller's setting restored after."""
    attr, tf32, exact = _switch()
    saved = getattr(torch.backends.cuda.matmul, attr)
    setattr(torch.backends.cuda.matmul, attr, tf32 if allowed else exact)
    try:
        yield
    finally:
        setattr(torch.backends.cuda.matmul, attr, saved)
