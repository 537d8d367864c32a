"""Step-2 reuse for the session mode's X pass: DBCache's rule, hand-written over rtedit's own block loop.

cache-dit caches by swapping each block list for its own wrapper, driven from diffusers' forward; the session path
calls diffusers' blocks from its own loop (rtedit.model.causal_session) with per-layer cached keys and values, which
that wrapper neither sees nor passes on (and with the kv path it breaks diffusers' KV cache). So the rule is
written here, on the same `CachingConfig` knobs the full path gives cache-dit: per block group (double-stream,
single-stream), a step the mask allows to reuse computes the group's first Fn blocks and, if their residual changed
less than `residual_diff_threshold` (relative L1, as cache-dit measures it) since the last computed step, adds that
step's residual of the middle blocks instead of running them; the last Bn blocks always run. Policy "dynamic"
checks (the serving default); "static" reuses without checking, for timing only, and says so in stats and logs.

Where the dynamic check runs: eagerly it is read on the host (one sync per group of a reusable step); inside a CUDA
graph capture (rtedit.accel.cuda_graphs.branch) both branches are captured and the hit count is a device counter
read only when stats are: as CUDA conditional nodes (`CUDAGraph.begin_capture_to_if_node`) where torch has them, so
a replay decides without the host; else (torch 2.11) as graph segments, the check read on the host between them,
one read per group of a reusable step, as eagerly, but with every kernel of the stage still replayed from graphs.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from rtedit.accel import cuda_graphs
from rtedit.accel.dbcache import STATIC_LABEL, CachingConfig
from rtedit.errors import ConfigError

logger = logging.getLogger(__name__)

Block = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class _Residuals:
    """One group's residuals at the last computed step of a frame."""

    first: torch.Tensor  # of the first Fn blocks: what the next step's residual is compared with
    middle: torch.Tensor  # of the middle blocks: what a reused step adds instead of running them


def if_else(pred: torch.Tensor, when_true: Callable[[], None], when_false: Callable[[], None],
            on_device: bool) -> None:
    """Runs one of two bodies by a 0-dim bool tensor. on_device (inside a CUDA graph capture): both captured and
    the choice made at each replay (rtedit.accel.cuda_graphs.branch); else the host reads `pred` now (one sync)."""
    if not on_device:
        (when_true if bool(pred.item()) else when_false)()
        return
    cuda_graphs.branch(pred, when_true, when_false)


class StepReuse:
    """The reuse rule on one editor and its counters; `frame(steps)` holds one frame's residuals."""

    def __init__(self, config: CachingConfig, groups: dict[str, int], device: torch.device | None = None) -> None:
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
        # Decisions captured into a CUDA graph: hit counts and the latest residual change per group, device tensors
        # read when stats are asked for. Made here, outside any capture: a tensor made during a capture would be
        # zeroed again by every replay.
        self.device_reused: dict[str, torch.Tensor] = {}
        self.device_diffs: dict[str, torch.Tensor] = {}
        self.decided_on_device: set[str] = set()
        if device is not None:
            for name in groups:
                self._device_tensors(name, device)
        self.device_path_on_host = False  # tests: the device-decision path run eagerly, its choice read on the host
        if config.policy == "static":
            logger.warning("session step reuse policy is %s", STATIC_LABEL)

    def frame(self, num_steps: int) -> FrameReuse:
        """A frame of `num_steps` steps: the mask applies when it has that length, else every step computes."""
        mask = tuple(self.config.compute_mask)
        capturing = cuda_graphs.capturing()
        self.frames += not capturing  # a captured frame is counted by its replays (count_replayed_frame)
        if len(mask) != num_steps:
            self.unmasked_frames += not capturing
            mask = (1,) * num_steps
        return FrameReuse(self, mask)

    def count_replayed_frame(self, num_steps: int) -> None:
        """The host counters of a frame replayed from a CUDA graph (rtedit.accel.cuda_graphs), whose Python never
        runs: which steps may reuse is fixed by the mask; the static policy reuses all of them, the dynamic policy's
        hits are counted on the device by the graph itself."""
        computed = False
        for compute in self.frame(num_steps).mask:
            if not compute and computed:
                for name in self.groups:
                    self.allowed[name] += 1
                    if self.config.policy == "static":
                        self.reused[name] += 1
            computed = computed or bool(compute)

    def _device_tensors(self, group: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if group not in self.device_reused:
            if device.type == "cuda" and cuda_graphs.capturing():
                raise RuntimeError("step reuse's device counters must exist before a CUDA graph capture: build "
                                   "StepReuse with the editor's device")
            self.device_reused[group] = torch.zeros((), dtype=torch.int64, device=device)
            self.device_diffs[group] = torch.zeros((), dtype=torch.float32, device=device)
        return self.device_reused[group], self.device_diffs[group]

    def _reused(self) -> dict[str, int]:
        return {name: count + (int(self.device_reused[name].item()) if name in self.device_reused else 0)
                for name, count in self.reused.items()}

    def stats(self) -> dict:
        reused_by_group = self._reused()
        allowed, reused = sum(self.allowed.values()), sum(reused_by_group.values())
        diffs = {name: list(values) for name, values in self.last_diffs.items()}
        for name in sorted(self.decided_on_device):  # the latest replay's check, decided in a graph
            diffs.setdefault(name, []).append(float(self.device_diffs[name].item()))
        cfg = self.config
        return {"enabled": True, "policy": cfg.policy, "label": STATIC_LABEL if cfg.policy == "static" else None,
                "compute_mask": list(cfg.compute_mask), "Fn": cfg.Fn, "Bn": cfg.Bn,
                "residual_diff_threshold": cfg.residual_diff_threshold, "frames": self.frames,
                "unmasked_frames": self.unmasked_frames, "allowed": dict(self.allowed), "reused": reused_by_group,
                "hit_rate": reused / allowed if allowed else None, "last_residual_diffs": diffs,
                "decided_on_device": sorted(self.decided_on_device)}


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
            capturing = hidden.is_cuda and cuda_graphs.capturing()
            owner.allowed[group] += not capturing  # a capture runs no kernel: its replays count (count_replayed_frame)
            if cfg.policy == "dynamic" and (capturing or owner.device_path_on_host):
                hidden = self._decide_on_device(group, blocks[fn:len(blocks) - bn], hidden, first, last)
                return self._last(blocks, bn, hidden)
            if cfg.policy == "static" or self._close(group, first, last.first):
                owner.reused[group] += not capturing
                return self._last(blocks, bn, hidden + last.middle)
        before_middle = hidden
        for block in blocks[fn:len(blocks) - bn]:
            hidden = block(hidden)
        self._residuals[group] = _Residuals(first, hidden - before_middle)
        return self._last(blocks, bn, hidden)

    @staticmethod
    def _last(blocks: Sequence[Block], bn: int, hidden: torch.Tensor) -> torch.Tensor:
        for block in blocks[len(blocks) - bn:]:
            hidden = block(hidden)
        return hidden

    def _decide_on_device(self, group: str, middle: Sequence[Block], hidden: torch.Tensor, first: torch.Tensor,
                          last: _Residuals) -> torch.Tensor:
        """The dynamic check without a host read: both branches write into one output, and the computing branch
        replaces the stored residuals in place, as the host path replaces them."""
        owner = self.owner
        diff = (first - last.first).abs().mean() / last.first.abs().mean()
        passes = diff < owner.config.residual_diff_threshold
        counter, latest = owner._device_tensors(group, hidden.device)
        owner.decided_on_device.add(group)
        latest.copy_(diff)
        counter.add_(passes.to(torch.int64))
        out = torch.empty_like(hidden)

        def reuse() -> None:
            out.copy_(hidden + last.middle)

        def compute() -> None:
            computed = hidden
            for block in middle:
                computed = block(computed)
            last.first.copy_(first)
            last.middle.copy_(computed - hidden)
            out.copy_(computed)

        if_else(passes, reuse, compute, on_device=not owner.device_path_on_host)
        return out

    def _close(self, group: str, first: torch.Tensor, previous: torch.Tensor) -> bool:
        # One host read per group of a reusable step: the decision picks which kernels run next.
        diff = ((first - previous).abs().mean() / previous.abs().mean()).item()
        self.owner.last_diffs.setdefault(group, []).append(diff)
        del self.owner.last_diffs[group][:-8]
        return diff < self.owner.config.residual_diff_threshold
