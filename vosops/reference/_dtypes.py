"""The dtype the references compute in, shared by every op's reference."""

from __future__ import annotations

import torch


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for float16/bfloat16 inputs (the kernels accumulate in float32; half precision cannot even hold the
    pixel indices past 256 or 2048), else the input's dtype. Results are returned in the input's dtype."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
