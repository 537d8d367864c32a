"""CUDA graphs over whole stages of a frame: captured per bucket at warm-up, replayed with their inputs copied in.

torch.compile's "reduce-overhead" mode graphs each compiled region on its own, and the idle GPU time of a frame lies
between regions: the Python glue of the session path's 25 layers, the Euler steps, the autoencoder's pre- and
post-processing. So a whole stage (encode, denoise, decode) is captured by hand with `torch.cuda.CUDAGraph`: its
inputs are copied into static buffers the graph reads, its outputs are static tensors the next replay overwrites.

Rules a captured stage keeps (the Editor's stages keep them; rtedit.editor):
- no host synchronisation and no host-side decision that can change between frames, but through `branch`: the
  dynamic reuse checks, the session's (rtedit.model.step_reuse.if_else) and cache-dit's on the full path
  (rtedit.accel.dbcache_graphs, which patches cache-dit 1.5.3's check for it), are captured as CUDA conditional
  nodes where torch has them, else as graph segments with the check read on the host between them; a stage that
  cannot keep this rule (cache-dit's TaylorSeer with the dynamic check) is left out, `leave_out`, and runs eagerly;
- every tensor the stage reads that can change between frames is an input (position ids, prompt embeddings,
  timesteps, cached keys and values): anything else is baked in at capture;
- its outputs are consumed before the same graph replays again (the Editor runs one frame at a time).
Each graph has its own memory pool, so no graph's replay can overwrite another graph's outputs or inputs.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field

import torch

from rtedit.errors import ConfigError

logger = logging.getLogger(__name__)

Outputs = torch.Tensor | tuple[torch.Tensor, ...]


_capture_state = threading.local()  # the _Recorder of this thread's StageGraphs capture, for branches


def _recorder() -> _Recorder:
    # torch 2.11, the GPU image's, has no `CUDAGraph.get_currently_capturing_graph`: the capture says which it is
    recorder = getattr(_capture_state, "recorder", None)
    if recorder is None:
        raise RuntimeError("no StageGraphs capture is in progress on this thread")
    return recorder


def capturing() -> bool:
    """Whether this thread's current CUDA stream is being captured into a graph (False without CUDA)."""
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def branch(pred: torch.Tensor, when_true: Callable[[], None], when_false: Callable[[], None]) -> None:
    """Inside a StageGraphs capture: one of two bodies by a 0-dim bool tensor, chosen at each replay. Both bodies
    must write the same tensors (what follows reads those, whichever ran). With conditional nodes the GPU chooses;
    without them (torch 2.11) the capture is cut here into segments, and a replay reads `pred` on the host."""
    recorder = _recorder()
    if conditional_nodes_unavailable() is None:
        for condition, body in ((pred, when_true), (torch.logical_not(pred), when_false)):
            recorder.graph.begin_capture_to_if_node(condition)  # CUDA before 12.8 has IF nodes only, not IF/ELSE
            try:
                body()
            finally:
                recorder.graph.end_capture_to_conditional_node()
        return
    recorder.split(pred, when_true, when_false)


def conditional_nodes_unavailable() -> str | None:
    """Why this torch build cannot capture CUDA conditional (IF) nodes, or None when it can."""
    missing = [m for m in ("begin_capture_to_if_node", "end_capture_to_conditional_node")
               if not hasattr(torch.cuda.CUDAGraph, m)]
    return f"torch {torch.__version__}'s CUDAGraph has no {' or '.join(missing)}" if missing else None


@dataclass(frozen=True)
class _Branch:
    """A host decision between two graph segments: `pred`, written by the segments before it, picks the body."""

    pred: torch.Tensor
    when_true: torch.cuda.CUDAGraph
    when_false: torch.cuda.CUDAGraph


class _Recorder:
    """One stage's capture as a list of graphs in one memory pool: a single graph, unless `split` cuts it at a
    host decision. Graphs that share a pool must replay in the order they were captured; the two bodies of a
    branch both follow the segment before them and precede the one after, and only one of them runs."""

    def __init__(self, pool) -> None:
        self.pool = pool
        self.parts: list[torch.cuda.CUDAGraph | _Branch] = []
        self.graph = self._begin()

    def _begin(self) -> torch.cuda.CUDAGraph:
        graph = torch.cuda.CUDAGraph()
        # thread_local: another thread's CUDA work (a prompt encode) must not invalidate this capture
        graph.capture_begin(pool=self.pool, capture_error_mode="thread_local")
        return graph

    def split(self, pred: torch.Tensor, when_true: Callable[[], None], when_false: Callable[[], None]) -> None:
        self.graph.capture_end()
        self.parts.append(self.graph)
        bodies = []
        for body in (when_true, when_false):
            self.graph = self._begin()
            body()
            self.graph.capture_end()
            bodies.append(self.graph)
        self.parts.append(_Branch(pred, *bodies))
        self.graph = self._begin()

    def finish(self) -> list[torch.cuda.CUDAGraph | _Branch]:
        self.graph.capture_end()
        self.parts.append(self.graph)
        return self.parts

    def abandon(self) -> None:
        try:
            self.graph.capture_end()
        except RuntimeError:  # the failed capture already ended it; the error that got here is what to raise
            pass


@dataclass
class _Captured:
    parts: list[torch.cuda.CUDAGraph | _Branch]
    inputs: list[torch.Tensor]  # static buffers, in the order `run` receives its tensors
    held_sources: list  # weak references to the `held` tensors last copied in (copied again only when they change)
    outputs: Outputs
    seconds: float
    replays: int = 0
    host_reads: int = 0  # branch decisions read on the host at replays

    @property
    def branches(self) -> int:
        return sum(isinstance(p, _Branch) for p in self.parts)

    def replay(self) -> None:
        for part in self.parts:
            if isinstance(part, _Branch):
                self.host_reads += 1
                (part.when_true if bool(part.pred.item()) else part.when_false).replay()
            else:
                part.replay()


def _check_tensors(what: str, tensors: Sequence[torch.Tensor], device: torch.device) -> None:
    for i, t in enumerate(tensors):
        if not isinstance(t, torch.Tensor) or t.device != device:
            raise ConfigError(f"graph stage {what}: input {i} must be a tensor on {device}, got "
                              f"{type(t).__name__} on {getattr(t, 'device', None)}")


@dataclass
class StageGraphs:
    """One editor's captured stages, keyed by (stage, shape key); `run` captures on a key's first call when armed.

    Before `arm()` (during the compile warm-up) stages run eagerly; between `arm()` and `freeze()` (the graph
    warm-up pass) each new key is captured; after `freeze()` nothing is captured any more, and a frame of a shape
    the warm-up missed runs eagerly, counted in `unwarmed_runs` (benchmarks assert it stays 0)."""

    device: torch.device
    armed: bool = False
    frozen: bool = False
    unwarmed_runs: int = 0  # frames of a shape the warm-up did not capture (run eagerly)
    graphs: dict[tuple, _Captured] = field(default_factory=dict)
    left_out: dict[str, str] = field(default_factory=dict)  # stages never captured, with the reason

    def __post_init__(self) -> None:
        if self.device.type != "cuda":
            raise ConfigError(f"cuda_graphs needs a CUDA device, the editor runs on {self.device}")

    def arm(self) -> None:
        self.armed = True

    def leave_out(self, stage: str, reason: str) -> None:
        """A stage that cannot be captured (a host-side decision inside it) runs eagerly, said in stats and logs."""
        self.left_out[stage] = reason
        logger.warning("CUDA graphs: stage %s is not captured: %s", stage, reason)

    def freeze(self) -> None:
        self.frozen = True

    def run(self, stage: str, key: Hashable, fn: Callable[..., Outputs], inputs: Sequence[torch.Tensor],
            held: Sequence[torch.Tensor] = (), on_replay: Callable[[], None] | None = None) -> Outputs:
        """fn(*inputs, *held) through the stage's graph for `key`. `held`: tensors that are never written in place
        (a session's cached keys and values), copied into the graph only when a different tensor comes.
        `on_replay`: what a run of fn does besides its outputs (counters), done again on each replay.

        A key first seen after `freeze()` runs eagerly and is counted in `unwarmed_runs`: captures happen at
        warm-up only, so memory held by graphs stays what the warm-up took."""
        if stage in self.left_out:
            return fn(*inputs, *held)
        entry = self.graphs.get((stage, key))
        if entry is None and (not self.armed or self.frozen):
            if self.frozen:
                self.unwarmed_runs += 1
                logger.warning("stage %s for %r was not captured at warm-up: it runs without a CUDA graph", stage, key)
            return fn(*inputs, *held)
        if entry is None:  # a capture records kernels without running them: the replay below computes
            entry = self._capture(stage, key, fn, list(inputs) + list(held), len(held))
        else:
            for static, t in zip(entry.inputs, inputs):
                static.copy_(t, non_blocking=True)
            base = len(inputs)
            for i, t in enumerate(held):
                if entry.held_sources[i]() is not t:
                    entry.inputs[base + i].copy_(t, non_blocking=True)
                    entry.held_sources[i] = weakref.ref(t)
        entry.replay()
        entry.replays += 1
        if on_replay is not None:
            on_replay()
        return entry.outputs

    def _capture(self, stage: str, key: Hashable, fn: Callable[..., Outputs], tensors: list[torch.Tensor],
                 held: int) -> _Captured:
        _check_tensors(stage, tensors, self.device)
        start = time.perf_counter()
        static = [t.clone() for t in tensors]
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):  # lazy initialisation (cuBLAS workspaces, autotuning) happens outside capture
            fn(*static)
        torch.cuda.current_stream(self.device).wait_stream(side)
        torch.cuda.synchronize(self.device)
        with torch.cuda.stream(side):
            recorder = _capture_state.recorder = _Recorder(torch.cuda.graph_pool_handle())
            try:
                outputs = fn(*static)
                parts = recorder.finish()
            except BaseException:
                recorder.abandon()
                raise
            finally:
                _capture_state.recorder = None
        torch.cuda.current_stream(self.device).wait_stream(side)
        torch.cuda.synchronize(self.device)
        entry = _Captured(parts, static, [weakref.ref(t) for t in tensors[len(tensors) - held:]] if held else [],
                          outputs, time.perf_counter() - start)
        self.graphs[(stage, key)] = entry
        return entry

    def stats(self) -> dict:
        return {"enabled": True, "armed": self.armed, "frozen": self.frozen, "graphs": len(self.graphs),
                "unwarmed_runs": self.unwarmed_runs, "left_out": dict(self.left_out),
                "captured": sorted({stage for stage, _ in self.graphs}),
                "capture_s": round(sum(e.seconds for e in self.graphs.values()), 3),
                "replays": sum(e.replays for e in self.graphs.values()),
                # decisions between graph segments (no conditional nodes): per replay of each stage, and in all
                "host_decisions": {stage: e.branches for (stage, _), e in self.graphs.items() if e.branches},
                "host_reads": sum(e.host_reads for e in self.graphs.values())}
