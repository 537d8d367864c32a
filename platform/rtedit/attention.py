"""Attention backend probing, timing, selection and runtime fallback for a diffusers transformer.

At start-up, `select_attention_backend` runs every candidate kernel on the model's real attention inputs
(captured from one forward), keeps those within bf16 tolerance of the math backend, times a full transformer
forward with each, and installs the fastest correct one. While serving, `AttentionSelector.run` wraps each
transformer call: if the active backend raises, the next correct backend (by probe time) is installed for the
rest of the process and the reason is recorded in `stats()`.

Candidates are diffusers backends by name ("native", "_native_cudnn", "_native_flash", "_native_math", ...)
plus two kernels diffusers cannot use on its own, registered here as custom diffusers backends:
- "fa3_fwd": FlashAttention 3 forward from the `fa3-fwd` 0.0.3 wheel (`fa3_fwd_interface.flash_attn_func`),
  invisible to diffusers' `_flash_3`, which looks for the official `flash_attn_3` distribution.
- "sage1": SageAttention 1.0.6, which diffusers refuses (its `sage` backend requires sageattention>=2.1.1).

diffusers' dispatcher silently drops arguments a backend does not declare, so the custom backends declare the
mask, causal, dropout and parallel arguments and raise `AttentionBackendUnsupported` for any they cannot apply.

Editor wiring (start-up, after the weights are on their device, before caching.attach_cache and compile):
    selector = select_attention_backend(transformer, sample_inputs, config=AttentionConfig())
    # sample_inputs: the transformer kwargs of one real denoise step at the largest configured bucket
per request, around the whole denoise stage (so a retry starts the request over: DBCache refresh, scheduler
timesteps and the noise are all re-made inside it; retrying a single step would misalign cache-dit's step count):
    latents = selector.run(self._denoise, latents, prompt, steps, ...)   # _denoise calls dbcache.refresh(steps)
and `editor.stats()["attention"] = selector.stats()`. After a fallback, compiled blocks see a new backend and
recompile once per bucket shape (counted in rtedit.compile's stats).

Custom kernels come from third-party wheels; install them with pinned hashes (pip --require-hashes):
fa3-fwd 0.0.3 (fa3_fwd-0.0.3-cp39-abi3-manylinux_2_24_x86_64.whl)
    sha256 44d26c6cfc69dde5a0f9c6bebbccbb96ed20e97bc8b9ddda638b0bf62e91b93d
sageattention 1.0.6 (sageattention-1.0.6-py3-none-any.whl)
    sha256 fafc66569bed62a16839e820c2612141b5a20accf55b876d941bab9c0ac5d888
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import logging
import math
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from rtedit.errors import ConfigError, EditError

logger = logging.getLogger(__name__)

DEFAULT_CANDIDATES = ("native", "_native_cudnn", "_native_flash", "fa3_fwd", "sage1", "_native_math")
REFERENCE = "_native_math"

# diffusers backends that only exist as CUDA kernels for half precision; on other devices they are unavailable.
_CUDA_HALF_ONLY = {"_native_cudnn", "_native_flash", "_native_efficient", "flash", "flash_varlen", "_flash_3",
                   "_flash_varlen_3", "sage", "sage_varlen", "xformers"}


class AttentionBackendUnsupported(RuntimeError):
    """A custom backend was asked for something its kernel cannot do (a mask, dropout, context parallelism...)."""


@dataclass
class AttentionConfig:
    """How the start-up probe picks an attention backend."""

    candidates: tuple[str, ...] = DEFAULT_CANDIDATES  # probe order; names from DEFAULT_CANDIDATES or diffusers
    tolerance: float = 2e-2  # max relative L2 error of a kernel against the float32 math backend
    warmup: int = 2  # untimed transformer forwards per candidate (cuDNN plans, Triton JIT)
    repeats: int = 5  # timed forwards per candidate; the median is kept
    require_mask: bool = False  # True once a path passes attention masks: mask-less kernels become ineligible

    def validate(self) -> "AttentionConfig":
        if isinstance(self.candidates, str) or not isinstance(self.candidates, (tuple, list)) or not self.candidates:
            raise ConfigError(f"attention.candidates must be a non-empty list of names, got {self.candidates!r}")
        for name in self.candidates:
            if not isinstance(name, str) or (name not in _KNOWN and name not in _diffusers_names()):
                raise ConfigError(f"attention.candidates: unknown backend {name!r}; known: "
                                  f"{', '.join(sorted(set(_CUSTOM_NAMES) | _diffusers_names()))}")
        if len(set(self.candidates)) != len(self.candidates):
            raise ConfigError(f"attention.candidates has duplicates: {self.candidates!r}")
        if (isinstance(self.tolerance, bool) or not isinstance(self.tolerance, (int, float))
                or not math.isfinite(self.tolerance) or not 0 < self.tolerance <= 1):
            raise ConfigError(f"attention.tolerance must be in (0, 1], got {self.tolerance!r}")
        for name in ("warmup", "repeats"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < (1 if name == "repeats" else 0):
                low = 1 if name == "repeats" else 0
                raise ConfigError(f"attention.{name} must be an integer >= {low}, got {value!r}")
        if not isinstance(self.require_mask, bool):
            raise ConfigError(f"attention.require_mask must be a bool, got {self.require_mask!r}")
        return self


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


def fa3_fwd_attention(
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
    """FlashAttention 3 forward (fa3-fwd wheel). BSHD in and out; GQA is native (fewer KV heads)."""
    _refuse_unsupported("fa3_fwd", query, key, attn_mask, dropout_p, is_causal, return_lse, _parallel_config)
    from fa3_fwd_interface import flash_attn_func

    out = flash_attn_func(query, key, value, softmax_scale=scale, causal=is_causal)
    # Official FA3 releases differ on whether the lse is returned too; keep only the output.
    return out[0] if isinstance(out, tuple) else out


def sage1_attention(
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
    """SageAttention 1.0.6 (Triton, INT8 QK, FP16 PV). BSHD in and out."""
    _refuse_unsupported("sage1", query, key, attn_mask, dropout_p, is_causal, return_lse, _parallel_config)
    from sageattention import sageattn

    # sageattn smooths K in place (k -= mean); the caller's key may be kept (e.g. a KV cache), so hand it a copy.
    out = sageattn(query, key.clone(), value, tensor_layout="NHD", is_causal=is_causal, sm_scale=scale)
    return out.to(query.dtype)


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
_CUSTOM_NAMES = ("fa3_fwd", "sage1")
_KNOWN = set(DEFAULT_CANDIDATES) | set(_CUSTOM_NAMES)  # checkable without importing diffusers (seconds)


def _dispatch():
    """diffusers' attention dispatcher, imported on first use: rtedit.config imports this module."""
    import diffusers.models.attention_dispatch as dispatch

    return dispatch


def _diffusers_names() -> set[str]:
    return {member.value for member in _dispatch().AttentionBackendName}


def _custom(name: str) -> AttentionCandidate:
    slots = _dispatch().AttentionBackendName
    if name == "fa3_fwd":
        return AttentionCandidate("fa3_fwd", slots._FLASH_3, fa3_fwd_attention, _fa3_unavailable, False)
    return AttentionCandidate("sage1", slots.SAGE, sage1_attention, _sage1_unavailable, False)


def candidate(name: str) -> AttentionCandidate:
    """The candidate for a backend name: one of ours, or a diffusers backend as diffusers ships it."""
    if name in _CUSTOM_NAMES:
        return _custom(name)
    if name not in _diffusers_names():
        raise ConfigError(f"unknown attention backend {name!r}")
    masked = name in {"native", "_native_math", "_native_efficient", "_native_cudnn", "flex", "xformers"}
    return AttentionCandidate(name, _dispatch().AttentionBackendName(name), None, None, masked)


def _diffusers_unavailable(cand: AttentionCandidate, device: torch.device, dtype: torch.dtype) -> str | None:
    try:
        _dispatch()._check_attention_backend_requirements(cand.key)
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
    registry = _dispatch()._AttentionBackendRegistry
    if registry._backends.get(cand.key) is cand.fn:
        return
    registry.register(cand.key)(cand.fn)
    logger.info("registered %s as diffusers attention backend slot %r", cand.name, cand.key.value)


def install_backend(transformer: torch.nn.Module, cand: AttentionCandidate) -> None:
    """Points every attention processor of `transformer` at the candidate's registry slot."""
    if cand.fn is None:
        registry = _dispatch()._AttentionBackendRegistry
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


# ---------------------------------------------------------------------------------------------------------------
# Probe


@dataclass
class ProbeRow:
    """One line of the probe table."""

    name: str
    available: bool
    error: str | None = None  # why it is unavailable, raised, or was rejected
    rel_err: float | None = None  # kernel relative L2 error against float32 math on the captured inputs
    model_rel_err: float | None = None  # transformer output against the math backend (information only)
    ms: float | None = None  # median transformer forward time with this backend
    chosen: bool = False

    @property
    def correct(self) -> bool:
        return self.available and self.error is None and self.ms is not None


def _capture_attention_inputs(transformer, sample_inputs, limit: int = 4) -> list[dict[str, Any]]:
    """Runs one forward on the math backend, recording the distinct attention calls it makes."""
    registry = _dispatch()._AttentionBackendRegistry
    slot = _dispatch().AttentionBackendName._NATIVE_MATH
    original = registry._backends[slot]
    captured: list[dict[str, Any]] = []
    seen: set[tuple] = set()

    @functools.wraps(original)
    def recorder(*args, **kwargs):
        shape = tuple(tuple(kwargs[k].shape) for k in ("query", "key", "value")) + (kwargs.get("attn_mask") is None,)
        if shape not in seen and len(captured) < limit:
            seen.add(shape)
            captured.append({k: (v.detach().clone() if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()})
        return original(*args, **kwargs)

    install_backend(transformer, candidate("_native_math"))
    registry._backends[slot] = recorder
    try:
        with torch.no_grad():
            transformer(**sample_inputs)
    finally:
        registry._backends[slot] = original
    if not captured:
        raise ConfigError(f"{type(transformer).__name__} made no dispatched attention call; nothing to probe")
    return captured


def _kernel_rel_err(cand: AttentionCandidate, calls: list[dict[str, Any]]) -> float:
    dispatch_attention_fn, math_slot = _dispatch().dispatch_attention_fn, _dispatch().AttentionBackendName._NATIVE_MATH
    worst = 0.0
    for call in calls:
        inputs = {k: v for k, v in call.items() if k not in ("query", "key", "value", "_parallel_config")}
        q, k, v = call["query"], call["key"], call["value"]
        with torch.no_grad():
            ref = dispatch_attention_fn(q.float(), k.float(), v.float(), backend=math_slot,
                                        **{n: inputs[n] for n in ("attn_mask", "is_causal", "scale") if n in inputs})
            out = dispatch_attention_fn(q.clone(), k.clone(), v.clone(), backend=cand.key,
                                        **{n: inputs[n] for n in ("attn_mask", "is_causal", "scale") if n in inputs})
        if out.shape != ref.shape:
            raise AttentionBackendUnsupported(f"output shape {tuple(out.shape)} != reference {tuple(ref.shape)}")
        err = ((out.float() - ref).norm() / ref.norm().clamp_min(1e-30)).item()
        worst = max(worst, err if math.isfinite(err) else math.inf)
    return worst


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_forward(transformer, sample_inputs, warmup: int, repeats: int, device: torch.device):
    times = []
    with torch.no_grad():
        for i in range(warmup + repeats):
            _sync(device)
            start = time.perf_counter()
            out = transformer(**sample_inputs)
            _sync(device)
            if i >= warmup:
                times.append((time.perf_counter() - start) * 1e3)
    out = out[0] if isinstance(out, tuple) else getattr(out, "sample", out)
    return statistics.median(times), out


def _model_device_dtype(transformer) -> tuple[torch.device, torch.dtype]:
    param = next(transformer.parameters())
    return param.device, param.dtype


class AttentionSelector:
    """The probe result for one transformer, the active backend, and the serving-time fallback."""

    def __init__(self, transformer: torch.nn.Module, config: AttentionConfig, rows: list[ProbeRow],
                 candidates: Mapping[str, AttentionCandidate]):
        self.transformer = transformer
        self.config = config
        self.table = rows
        self._candidates = dict(candidates)
        ranked = sorted((r for r in rows if r.correct), key=lambda r: r.ms)
        self.order = [r.name for r in ranked]  # fastest first: the fallback sequence
        if not self.order:
            details = "; ".join(f"{r.name}: {r.error}" for r in rows)
            raise ConfigError(f"no attention backend passed the probe ({details})")
        self.chosen = self.order[0]
        self.active = self.chosen
        for row in rows:
            row.chosen = row.name == self.chosen
        self.fallbacks: list[dict[str, Any]] = []
        install_backend(transformer, self._candidates[self.active])
        logger.info("attention backend %s chosen; probe: %s", self.chosen, self.table_text())

    def run(self, fn: Callable[..., Any], *args, **kwargs) -> Any:
        """Calls fn (a transformer forward); if it raises, installs the next correct backend and calls it again.

        The switch is kept for the rest of the process only when the retry succeeds; when every remaining backend
        fails as well, the original backend is restored and the first error re-raised (it was not the kernel).
        EditError subclasses are deliberate request errors and pass through untouched.
        """
        try:
            return fn(*args, **kwargs)
        except EditError:
            raise
        except Exception as first:
            failed = self.active
            for name in self.order[self.order.index(failed) + 1:]:
                install_backend(self.transformer, self._candidates[name])
                try:
                    result = fn(*args, **kwargs)
                except EditError:
                    install_backend(self.transformer, self._candidates[failed])
                    raise
                except Exception:
                    continue
                reason = f"{type(first).__name__}: {first}"
                self.fallbacks.append({"from": failed, "to": name, "reason": reason, "time": time.time()})
                self.active = name
                logger.error("attention backend %s failed while serving (%s); using %s from now on",
                             failed, reason, name)
                return result
            install_backend(self.transformer, self._candidates[failed])
            raise

    def stats(self) -> dict[str, Any]:
        return {
            "chosen": self.chosen,
            "active": self.active,
            "order": list(self.order),
            "probe": [dataclasses.asdict(r) for r in self.table],
            "fallbacks": [dict(f) for f in self.fallbacks],
        }

    def table_text(self) -> str:
        parts = []
        for r in self.table:
            state = "chosen" if r.chosen else ("ok" if r.correct else (r.error or "unavailable"))
            ms = f"{r.ms:.3f} ms" if r.ms is not None else "-"
            err = f"{r.rel_err:.1e}" if r.rel_err is not None else "-"
            parts.append(f"{r.name}[{ms}, rel_err {err}, {state}]")
        return " ".join(parts)


def select_attention_backend(
    transformer: torch.nn.Module,
    sample_inputs: Mapping[str, Any],
    candidates: Sequence[str | AttentionCandidate] | None = None,
    config: AttentionConfig | None = None,
) -> AttentionSelector:
    """Probes each candidate on the model's real shapes and installs the fastest one within tolerance.

    sample_inputs are transformer(**sample_inputs) kwargs of one real step at the serving shape (the largest
    bucket; attention cost grows fastest with length). Returns the selector; its `.table` is the probe table
    (name, available, error, rel_err, model_rel_err, ms, chosen). Run it before cache-dit or torch.compile are
    attached: the probe calls the transformer many times and switches its attention processors.
    """
    config = (config or AttentionConfig()).validate()
    names = candidates if candidates is not None else config.candidates  # explicit candidates override the config
    cands = [c if isinstance(c, AttentionCandidate) else candidate(c) for c in names]
    if REFERENCE not in {c.name for c in cands}:
        cands.append(candidate(REFERENCE))  # the reference is always probed, and serves as the last fallback
    device, dtype = _model_device_dtype(transformer)
    calls = _capture_attention_inputs(transformer, sample_inputs)
    needs_mask = config.require_mask or any(c.get("attn_mask") is not None for c in calls)

    install_backend(transformer, candidate(REFERENCE))
    _, reference_out = _time_forward(transformer, sample_inputs, 0, 1, device)
    rows = []
    for cand in cands:
        reason = cand.unavailable(device, dtype) if cand.unavailable else (
            None if cand.fn is not None else _diffusers_unavailable(cand, device, dtype))
        if reason is None and needs_mask and not cand.supports_mask:
            reason = "cannot apply attention masks, which this model's calls (or the config) require"
        if reason is not None:
            rows.append(ProbeRow(cand.name, available=False, error=reason))
            continue
        row = ProbeRow(cand.name, available=True)
        rows.append(row)
        try:
            register_backend(cand)
            row.rel_err = _kernel_rel_err(cand, calls)
            if not row.rel_err <= config.tolerance:
                row.error = f"relative error {row.rel_err:.3g} > tolerance {config.tolerance}"
                continue
            install_backend(transformer, cand)
            ms, out = _time_forward(transformer, sample_inputs, config.warmup, config.repeats, device)
            if not torch.isfinite(out).all():
                row.error = "transformer output has non-finite values"
                continue
            row.model_rel_err = ((out.float() - reference_out.float()).norm()
                                 / reference_out.float().norm().clamp_min(1e-30)).item()
            row.ms = ms
        except Exception as exc:  # a probe failure only disqualifies this candidate
            row.error = f"{type(exc).__name__}: {exc}"
            logger.warning("attention candidate %s failed its probe: %s", cand.name, row.error)
    return AttentionSelector(transformer, config, rows, {c.name: c for c in cands})
