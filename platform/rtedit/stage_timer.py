"""Stage boundaries of one frame in ms: CUDA events on a GPU (no sync until the end), a host clock on the CPU."""

from __future__ import annotations

import time

import torch


class StageTimer:
    """`mark(stage)` at the end of each stage; `timings()` gives each stage's ms and the total."""

    def __init__(self, device: torch.device) -> None:
        self._cuda = device.type == "cuda"
        self._marks: list[tuple[str, object]] = [("start", self._now())]

    def _now(self):
        if self._cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def mark(self, stage: str) -> None:
        self._marks.append((stage, self._now()))

    def _elapsed(self, start, end) -> float:
        return start.elapsed_time(end) if self._cuda else (end - start) * 1000.0

    def timings(self) -> dict[str, float]:
        if self._cuda:
            self._marks[-1][1].synchronize()
        out = {name: self._elapsed(prev, cur) for (_, prev), (name, cur) in zip(self._marks, self._marks[1:])}
        out["total"] = self._elapsed(self._marks[0][1], self._marks[-1][1])
        return out
