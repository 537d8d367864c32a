"""Attention backend probing, timing, selection and runtime fallback for a diffusers transformer.

At start-up, `select_attention_backend` runs every candidate kernel (rtedit.accel.attention_backends) on the
model's real attention inputs (captured from one forward), keeps those within bf16 tolerance of the math backend,
times a full transformer forward with each, and installs the fastest correct one. While serving,
`AttentionSelector.run` wraps the whole denoise stage: if the active backend raises, the next correct backend (by
probe time) is installed for the rest of the process and the reason is recorded in `stats()`. A retry starts the
stage over (DBCache refreshed, the noise re-made), since retrying one step would misalign cache-dit's step count.
The Editor runs the probe before DBCache and compile are attached (rtedit.fast_path.build); after a
fallback, compiled blocks see a new backend and recompile once per bucket shape (counted in the compile stats).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from rtedit.accel.attention_backends import (
    CUSTOM_NAMES,
    KNOWN_NAMES,
    DEFAULT_CANDIDATES,
    REFERENCE,
    AttentionBackendUnsupported,
    AttentionCandidate,
    diffusers_backend_names,
    unavailable_reason,
    dispatch_module,
    candidate,
    install_backend,
    register_backend,
)
from rtedit.errors import ConfigError, EditError

logger = logging.getLogger(__name__)


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
            if not isinstance(name, str) or (name not in KNOWN_NAMES and name not in diffusers_backend_names()):
                raise ConfigError(f"attention.candidates: unknown backend {name!r}; known: "
                                  f"{', '.join(sorted(set(CUSTOM_NAMES) | diffusers_backend_names()))}")
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
    registry = dispatch_module()._AttentionBackendRegistry
    slot = dispatch_module().AttentionBackendName._NATIVE_MATH
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
    dispatch_attention_fn, math_slot = dispatch_module().dispatch_attention_fn, dispatch_module().AttentionBackendName._NATIVE_MATH
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
            None if cand.fn is not None else unavailable_reason(cand, device, dtype))
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
