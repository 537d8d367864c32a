"""cache-dit DBCache on a FLUX.2 transformer alone, refreshed before every request so no state crosses requests.

cache-dit (1.5.3) does the caching: `enable_cache(transformer, cache_config=DBCacheConfig(...))` gives each block
group (FLUX.2: 5 double-stream and 20 single-stream blocks in klein 4B) its own cache context. On a step the mask
allows, each group computes its first Fn blocks, compares their residual with the previous step's, and if they are
close enough (dynamic policy) reuses the cached residual of the middle blocks, then computes the last Bn blocks.

At 2 steps the mask is [1, 0]: step 1 always computes, step 2 may be cached. Two policies:
- "dynamic" (serving default): step 2 is cached only when the relative L1 change of the Fn residual is below
  `residual_diff_threshold`. With random weights that change is about 1.0, so nothing is cached.
- "static": every 0-step of the mask is cached with no check. Timing only: it is labelled as such in stats and logs.

In transformer-only mode the context persists across calls; cache-dit's own step counter would drift across
requests and serve one request's residuals to the next, so `refresh(num_steps)` must run before every request.

TaylorSeer extrapolates cached residuals from the last two computed steps. With mask [1, 0] there is one computed
step, so it returns the step-1 residual itself (bit-identical to plain DBCache) and only adds copies; it is
refused unless the mask has two computed steps before a cached one.

The Editor attaches it after attention selection and before compile, refreshes it before the first transformer
call of every request, and reports `stats()` between requests (rtedit.editor.Editor).

With CUDA graphs the denoise stage is captured once and replayed, so cache-dit's Python does not run per request:
the dynamic check is decided on the device (rtedit.accel.dbcache_graphs), a capture is not counted as a request,
and each replay is counted with the plan its capture left (`count_replayed_request`) plus what the device decided.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import torch

from rtedit.accel.cuda_graphs import capturing
from rtedit.errors import ConfigError

logger = logging.getLogger(__name__)

POLICIES = ("dynamic", "static")
STATIC_LABEL = "static: caches every masked step without checking the residual (timing only, never a serving default)"


@dataclass
class CachingConfig:
    """DBCache settings for the transformer's block groups."""

    enabled: bool = True
    compute_mask: tuple[int, ...] = (1, 0)  # per step: 1 computes every block, 0 may reuse; its length = steps served
    Fn: int = 1  # first blocks of each group always computed (their residual decides); < the smallest group
    Bn: int = 0  # last blocks of each group always computed
    residual_diff_threshold: float = 0.5  # dynamic policy: cache when the Fn residual changed less (cache-dit#767)
    policy: str = "dynamic"  # "dynamic" (serving) or "static" (timing only, labelled)
    taylorseer_order: int = 0  # 0 = off; needs two computed steps before a cached one to change anything

    def validate(self) -> "CachingConfig":
        if not isinstance(self.enabled, bool):
            raise ConfigError(f"dbcache.enabled must be a bool, got {self.enabled!r}")
        mask = self.compute_mask
        if (isinstance(mask, str) or not isinstance(mask, (tuple, list)) or not mask
                or any(isinstance(v, bool) or v not in (0, 1) for v in mask)):
            raise ConfigError(f"dbcache.compute_mask must be a non-empty list of 0/1 per step, got {mask!r}")
        if mask[0] != 1:
            raise ConfigError(f"dbcache.compute_mask must compute the first step (nothing to reuse yet), got {mask!r}")
        for name in ("Fn", "Bn", "taylorseer_order"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < (1 if name == "Fn" else 0):
                raise ConfigError(f"dbcache.{name} must be an integer >= {1 if name == 'Fn' else 0}, got {value!r}")
        threshold = self.residual_diff_threshold
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not math.isfinite(threshold) \
                or threshold <= 0:
            raise ConfigError(f"dbcache.residual_diff_threshold must be a finite number > 0, got {threshold!r}")
        if self.policy not in POLICIES:
            raise ConfigError(f"dbcache.policy must be one of {POLICIES}, got {self.policy!r}")
        if self.taylorseer_order and not _has_two_anchors(mask):
            raise ConfigError(
                f"dbcache.taylorseer_order={self.taylorseer_order} changes nothing with compute_mask {tuple(mask)}: "
                "TaylorSeer needs two computed steps before a cached one (with one it returns the cached residual "
                "unchanged, bit-identical to plain DBCache); set it to 0")
        return self

    def check_blocks(self, groups: dict[str, int]) -> None:
        """Fn and Bn against the transformer's block groups; cache-dit would only assert at the first forward."""
        if not groups:
            raise ConfigError("dbcache: the transformer has no repeated block groups to cache")
        name, size = min(groups.items(), key=lambda item: item[1])
        if self.Fn + self.Bn >= size:
            raise ConfigError(
                f"dbcache.Fn={self.Fn} + dbcache.Bn={self.Bn} must leave at least one middle block to cache in "
                f"{name} ({size} blocks); groups: {groups}")


def _has_two_anchors(mask) -> bool:
    computed = 0
    for bit in mask:
        if bit == 1:
            computed += 1
        elif computed >= 2:
            return True
    return False


def block_groups(transformer: torch.nn.Module) -> dict[str, torch.nn.ModuleList]:
    """The transformer's lists of repeated blocks (FLUX.2: transformer_blocks, single_transformer_blocks)."""
    repeated = set(getattr(transformer, "_repeated_blocks", ()) or ())
    return {name: child for name, child in transformer.named_children()
            if isinstance(child, torch.nn.ModuleList) and len(child) and type(child[0]).__name__ in repeated}


class DBCache:
    """cache-dit DBCache attached to one transformer; refresh before each request, read stats between requests."""

    def __init__(self, transformer: torch.nn.Module, config: CachingConfig):
        config.validate()
        if getattr(transformer, "_rtedit_dbcache", None) is not None:
            raise ConfigError(f"{type(transformer).__name__} already has a DBCache attached")
        self.transformer = transformer
        self.config = config
        self.groups = block_groups(transformer)
        config.check_blocks({name: len(blocks) for name, blocks in self.groups.items()})
        self.requests = 0
        self.uncached_requests = 0  # requests whose step count the mask does not cover: every step computed
        self._steps = {name: 0 for name in self.groups}
        self._cached = {name: 0 for name in self.groups}
        self._last: dict[str, dict[str, Any]] = {}
        self._pending: tuple[int, str] | None = None  # (steps, how it ran) of the request not yet counted
        self._plans: dict[int, dict[str, dict]] = {}  # by step count: what a captured request did, its replays redo
        self._device_checks = {name: 0 for name in self.groups}  # group-steps whose check the device made
        self.device_decisions = None  # rtedit.accel.dbcache_graphs.DeviceDecisions, when graphs capture the check
        self._mask: list[int] = list(config.compute_mask)
        if not config.enabled:
            return
        import cache_dit  # imported on attach only: it takes seconds, and rtedit.config imports this module
        from cache_dit import TaylorSeerCalibratorConfig

        calibrator = TaylorSeerCalibratorConfig(taylorseer_order=config.taylorseer_order) \
            if config.taylorseer_order else None
        cache_dit.enable_cache(transformer, cache_config=self._db_config(len(self._mask), self._mask),
                               calibrator_config=calibrator)
        transformer._rtedit_dbcache = self
        if config.policy == "static":
            logger.warning("DBCache policy is %s", STATIC_LABEL)
        logger.info("DBCache attached: F%dB%d, mask %s, policy %s, threshold %s, groups %s", config.Fn, config.Bn,
                    tuple(config.compute_mask), config.policy, config.residual_diff_threshold,
                    {n: len(b) for n, b in self.groups.items()})

    def _db_config(self, num_steps: int, mask: list[int]):
        from cache_dit import DBCacheConfig

        cfg = self.config
        return DBCacheConfig(
            Fn_compute_blocks=cfg.Fn,
            Bn_compute_blocks=cfg.Bn,
            residual_diff_threshold=cfg.residual_diff_threshold,
            # Warmup is cut to the mask's leading 1s anyway; the mask alone decides which steps may be cached.
            max_warmup_steps=1,
            enable_separate_cfg=False,  # distilled klein makes one transformer call per step (no CFG pass)
            num_inference_steps=num_steps,
            steps_computation_mask=mask,
            steps_computation_policy=cfg.policy,
        )

    def refresh(self, num_steps: int) -> None:
        """Resets every cache context for a request of num_steps transformer calls. Call before each request."""
        if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
            raise ConfigError(f"num_steps must be an integer >= 1, got {num_steps!r}")
        self._collect()
        kind = self._request_kind()
        self.requests += kind != "captured"  # a capture runs no kernel: its replays are counted instead
        self._pending = (num_steps, kind)
        if self.device_decisions is not None:
            self.device_decisions.begin_request()
        if not self.config.enabled:
            return
        import cache_dit
        from cache_dit import DBCacheConfig

        mask = list(self.config.compute_mask) if num_steps == len(self.config.compute_mask) else [1] * num_steps
        if mask != list(self.config.compute_mask):
            self.uncached_requests += kind != "captured"
            logger.debug("DBCache: %d steps is not the %d-step mask; computing every step", num_steps,
                         len(self.config.compute_mask))
        if mask == self._mask:
            # The shorthand keeps the per-group settings and mask, and is about half the cost of a full config.
            cache_dit.refresh_context(self.transformer, num_inference_steps=num_steps, verbose=False)
        else:
            # Only the given fields override (reset form); a full DBCacheConfig would reset Fn and the rest.
            cache_dit.refresh_context(
                self.transformer,
                cache_config=DBCacheConfig().reset(num_inference_steps=num_steps, steps_computation_mask=mask),
                verbose=False)
            self._mask = mask

    def _request_kind(self) -> str:
        """"host": cache-dit decides and records; "captured": a CUDA graph capture (its Python runs both branches of a
        device check, its kernels none); "device": the device-decision path run eagerly (tests), counted as a replay."""
        if capturing():
            return "captured"
        if self.device_decisions is not None and self.device_decisions.on_host:
            return "device"
        return "host"

    def _collect(self) -> None:
        """Counts the finished request's cached steps per group; a captured one becomes its replays' plan."""
        if self._pending is None:
            return
        (steps, kind), self._pending = self._pending, None
        on_device = self.device_decisions.on_device if self.device_decisions is not None else {}
        plan = {}
        for name, blocks in self.groups.items():
            # The fields cache_dit.summary reports (CacheStats.cached_steps, residual_diffs), read from the group
            # directly: summary() rediscovers the groups by scanning every transformer attribute (~6 ms a call).
            cached = list(getattr(blocks, "_cached_steps", []) or []) if self.config.enabled else []
            diffs = dict(getattr(blocks, "_residual_diffs", {}) or {}) if self.config.enabled else {}
            if kind == "host":
                self._steps[name] += steps
                self._cached[name] += len(cached)
                self._last[name] = {"steps": steps, "cached_steps": cached,
                                    "residual_diffs": {str(k): float(v) for k, v in diffs.items()}}
                continue
            # cache-dit's record of steps its host rules decided holds at every replay; the device's are its own
            device_steps = list(on_device.get(name, ()))
            plan[name] = {"cached": [s for s in cached if s not in device_steps], "on_device": device_steps,
                          "diffs": {str(k): float(v) for k, v in diffs.items() if int(k) not in device_steps}}
        if kind != "host":
            self._plans[steps] = plan
        if kind == "device":
            self._count_plan(steps, plan)

    def count_replayed_request(self, num_steps: int) -> None:
        """Counts a request replayed from a CUDA graph (rtedit.accel.cuda_graphs, `on_replay`), whose Python never
        ran: its capture's plan for what cache-dit's host rules decided, the device's counters for the rest."""
        self._collect()  # the capture that just ended: its plan
        if num_steps not in self._plans:
            raise RuntimeError(f"DBCache: a replayed {num_steps}-step request, but no {num_steps}-step capture")
        self.requests += 1
        self.uncached_requests += num_steps != len(self.config.compute_mask)
        self._count_plan(num_steps, self._plans[num_steps])

    def _count_plan(self, steps: int, plan: dict[str, dict]) -> None:
        for name, group in plan.items():
            self._steps[name] += steps
            self._cached[name] += len(group["cached"])
            self._device_checks[name] += len(group["on_device"])
            self._last[name] = {"steps": steps, "plan": group}

    @staticmethod
    def _resolve(last: dict[str, Any], i: int, device: dict[str, list] | None) -> dict[str, Any]:
        """A planned request's steps and residual changes, with the device's decisions for its device-made checks."""
        if "plan" not in last:
            return last
        group = last["plan"]
        decided = [s for s in group["on_device"] if device["last_hit"][i][s]] if group["on_device"] else []
        diffs = {**group["diffs"], **{str(s): device["last_diff"][i][s] for s in group["on_device"]}}
        return {"steps": last["steps"], "cached_steps": sorted(group["cached"] + decided),
                "residual_diffs": dict(sorted(diffs.items(), key=lambda item: int(item[0])))}

    def summary(self) -> list:
        """cache-dit's own per-group summary (CacheStats list) of the last request; slow, for diagnostics."""
        import cache_dit

        return cache_dit.summary(self.transformer, details=False, logging=False)

    def stats(self) -> dict[str, Any]:
        """Per-group hit rates (cached steps / steps) over all requests and for the last one. Call between requests."""
        self._collect()
        cfg = self.config
        device = self.device_decisions.read() if self.device_decisions is not None else None
        groups = {}
        for i, name in enumerate(self.groups):
            last = self._resolve(self._last[name], i, device) if name in self._last else None
            cached = self._cached[name] + (device["hits"][i] if device is not None else 0)
            groups[name] = {
                "blocks": len(self.groups[name]),
                "steps": self._steps[name],
                "cached_steps": cached,
                "hit_rate": cached / self._steps[name] if self._steps[name] else 0.0,
                "last_hit_rate": len(last["cached_steps"]) / last["steps"] if last else 0.0,
                "last": last,
            }
        return {
            "enabled": cfg.enabled,
            "policy": cfg.policy,
            "label": STATIC_LABEL if cfg.policy == "static" else "dynamic: residual-checked (serving)",
            "config": f"F{cfg.Fn}B{cfg.Bn} mask {''.join(map(str, cfg.compute_mask))} "
                      f"threshold {cfg.residual_diff_threshold} taylorseer {cfg.taylorseer_order}",
            "requests": self.requests,
            "uncached_requests": self.uncached_requests,
            # group-steps whose residual check the device made (a captured graph's branch), not cache-dit's host
            "device_checks": dict(self._device_checks) if self.device_decisions is not None else None,
            "groups": groups,
        }

    def detach(self) -> None:
        """Removes cache-dit's hooks; the transformer runs uncached again."""
        if self.config.enabled and getattr(self.transformer, "_rtedit_dbcache", None) is self:
            import cache_dit

            if self.device_decisions is not None:
                self.device_decisions.remove()
            cache_dit.disable_cache(self.transformer)
            self.transformer._rtedit_dbcache = None


def attach_cache(transformer: torch.nn.Module, config: CachingConfig | None = None) -> DBCache:
    """Attaches DBCache to the transformer alone (not the pipeline); raises ConfigError on settings it cannot run."""
    return DBCache(transformer, config or CachingConfig())
