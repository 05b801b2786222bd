"""The one place where the torch device and dtype are chosen."""

from __future__ import annotations

import torch

from heedful.errors import InputError

_DTYPES = {"float64": torch.float64, "float32": torch.float32}


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``auto`` picks CUDA when a GPU is visible, else the CPU; ``cuda`` without a GPU is an error."""
    if isinstance(device, torch.device):
        return device
    name = str(device).lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise InputError("--device cuda was asked for, but torch sees no CUDA GPU on this machine")
    if name == "cpu" or name.startswith("cuda"):
        return torch.device(name)
    raise InputError(f"--device must be auto, cpu or cuda, not {device!r}")


def resolve_dtype(dtype: str | torch.dtype = "float64") -> torch.dtype:
    """float64 by default: log-likelihoods of millions of votes need the precision."""
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPES[str(dtype).lower()]
    except KeyError:
        raise InputError(f"--dtype must be one of {', '.join(_DTYPES)}, not {dtype!r}") from None
