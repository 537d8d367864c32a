"""Attention kernels as diffusers backends: the candidates the probe chooses among, and how one is installed.

Candidates are diffusers backends by name ("native", "_native_cudnn", "_native_flash", "_native_math", ...)
plus two kernels diffusers cannot use on its own, registered here as custom diffusers backends:
- "fa3_fwd": FlashAttention 3 forward from the `fa3-fwd` 0.0.3 wheel (`fa3_fwd_interface.flash_attn_func`),
  invisible to diffusers' `_flash_3`, which looks for the official `flash_attn_3` distribution.
- "sage1": SageAttention 1.0.6, which diffusers refuses (its `sage` backend requires sageattention>=2.1.1).

diffusers' dispatcher silently drops arguments a backend does not declare, so the custom backends declare the
mask, causal, dropout and parallel arguments and raise `AttentionBackendUnsupported` for any they cannot apply.

Custom kernels come from third-party wheels; install them with pinned hashes (pip --require-hashes):
fa3-fwd 0.0.3 (fa3_fwd-0.0.3-cp39-abi3-manylinux_2_24_x86_64.whl)
    sha256 44d26c6cfc69dde5a0f9c6bebbccbb96ed20e97bc8b9ddda638b0bf62e91b93d
sageattention 1.0.6 (sageattention-1.0.6-py3-none-any.whl)
    sha256 fafc66569bed62a16839e820c2612141b5a20accf55b876d941bab9c0ac5d888
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from rtedit.errors import ConfigError

logger = logging.getLogger(__name__)

DEFAULT_CANDIDATES = ("native", "_native_cudnn", "_native_flash", "fa3_fwd", "sage1", "_native_math")
REFERENCE = "_native_math"

# diffusers backends that only exist as CUDA kernels for half precision; on other devices they are unavailable.
_CUDA_HALF_ONLY = {"_native_cudnn", "_native_flash", "_native_efficient", "flash", "flash_varlen", "_flash_3",
                   "_flash_varlen_3", "sage", "sage_varlen", "xformers"}


class AttentionBackendUnsupported(RuntimeError):
    """A custom backend was asked for something its kernel cannot do (a mask, dropout, context parallelism...)."""


# ---------------------------------------------------------------------------------------------------------------
# Custom backends. Inputs arrive in diffusers' layout [batch, seq, heads, head_dim] (BSHD).


def _refuse_unsupported(name: str, query, key, attn_mask, dropout_p, is_causal, return_lse, _parallel_config) -> None:
    if attn_mask is not None:
        raise AttentionBackendUnsupported(f"{name} cannot apply an attention mask; it must never be dropped silently")
    if dropout_p:
        raise AttentionBackendUnsupported(f"{name} has no dropout, got dropout_p={dropout_p}")
    if is_causal and query.shape[1] != key.shape[1]:
        # These kernels align the causal mask bottom-right, SDPA top-left: results differ when lengths differ.
        raise AttentionBackendUnsupported(f"{name}: is_causal with query length {query.shape[1]} != key length "
                                          f"{key.shape[1]} would not match SDPA's causal alignment")
    if return_lse:
        raise AttentionBackendUnsupported(f"{name} does not return the log-sum-exp (only context parallelism needs it)")
    if _parallel_config is not None:
        raise AttentionBackendUnsupported(f"{name} does not support context parallelism")


def _mask_free_backend(name: str, kernel: Callable[..., torch.Tensor], doc: str) -> Callable[..., torch.Tensor]:
    """A diffusers backend around a kernel that takes no mask: the full argument list is declared (the dispatcher
    drops undeclared ones silently) and whatever the kernel cannot apply is refused."""

    def backend(
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        dropout_p: float = 0.0,
        is_causal: bool = False,
        scale: float | None = None,
        enable_gqa: bool = False,
        return_lse: bool = False,
        _parallel_config: Any = None,
    ) -> torch.Tensor:
        _refuse_unsupported(name, query, key, attn_mask, dropout_p, is_causal, return_lse, _parallel_config)
        return kernel(query, key, value, scale=scale, is_causal=is_causal)

    backend.__name__ = backend.__qualname__ = f"{name}_attention"
    backend.__doc__ = doc
    return backend


def _fa3_fwd_kernel(query, key, value, scale, is_causal):
    from fa3_fwd_interface import flash_attn_func

    out = flash_attn_func(query, key, value, softmax_scale=scale, causal=is_causal)
    # Official FA3 releases differ on whether the lse is returned too; keep only the output.
    return out[0] if isinstance(out, tuple) else out


def _sage1_kernel(query, key, value, scale, is_causal):
    from sageattention import sageattn

    # sageattn smooths K in place (k -= mean); the caller's key may be kept (e.g. a KV cache), so hand it a copy.
    out = sageattn(query, key.clone(), value, tensor_layout="NHD", is_causal=is_causal, sm_scale=scale)
    return out.to(query.dtype)


fa3_fwd_attention = _mask_free_backend(
    "fa3_fwd", _fa3_fwd_kernel, "FlashAttention 3 forward (fa3-fwd wheel). BSHD in and out; GQA is native.")
sage1_attention = _mask_free_backend(
    "sage1", _sage1_kernel, "SageAttention 1.0.6 (Triton, INT8 QK, FP16 PV). BSHD in and out.")


def _fa3_unavailable(device: torch.device, dtype: torch.dtype) -> str | None:
    import diffusers.models.attention_dispatch as dispatch

    if getattr(dispatch, "_CAN_USE_FLASH_ATTN_3", False):
        return "the official flash_attn_3 is installed and owns diffusers' '_flash_3' slot: use '_flash_3'"
    if device.type != "cuda":
        return f"needs a CUDA device (Hopper), got {device.type}"
    major, minor = torch.cuda.get_device_capability(device)
    if major != 9:
        return f"the fa3-fwd wheel is built for sm_90a only, got sm_{major}{minor}"
    if dtype != torch.bfloat16:
        return f"the fa3-fwd wheel is built for bfloat16 only (FP16 disabled), got {dtype}"
    return _import_error("fa3_fwd_interface")


def _sage1_unavailable(device: torch.device, dtype: torch.dtype) -> str | None:
    import diffusers.models.attention_dispatch as dispatch

    if getattr(dispatch, "_CAN_USE_SAGE_ATTN", False):
        return "sageattention>=2.1.1 is installed and owns diffusers' 'sage' slot: use 'sage'"
    if device.type != "cuda":
        return f"needs a CUDA device (Triton kernels), got {device.type}"
    if dtype not in (torch.bfloat16, torch.float16):
        return f"needs bfloat16 or float16 inputs, got {dtype}"
    return _import_error("sageattention")


def _import_error(module: str) -> str | None:
    try:
        importlib.import_module(module)
    except Exception as exc:  # a CUDA wheel on the wrong host fails with OSError as well as ImportError
        return f"import {module} failed: {type(exc).__name__}: {exc}"
    return None


@dataclass(frozen=True)
class AttentionCandidate:
    """One probe candidate: a diffusers registry slot, and optionally our own function to register there."""

    name: str
    key: Any  # diffusers AttentionBackendName: the slot in diffusers' registry the processors are pointed at
    fn: Callable[..., torch.Tensor] | None = None  # custom implementation registered under `key`; None = diffusers'
    unavailable: Callable[[torch.device, torch.dtype], str | None] | None = None  # returns a reason, or None
    supports_mask: bool = True


# Custom kernels take the diffusers slot of their own family: dispatch only accepts AttentionBackendName members,
# and the enum cannot be extended. Each slot's check above refuses when diffusers' own kernel is installed there.
CUSTOM_NAMES = ("fa3_fwd", "sage1")
KNOWN_NAMES = set(DEFAULT_CANDIDATES) | set(CUSTOM_NAMES)  # checkable without importing diffusers (seconds)


def dispatch_module():
    """diffusers' attention dispatcher, imported on first use: rtedit.config imports this module."""
    import diffusers.models.attention_dispatch as dispatch

    return dispatch


def diffusers_backend_names() -> set[str]:
    return {member.value for member in dispatch_module().AttentionBackendName}


def _custom(name: str) -> AttentionCandidate:
    slots = dispatch_module().AttentionBackendName
    if name == "fa3_fwd":
        return AttentionCandidate("fa3_fwd", slots._FLASH_3, fa3_fwd_attention, _fa3_unavailable, False)
    return AttentionCandidate("sage1", slots.SAGE, sage1_attention, _sage1_unavailable, False)


def candidate(name: str) -> AttentionCandidate:
    """The candidate for a backend name: one of ours, or a diffusers backend as diffusers ships it."""
    if name in CUSTOM_NAMES:
        return _custom(name)
    if name not in diffusers_backend_names():
        raise ConfigError(f"unknown attention backend {name!r}")
    masked = name in {"native", "_native_math", "_native_efficient", "_native_cudnn", "flex", "xformers"}
    return AttentionCandidate(name, dispatch_module().AttentionBackendName(name), None, None, masked)


def unavailable_reason(cand: AttentionCandidate, device: torch.device, dtype: torch.dtype) -> str | None:
    try:
        dispatch_module()._check_attention_backend_requirements(cand.key)
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    if cand.name in _CUDA_HALF_ONLY:
        if device.type != "cuda":
            return f"a CUDA kernel, the device is {device.type}"
        if dtype not in (torch.bfloat16, torch.float16):
            return f"needs bfloat16 or float16, the model runs in {dtype}"
    if cand.name.endswith("_hub"):
        return "downloads its kernel from the Hugging Face Hub, which serving never does"
    return None


def register_backend(cand: AttentionCandidate) -> None:
    """Registers a custom candidate's function in diffusers' registry under its slot (process-wide)."""
    if cand.fn is None:
        return
    registry = dispatch_module()._AttentionBackendRegistry
    if registry._backends.get(cand.key) is cand.fn:
        return
    registry.register(cand.key)(cand.fn)
    logger.info("registered %s as diffusers attention backend slot %r", cand.name, cand.key.value)


def install_backend(transformer: torch.nn.Module, cand: AttentionCandidate) -> None:
    """Points every attention processor of `transformer` at the candidate's registry slot."""
    if cand.fn is None:
        registry = dispatch_module()._AttentionBackendRegistry
        active = registry._active_backend
        transformer.set_attention_backend(cand.key.value)  # checks diffusers' requirements, then sets processors
        # It also changes the process-wide default (used by other models' processors without a backend); the
        # choice belongs to this model alone, so put the default back.
        registry.set_active_backend(active)
        return
    register_backend(cand)
    # set_attention_backend would refuse our slot (it checks for diffusers' own package); set processors directly.
    count = 0
    for module in transformer.modules():
        processor = getattr(module, "processor", None)
        if processor is not None and hasattr(processor, "_attention_backend"):
            processor._attention_backend = cand.key
            count += 1
    if count == 0:
        raise ConfigError(f"{type(transformer).__name__} has no attention processor that takes a backend")
