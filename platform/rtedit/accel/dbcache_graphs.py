"""cache-dit's dynamic DBCache check decided on the device, so the full path's denoise stage can be a CUDA graph.

cache-dit 1.5.3 decides on the host: `CachedContextManager.similarity` (caching/cache_contexts/cache_manager.py)
ends in `(mean_diff / mean_t1).item()`, and the block groups' forwards branch on it with a Python `if`:
`CachedBlocks_Pattern_Base.forward` (caching/cache_blocks/pattern_base.py; FLUX.2's double-stream blocks, Pattern_1)
and `CachedBlocks_Pattern_3_4_5.forward` (pattern_3_4_5.py; its single-stream blocks, Pattern_3). A replayed graph
runs no Python, so it can do neither. While a StageGraphs capture is in progress (rtedit.accel.cuda_graphs), and only
then, this module replaces both for a DBCache that `decide_on_device` was called on:
- `similarity`, on that transformer's context manager: the same relative L1 change, left on the device as a 0-dim
  bool (`DeviceCheck`); cache-dit's own `can_cache` still applies every host rule before it (warm-up, mask, policy);
- the two forwards, wrapped on their classes: outside a capture they call cache-dit's own forward, unchanged; inside
  one they make cache-dit's calls in cache-dit's order, with its `if can_use_cache:` made a `cuda_graphs.branch`
  whose two bodies write the same tensors: the group's outputs, and cache-dit's residual buffers in place (the
  computing body's new residuals are copied into the tensors the following steps' kernels were captured reading).
Written by hand here: only that decision and the branch around cache-dit's two tails; every step of a tail is a
cache-dit method. The forwards are restated from 1.5.3's, so any other version is refused (`check_version`), and
tests/test_caching.py holds the restated path to cache-dit's own outputs and stats.

Python-side state: a capture runs both bodies in Python and a replay runs none, so cache-dit's own cached-step lists
are wrong for a captured request and absent for a replay. The device's decisions are counted on the device (per
group: hits, and the latest request's decision and residual change per step), read only when stats are; DBCache
counts a replay with the plan its capture left (which steps cache-dit's host rules cached, which the device decided).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from rtedit.accel.cuda_graphs import branch, capturing
from rtedit.errors import ConfigError

if TYPE_CHECKING:
    from rtedit.accel.dbcache import DBCache

CACHE_DIT_VERSION = "1.5.3"  # the version whose forwards are restated below; another may differ without a sign

Tail = Callable[[], tuple[torch.Tensor | None, torch.Tensor | None]]


def check_version() -> None:
    """ConfigError unless the installed cache-dit is the one this module's restated forwards come from."""
    import cache_dit

    installed = getattr(cache_dit, "__version__", "unknown")
    if installed != CACHE_DIT_VERSION:
        raise ConfigError(
            f"cuda_graphs with dbcache policy 'dynamic' patches cache-dit {CACHE_DIT_VERSION}'s decision path "
            f"(rtedit.accel.dbcache_graphs), but cache-dit {installed} is installed: install "
            f"cache-dit=={CACHE_DIT_VERSION} (pyproject.toml pins it), or turn cuda_graphs or the dynamic policy off")


def decide_on_device(dbcache: DBCache) -> DeviceDecisions:
    """Makes the DBCache's dynamic check capturable: within a StageGraphs capture it becomes a graph branch.
    ConfigError on another cache-dit version, or on TaylorSeer, whose extrapolation state lives in Python."""
    check_version()
    if not dbcache.config.enabled:
        raise ConfigError("dbcache is not enabled: there is no cache-dit check to decide on the device")
    if dbcache.config.taylorseer_order:
        raise ConfigError("dbcache.taylorseer_order: TaylorSeer keeps its extrapolation state in Python, which a "
                          "replayed graph does not run; the dynamic check is not capturable with it")
    if dbcache.device_decisions is None:
        dbcache.device_decisions = DeviceDecisions(dbcache)
    return dbcache.device_decisions


@dataclass(frozen=True)
class DeviceCheck:
    """cache-dit's residual check left on the device: `passes` (0-dim bool) reuses the cached residual, `diff` is the
    relative L1 change it compared with the threshold."""

    passes: torch.Tensor
    diff: torch.Tensor

    def __bool__(self) -> bool:  # only the restated forwards may branch on it: a host `if` would sync (or fail)
        raise RuntimeError("a device-side DBCache check reached a host `if` (a cache-dit forward this module does "
                           "not restate)")


class DeviceDecisions:
    """The device-side decisions of one DBCache: their counters, and which (group, step) of the request running now
    the device decided."""

    def __init__(self, dbcache: DBCache) -> None:
        transformer = dbcache.transformer
        self.groups = list(dbcache.groups)
        device = next(transformer.parameters()).device
        steps = len(dbcache.config.compute_mask)  # only a request of the mask's length has reusable steps
        # Made here, outside any capture: a tensor made during a capture would be zeroed again by every replay.
        self.hits = torch.zeros(len(self.groups), dtype=torch.int64, device=device)
        self.last_hit = torch.zeros(len(self.groups), steps, dtype=torch.bool, device=device)
        self.last_diff = torch.zeros(len(self.groups), steps, dtype=torch.float32, device=device)
        self.on_device: dict[str, list[int]] = {name: [] for name in self.groups}  # of the request running now
        self.on_host = False  # tests: the device-decision path run eagerly, its choice read on the host
        self._manager = transformer._context_manager  # cache-dit's, shared by the transformer's block groups
        self._manager.similarity = functools.partial(_similarity, self._manager, self)
        _wrap_forwards()

    def active(self) -> bool:
        """Whether cache-dit's checks are decided on the device now: inside a capture, or eagerly for tests."""
        return self.on_host or capturing()

    def begin_request(self) -> None:
        self.on_device = {name: [] for name in self.groups}

    def read(self) -> dict[str, list]:
        """The device's counts, read back: a host sync, so only between requests (stats)."""
        return {"hits": self.hits.tolist(), "last_hit": self.last_hit.tolist(), "last_diff": self.last_diff.tolist()}

    def remove(self) -> None:
        self._manager.__dict__.pop("similarity", None)

    def decide(self, blocks, check: bool | DeviceCheck, reuse: Tail, compute: Tail,
               like: tuple[torch.Tensor | None, torch.Tensor | None]):
        """Runs cache-dit's reuse or compute tail of one group's step. A bool is cache-dit's host rules' answer
        (warm-up, mask, static policy, a threshold >= 1); a DeviceCheck leaves the choice to each replay (`branch`),
        both tails writing into the same outputs, shaped `like` the tails' inputs, and into the same buffers."""
        if not isinstance(check, DeviceCheck):
            return reuse() if check else compute()
        manager = blocks.context_manager
        self._note(blocks.cache_prefix, manager.get_current_step(), check)
        buffers = manager.get_context().buffers
        kept = dict(buffers)
        outputs = tuple(None if t is None else torch.empty_like(t) for t in like)

        def writing(tail: Tail) -> Callable[[], None]:
            def body() -> None:
                for out, result in zip(outputs, tail(), strict=True):
                    if out is None or result is None or out.shape != result.shape:
                        if out is None and result is None:
                            continue
                        raise RuntimeError(f"DBCache branch of {blocks.cache_prefix}: a tail returned "
                                           f"{None if result is None else tuple(result.shape)} where its input was "
                                           f"{None if out is None else tuple(out.shape)}")
                    out.copy_(result)
                for name, tensor in buffers.items():  # cache-dit stores new tensors; later steps read the kept ones
                    old = kept.get(name)
                    if old is None or old.shape != tensor.shape:
                        raise RuntimeError(f"cache-dit buffer {name!r} is written by one branch only, or reshaped")
                    if tensor is not old:
                        old.copy_(tensor)
                        buffers[name] = old
            return body

        if capturing():
            branch(check.passes, writing(reuse), writing(compute))
        else:  # tests (on_host): the same bodies, the choice read on the host
            (writing(reuse) if bool(check.passes.item()) else writing(compute))()
        return outputs

    def _note(self, group: str, step: int, check: DeviceCheck) -> None:
        if group not in self.groups or not 0 <= step < self.last_hit.shape[1]:
            raise RuntimeError(f"DBCache device check of {group!r} at step {step}: outside {self.groups} x "
                               f"{self.last_hit.shape[1]} steps")
        i = self.groups.index(group)
        self.on_device[group].append(step)
        self.hits[i].add_(check.passes.to(torch.int64))
        self.last_hit[i, step].copy_(check.passes)
        self.last_diff[i, step].copy_(check.diff)


# ---- cache-dit 1.5.3's functions, replaced while deciding on the device ------------------------------------------
def _similarity(manager, decisions: DeviceDecisions, t1: torch.Tensor, t2: torch.Tensor, *, threshold: float,
                parallelized: bool = False, prefix: str = "Fn"):
    """`CachedContextManager.similarity` without its `.item()` while deciding on the device: the same relative L1
    change, compared in float64 as cache-dit compares the Python float. Its host-only answers stay its own."""
    original = type(manager).similarity
    if not decisions.active() or threshold <= 0.0 or threshold >= 1.0 or t1.shape != t2.shape:
        return original(manager, t1, t2, threshold=threshold, parallelized=parallelized, prefix=prefix)
    diff = (t1 - t2).abs().mean() / t1.abs().mean()
    return DeviceCheck(diff.double() < threshold, diff)


def _check_mirrored(blocks) -> None:
    """cache-dit settings whose code the restated forwards leave out; rtedit's DBCache sets none of them."""
    manager = blocks.context_manager
    unmirrored = {
        "a calibrator (TaylorSeer)": manager.is_calibrator_enabled() or manager.is_encoder_calibrator_enabled(),
        "the hidden-states L1 check": manager.is_l1_diff_enabled(),
        "separate CFG steps": bool(manager.enable_separate_cfg()),
        "important-token conditions": manager.get_important_condition_threshold() > 0.0,
        "a parallelized (all-reduced) check": blocks._is_parallelized(),
    }
    if any(unmirrored.values()):
        raise ConfigError(f"DBCache on the device does not mirror cache-dit's "
                          f"{', '.join(k for k, v in unmirrored.items() if v)}")


def _entered(blocks) -> bool:
    from cache_dit.caching.cache_contexts.cache_manager import ContextNotExistError

    try:
        blocks.context_manager.set_context(blocks.cache_context)
        blocks._check_cache_params()
    except ContextNotExistError:
        return False
    _check_mirrored(blocks)
    return True


def _first_blocks_and_check(blocks, hidden_states, *args, **kwargs):
    """How both cache-dit forwards open a group's step: its first Fn blocks, their residual, and the reuse check
    (a bool from cache-dit's host rules, or a DeviceCheck). Returns (hidden, encoder, Fn residual, check)."""
    manager = blocks.context_manager
    new_hidden_states, encoder_hidden_states = blocks.call_Fn_blocks(hidden_states, *args, **kwargs)
    fn_residual = blocks._get_Fn_residual(hidden_states, new_hidden_states)
    manager.mark_step_begin()
    check = manager.can_cache(fn_residual, parallelized=blocks._is_parallelized(),
                              prefix=f"{blocks.cache_prefix}_Fn_residual")
    return new_hidden_states, encoder_hidden_states, fn_residual, check


def _pattern_1_forward(self, decisions: DeviceDecisions, original, hidden_states, encoder_hidden_states, *args,
                       **kwargs):
    """`CachedBlocks_Pattern_Base.forward` of cache-dit 1.5.3 (FLUX.2's double-stream blocks), its residual check
    decided by `decisions.decide`."""
    if not _entered(self):  # cache-dit warns and runs every block uncached
        return original(self, hidden_states, encoder_hidden_states, *args, **kwargs)
    manager, prefix = self.context_manager, self.cache_prefix
    hidden_states, encoder_hidden_states, fn_residual, check = _first_blocks_and_check(
        self, hidden_states, encoder_hidden_states, *args, **kwargs)

    def reuse():
        manager.add_cached_step()
        h, e = manager.apply_cache(hidden_states, encoder_hidden_states, prefix=f"{prefix}_Bn_residual",
                                   encoder_prefix=f"{prefix}_Bn_residual")
        return self.call_Bn_blocks(h, e, *args, **kwargs)

    def compute():
        manager.set_Fn_buffer(fn_residual, prefix=f"{prefix}_Fn_residual")
        h, e, h_residual, e_residual = self.call_Mn_blocks(hidden_states, encoder_hidden_states, *args, **kwargs)
        manager.set_Bn_buffer(h_residual, prefix=f"{prefix}_Bn_residual")
        manager.set_Bn_encoder_buffer(e_residual, prefix=f"{prefix}_Bn_residual")
        return self.call_Bn_blocks(h, e, *args, **kwargs)

    hidden_states, encoder_hidden_states = decisions.decide(self, check, reuse, compute,
                                                            (hidden_states, encoder_hidden_states))
    return self._process_forward_outputs(hidden_states, encoder_hidden_states)


def _pattern_3_forward(self, decisions: DeviceDecisions, original, hidden_states, *args, **kwargs):
    """`CachedBlocks_Pattern_3_4_5.forward` of cache-dit 1.5.3 (FLUX.2's single-stream blocks), its residual check
    decided by `decisions.decide`."""
    if not _entered(self):
        return original(self, hidden_states, *args, **kwargs)
    manager, prefix = self.context_manager, self.cache_prefix
    hidden_states, new_encoder_hidden_states, fn_residual, check = _first_blocks_and_check(
        self, hidden_states, *args, **kwargs)

    def reuse():
        manager.add_cached_step()
        h, e = manager.apply_cache(hidden_states, new_encoder_hidden_states, prefix=f"{prefix}_Bn_residual",
                                   encoder_prefix=f"{prefix}_Bn_residual")
        if manager.Bn_compute_blocks() > 0:
            h, e = self.call_Bn_blocks(h, *args, **kwargs)
        return h, e

    def compute():
        manager.set_Fn_buffer(fn_residual, prefix=f"{prefix}_Fn_residual")
        h, e, h_residual = self.call_Mn_blocks(hidden_states, *args, **kwargs)
        manager.set_Bn_buffer(h_residual, prefix=f"{prefix}_Bn_residual")
        if e is not None:
            manager.set_Bn_encoder_buffer(e - new_encoder_hidden_states, prefix=f"{prefix}_Bn_residual")
        if manager.Bn_compute_blocks() > 0:
            h, e = self.call_Bn_blocks(h, *args, **kwargs)
        return h, e

    hidden_states, new_encoder_hidden_states = decisions.decide(self, check, reuse, compute,
                                                                (hidden_states, new_encoder_hidden_states))
    return self._process_forward_outputs(hidden_states, new_encoder_hidden_states)


_WRAPPED: dict[type, Callable] = {}  # cache-dit class -> its own forward


def _wrap_forwards() -> None:
    """Wraps the two CachedBlocks forwards, once per process (their instances are reachable only through cache-dit's
    closures); a wrapped forward is cache-dit's own unless its transformer's DBCache decides on the device now."""
    from cache_dit.caching.cache_blocks.pattern_3_4_5 import CachedBlocks_Pattern_3_4_5
    from cache_dit.caching.cache_blocks.pattern_base import CachedBlocks_Pattern_Base

    for cls, on_device in ((CachedBlocks_Pattern_Base, _pattern_1_forward),
                           (CachedBlocks_Pattern_3_4_5, _pattern_3_forward)):
        if cls not in _WRAPPED:
            _WRAPPED[cls] = cls.__dict__["forward"]
            cls.forward = _dispatching(_WRAPPED[cls], on_device)


def _dispatching(original: Callable, on_device: Callable) -> Callable:
    @functools.wraps(original)
    def forward(self, *args, **kwargs):
        decisions = getattr(getattr(self.transformer, "_rtedit_dbcache", None), "device_decisions", None)
        if decisions is None or not decisions.active():
            return original(self, *args, **kwargs)
        return on_device(self, decisions, original, *args, **kwargs)

    return forward
