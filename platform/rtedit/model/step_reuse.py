"""Step-2 reuse for the session mode's X pass: DBCache's rule, hand-written over rtedit's own block loop.

cache-dit caches by swapping each block list for its own wrapper, driven from diffusers' forward; the session path
calls diffusers' blocks from its own loop (rtedit.model.causal_session) with per-layer cached keys and values, which
that wrapper neither sees nor passes on (and with the kv path it breaks diffusers' KV cache). So the rule is
written here, on the same `CachingConfig` knobs the full path gives cache-dit: per block group (double-stream,
single-stream), a step the mask allows to reuse computes the group's first Fn blocks and, if their residual changed
less than `residual_diff_threshold` (relative L1, as cache-dit measures it) since the last computed step, adds that
step's residual of the middle blocks instead of running them; the last Bn blocks always run. Policy "dynamic"
checks (the serving default); "static" reuses without checking, for timing only, and says so in stats and logs.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from rtedit.accel.dbcache import STATIC_LABEL, CachingConfig
from rtedit.errors import ConfigError

logger = logging.getLogger(__name__)

Block = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class _Residuals:
    """One group's residuals at the last computed step of a frame."""

    first: torch.Tensor  # of the first Fn blocks: what the next step's residual is compared with
    middle: torch.Tensor  # of the middle blocks: what a reused step adds instead of running them


class StepReuse:
    """The reuse rule on one editor and its counters; `frame(steps)` holds one frame's residuals."""

    def __init__(self, config: CachingConfig, groups: dict[str, int]) -> None:
        config.validate()
        config.check_blocks(groups)
        if config.taylorseer_order:
            raise ConfigError("dbcache.taylorseer_order is cache-dit's; the session mode's step reuse has no "
                              "TaylorSeer: set it to 0")
        self.config = config
        self.groups = dict(groups)
        self.frames = self.unmasked_frames = 0
        self.allowed = {name: 0 for name in groups}  # group-steps the mask let reuse
        self.reused = {name: 0 for name in groups}
        self.last_diffs: dict[str, list[float]] = {}
        if config.policy == "static":
            logger.warning("session step reuse policy is %s", STATIC_LABEL)

    def frame(self, num_steps: int) -> FrameReuse:
        """A frame of `num_steps` steps: the mask applies when it has that length, else every step computes."""
        mask = tuple(self.config.compute_mask)
        self.frames += 1
        if len(mask) != num_steps:
            self.unmasked_frames += 1
            mask = (1,) * num_steps
        return FrameReuse(self, mask)

    def count_replayed_frame(self, num_steps: int) -> None:
        """The counters of a frame replayed from a CUDA graph (rtedit.accel.cuda_graphs), whose Python never runs:
        the static policy's decisions are fixed, so they are what a run would have counted."""
        if self.config.policy != "static":
            raise ConfigError("only the static policy's frames can be replayed from a graph: the dynamic policy "
                              "decides on the host per step")
        computed = False
        for compute in self.frame(num_steps).mask:
            if not compute and computed:
                for name in self.groups:
                    self.allowed[name] += 1
                    self.reused[name] += 1
            computed = computed or bool(compute)

    def stats(self) -> dict:
        allowed, reused = sum(self.allowed.values()), sum(self.reused.values())
        cfg = self.config
        return {"enabled": True, "policy": cfg.policy, "label": STATIC_LABEL if cfg.policy == "static" else None,
                "compute_mask": list(cfg.compute_mask), "Fn": cfg.Fn, "Bn": cfg.Bn,
                "residual_diff_threshold": cfg.residual_diff_threshold, "frames": self.frames,
                "unmasked_frames": self.unmasked_frames, "allowed": dict(self.allowed), "reused": dict(self.reused),
                "hit_rate": reused / allowed if allowed else None, "last_residual_diffs": dict(self.last_diffs)}


class FrameReuse:
    """One frame's steps: `begin_step()` before each X pass, then `run(group, blocks, hidden)` per block group."""

    def __init__(self, owner: StepReuse, mask: tuple[int, ...]) -> None:
        self.owner, self.mask = owner, mask
        self.step = -1
        self._residuals: dict[str, _Residuals] = {}

    def begin_step(self) -> None:
        self.step += 1
        if self.step >= len(self.mask):
            raise ConfigError(f"step {self.step + 1} of a frame planned for {len(self.mask)} steps")

    def run(self, group: str, blocks: Sequence[Block], hidden: torch.Tensor) -> torch.Tensor:
        cfg, owner = self.owner.config, self.owner
        fn, bn = cfg.Fn, cfg.Bn
        start = hidden
        for block in blocks[:fn]:
            hidden = block(hidden)
        first = hidden - start
        last = self._residuals.get(group)
        if self.mask[self.step] == 0 and last is not None:
            owner.allowed[group] += 1
            if cfg.policy == "static" or self._close(group, first, last.first):
                owner.reused[group] += 1
                hidden = hidden + last.middle
                for block in blocks[len(blocks) - bn:]:
                    hidden = block(hidden)
                return hidden
        before_middle = hidden
        for block in blocks[fn:len(blocks) - bn]:
            hidden = block(hidden)
        self._residuals[group] = _Residuals(first, hidden - before_middle)
        for block in blocks[len(blocks) - bn:]:
            hidden = block(hidden)
        return hidden

    def _close(self, group: str, first: torch.Tensor, previous: torch.Tensor) -> bool:
        # One host read per group of a reusable step: the decision picks which kernels run next.
        diff = ((first - previous).abs().mean() / previous.abs().mean()).item()
        self.owner.last_diffs.setdefault(group, []).append(diff)
        del self.owner.last_diffs[group][:-8]
        return diff < self.owner.config.residual_diff_threshold
