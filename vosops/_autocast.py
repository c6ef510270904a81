"""The ops under torch.autocast, as PyTorch's own ops of their kind.

Autocast casts the inputs of PyTorch's ops, not of custom ops, so inside an autocast region (mixed-precision
training) a vosops op would meet, say, bfloat16 queries from a Linear and float32 keys from a memory, and refuse
them. Each public op is therefore declared with a policy:
  "lower"  (attention and affinity, like matmul and scaled_dot_product_attention): the named float32 inputs are cast
           to the autocast dtype (float64 ones are left alone, as autocast leaves them);
  "widest" (sampling and aggregation, like grid_sample): the named floating inputs are cast to the widest dtype
           among them;
  "off"    (k-means: iterative, not a layer): nothing is cast.
The op then runs with autocast off, so that every backend, the reference's PyTorch ops included, computes in the
dtypes it was given. Outside autocast nothing changes and mismatched dtypes are still an error.
"""

from __future__ import annotations

import functools
import inspect

import torch

POLICIES = ("lower", "widest", "off")
_AUTOCAST_DEVICES = ("cpu", "cuda")


def _target_dtype(policy: str, device_type: str, tensors) -> torch.dtype | None:
    if policy == "lower":
        return torch.get_autocast_dtype(device_type)
    if policy == "widest":
        return functools.reduce(torch.promote_types, (t.dtype for t in tensors))
    return None


def autocast_policy(policy: str, *names: str):
    """Decorate a public op whose floating tensor arguments `names` follow `policy` under torch.autocast."""
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")

    def decorate(fn):
        params = list(inspect.signature(fn).parameters)
        slots = [(params.index(name), name) for name in names]

        @functools.wraps(fn)
        def op(*args, **kwargs):
            given = [(i, name, args[i] if i < len(args) else kwargs.get(name)) for i, name in slots]
            floats = [t for _, _, t in given if isinstance(t, torch.Tensor) and t.is_floating_point()]
            device_type = floats[0].device.type if floats else None
            if device_type not in _AUTOCAST_DEVICES or not torch.is_autocast_enabled(device_type):
                return fn(*args, **kwargs)
            dtype = _target_dtype(policy, device_type, floats)
            if dtype is not None:
                args = list(args)
                for i, name, t in given:
                    if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.dtype == dtype:
                        continue
                    if policy == "lower" and t.dtype == torch.float64:
                        continue
                    if i < len(args):
                        args[i] = t.to(dtype)
                    else:
                        kwargs[name] = t.to(dtype)
            with torch.autocast(device_type, enabled=False):
                return fn(*args, **kwargs)

        return op

    return decorate
