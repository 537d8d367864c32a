"""Where a model runs and in what precision: one dtype table for the engine, the configs and the jobs."""

from __future__ import annotations

import torch

from rtedit.errors import ConfigError, ModelLoadError

# Config names -> torch dtypes; job precisions ("bf16", "fp32") are spelt as DeepSpeed spells them.
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
PRECISIONS: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16}


def resolve_device(device: str | torch.device | None, prefer_gpu: bool) -> torch.device:
    """The device to build on: the given one (checked), else cuda when preferred and present, else cpu."""
    if device is None:
        return torch.device("cuda" if prefer_gpu and torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ModelLoadError(f"invalid device {device!r}: {exc}") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"device {device!r} asked for, but this machine has no CUDA GPU")
    return resolved


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """The weights' dtype: the given one, else bfloat16 on a GPU and float32 elsewhere."""
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ModelLoadError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


def dtype_named(name: str) -> torch.dtype:
    """A dtype from a config name ("bfloat16") or a job precision ("bf16")."""
    if name in DTYPES:
        return DTYPES[name]
    if name in PRECISIONS:
        return PRECISIONS[name]
    raise ConfigError(f"unknown dtype {name!r}; known: {sorted(DTYPES) + sorted(PRECISIONS)}")


def is_device_failure(exc: BaseException) -> bool:
    """A CUDA error after which the device's state is lost (an illegal access, a device-side assert)."""
    accelerator_error = getattr(torch, "AcceleratorError", None)
    if accelerator_error is not None and isinstance(exc, accelerator_error):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("CUDA error" in text or "device-side assert" in text)
