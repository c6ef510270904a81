"""Argument checks shared by the subcommands: a bad value is a ValueError naming the option (one line, exit 2)."""

from __future__ import annotations

import argparse


def positive_int(text: str) -> int:
    """argparse type of counts such as --threads: an int >= 1."""
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an int >= 1, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected an int >= 1, got {v}")
    return v


def resolve_device(arg: str | None, local_rank: int = 0) -> str:
    """--device as a torch device string: None picks cuda when available, else cpu; a bare "cuda" means this
    rank's GPU (cuda:LOCAL_RANK). Anything torch cannot parse, or a GPU this machine lacks, is a ValueError."""
    import torch

    if arg is None:
        arg = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(arg)
    except (RuntimeError, TypeError):
        raise ValueError(f"--device must be cpu, cuda or cuda:N, got {arg!r}") from None
    if dev.type == "cpu":
        return "cpu"
    if dev.type != "cuda":
        raise ValueError(f"--device must be cpu, cuda or cuda:N, got {arg!r}")
    if not torch.cuda.is_available():
        raise ValueError(f"--device {arg} asked for, but no CUDA device is available")
    index = local_rank if dev.index is None else dev.index
    if index >= torch.cuda.device_count():
        raise ValueError(f"--device {arg}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return f"cuda:{index}"
