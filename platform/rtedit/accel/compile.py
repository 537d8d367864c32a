"""Selective torch.compile: the transformer's repeated blocks, the VAE encoder and the VAE decoder, one branch each.

Each branch compiles through `nn.Module.compile` (the transformer through diffusers' `compile_repeated_blocks`,
so 5 + 20 klein blocks share two graphs per shape). A branch whose compile or compiled run raises drops to eager
alone: its modules lose their compiled call, the failing call is re-run eagerly, the reason is logged and kept in
`stats()`, and the other branches stay compiled. If the eager re-run raises too, the error was not the compiler's:
the branch stays compiled and the eager error propagates.

Recompiles are counted per branch by wrapping the compiler backend: dynamo calls the backend once per graph it
compiles, so every compile and recompile of our regions passes through the counter, and nothing else's does.

Shapes: static (`dynamic=False`). Requests are resized into configured buckets (rtedit.config.ShapeBuckets), so
compiled regions only ever see bucket shapes; each bucket gets its own static graph (best kernels, CUDA graphs
possible) and `warm_up(buckets, run)` compiles all of them at start-up, twice over, checking the second pass
compiles nothing. A request in a warmed bucket then never compiles; a shape outside them would (and is counted).
The dynamo recompile limit is raised to cover every bucket, and hitting it raises instead of silently running
eagerly (`fail_on_recompile_limit_hit`), which the branch guard records.

The Editor compiles after attention selection and DBCache and warms every bucket at once
(rtedit.fast_path.build); odd-sized references run eagerly inside `regions.eager("vae_encoder")`,
and `Editor.stats()["compile"]` is `regions.stats()` (the benchmark asserts every `recompiles` is 0 after warm-up).
Changing the attention backend after warm-up (a serving fallback) changes guarded state and recompiles.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from rtedit.errors import ConfigError

logger = logging.getLogger(__name__)

BRANCHES = ("transformer", "vae_encoder", "vae_decoder")
MODES = (None, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
_COMMON_BACKENDS = {"inductor", "eager", "aot_eager", "cudagraphs"}  # checkable without importing dynamo (seconds)


def _dynamo_backends() -> set[str]:
    from torch._dynamo.backends.registry import list_backends  # imported on use: rtedit.config imports this module

    return set(list_backends(exclude_tags=()))


@dataclass
class CompileConfig:
    """Which regions to compile, and how."""

    enabled: bool = True
    transformer: bool = True  # the repeated transformer blocks (diffusers compile_repeated_blocks)
    vae_encoder: bool = True
    vae_decoder: bool = True
    backend: str = "inductor"  # any torch._dynamo backend name; CPU tests use "eager" or "aot_eager"
    mode: str | None = None  # inductor mode; "reduce-overhead" (CUDA graphs) does not mix with DBCache residuals
    fullgraph: bool = True  # a graph break is a failure of that branch, not a silent split
    branch_backends: dict[str, str] = field(default_factory=dict)  # per-branch backend, e.g. {"vae_decoder": "eager"}
    recompile_limit: int = 64  # dynamo graphs per code object; must cover every bucket of every compiled class

    def validate(self) -> "CompileConfig":
        for name in ("enabled", "transformer", "vae_encoder", "vae_decoder", "fullgraph"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"compile.{name} must be a bool, got {getattr(self, name)!r}")
        if not isinstance(self.branch_backends, dict) or set(self.branch_backends) - set(BRANCHES):
            raise ConfigError(f"compile.branch_backends keys must be among {BRANCHES}, got {self.branch_backends!r}")
        for where, backend in [("backend", self.backend)] + [(f"branch_backends.{k}", v)
                                                            for k, v in self.branch_backends.items()]:
            if not isinstance(backend, str) or (backend not in _COMMON_BACKENDS and backend not in _dynamo_backends()):
                raise ConfigError(f"compile.{where} must be a torch._dynamo backend name, got {backend!r}")
        if self.mode not in MODES:
            raise ConfigError(f"compile.mode must be one of {MODES}, got {self.mode!r}")
        if self.mode not in (None, "default") and self.backend != "inductor":
            raise ConfigError(f"compile.mode={self.mode!r} only applies to the inductor backend, got {self.backend!r}")
        if isinstance(self.recompile_limit, bool) or not isinstance(self.recompile_limit, int) \
                or self.recompile_limit < 1:
            raise ConfigError(f"compile.recompile_limit must be an integer >= 1, got {self.recompile_limit!r}")
        return self


@dataclass
class _Branch:
    name: str
    backend: str
    modules: list[torch.nn.Module] = field(default_factory=list)
    compiled_calls: list[Callable] = field(default_factory=list)  # each module's compiled call, kept to restore
    state: str = "off"  # "compiled", "eager" (dropped after a failure) or "off" (not configured / no module)
    compiles: int = 0  # graphs the backend compiled for this branch (first compiles and recompiles)
    warm_compiles: int | None = None  # `compiles` when warm-up finished
    failure: str | None = None
    failed_at: float | None = None

    def stats(self) -> dict[str, Any]:
        return {
            "state": self.state,
            "backend": self.backend,
            "modules": len(self.modules),
            "compiles": self.compiles,
            "recompiles": None if self.warm_compiles is None else self.compiles - self.warm_compiles,
            "failure": self.failure,
        }


class _CountingBackend:
    """A dynamo backend that counts the graphs it compiles for one branch, then hands them to the real backend."""

    def __init__(self, branch: _Branch, backend: str, mode: str | None):
        from torch._dynamo.backends.registry import lookup_backend

        self.branch = branch
        self.inner = lookup_backend(backend)
        # torch.compile turns mode into inductor config patches; a backend object has to pass them itself.
        self.kwargs = {"config_patches": torch._inductor.list_mode_options(mode)} \
            if backend == "inductor" and mode not in (None, "default") else {}
        self.__name__ = f"rtedit_{branch.name}_{backend}"

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list) -> Callable:
        self.branch.compiles += 1
        return self.inner(gm, example_inputs, **self.kwargs)


class CompiledRegions:
    """The compiled branches of one editor, with their eager fallbacks, warm-up and recompile counts."""

    def __init__(self, config: CompileConfig, transformer: torch.nn.Module | None = None,
                 vae_encoder: torch.nn.Module | None = None, vae_decoder: torch.nn.Module | None = None):
        self.config = config.validate()
        self.buckets = 0
        self.warm_up_s: float | None = None
        self.branches = {name: _Branch(name, config.branch_backends.get(name, config.backend)) for name in BRANCHES}
        if not config.enabled:
            return
        self._raise_recompile_limit(config.recompile_limit)
        targets = {"transformer": transformer, "vae_encoder": vae_encoder, "vae_decoder": vae_decoder}
        for name, module in targets.items():
            if module is None or not getattr(config, name):
                continue
            branch = self.branches[name]
            try:
                self._compile(branch, module)
            except Exception as exc:  # torch.compile is lazy, so this is rare: a bad option or a missing backend
                self._drop(branch, exc)

    def _compile(self, branch: _Branch, module: torch.nn.Module) -> None:
        backend = _CountingBackend(branch, branch.backend, self.config.mode)
        options = {"backend": backend, "fullgraph": self.config.fullgraph, "dynamic": False}
        if branch.name == "transformer":
            if not getattr(module, "_repeated_blocks", None):
                raise ConfigError(f"{type(module).__name__} declares no _repeated_blocks to compile")
            module.compile_repeated_blocks(**options)
            repeated = set(module._repeated_blocks)
            branch.modules = [m for m in module.modules() if type(m).__name__ in repeated]
        else:
            module.compile(**options)
            branch.modules = [module]
        for mod in branch.modules:
            # nn.Module.__call__ runs _compiled_call_impl when set; wrapping it catches compile and run failures.
            branch.compiled_calls.append(mod._compiled_call_impl)
            mod._compiled_call_impl = self._guarded(branch, mod, mod._compiled_call_impl)
        branch.state = "compiled"

    def _guarded(self, branch: _Branch, module: torch.nn.Module, compiled: Callable) -> Callable:
        def call(*args, **kwargs):
            try:
                return compiled(*args, **kwargs)
            except Exception as exc:
                self._set_eager(branch)
                try:
                    result = module(*args, **kwargs)
                except Exception:
                    self._set_compiled(branch)  # eager fails too: the input is at fault, not the compiler
                    raise
                self._drop(branch, exc)
                return result

        return call

    def _set_eager(self, branch: _Branch) -> None:
        for mod in branch.modules:
            mod._compiled_call_impl = None

    def _set_compiled(self, branch: _Branch) -> None:
        for mod, compiled in zip(branch.modules, branch.compiled_calls):
            mod._compiled_call_impl = self._guarded(branch, mod, compiled)

    def _drop(self, branch: _Branch, exc: BaseException) -> None:
        self._set_eager(branch)
        branch.state = "eager"
        # dynamo's messages run to many lines (the inner error comes after the first); keep one bounded line.
        branch.failure = f"{type(exc).__name__}: {' '.join(str(exc).split())[:400]}"
        branch.failed_at = time.time()
        logger.error("torch.compile of %s failed (%s); that branch runs eagerly from now on, the others stay "
                     "compiled", branch.name, branch.failure)

    @staticmethod
    def _raise_recompile_limit(limit: int) -> None:
        config = torch._dynamo.config
        config.recompile_limit = max(config.recompile_limit, limit)
        config.accumulated_recompile_limit = max(config.accumulated_recompile_limit, 4 * limit)
        if hasattr(config, "fail_on_recompile_limit_hit"):
            # Past the limit dynamo would run the frame eagerly without a word; make it raise into the branch guard.
            config.fail_on_recompile_limit_hit = True

    @contextlib.contextmanager
    def eager(self, branch: str) -> Iterator[None]:
        """Runs one branch eagerly inside the block (reference images of odd sizes), compiled again after."""
        if branch not in self.branches:
            raise ConfigError(f"unknown compile branch {branch!r}; branches: {BRANCHES}")
        b = self.branches[branch]
        if b.state != "compiled":
            yield
            return
        self._set_eager(b)
        try:
            yield
        finally:
            if b.state == "compiled":
                self._set_compiled(b)

    def warm_up(self, buckets: Sequence[Any], run: Callable[[Any], Any], passes: int = 2) -> dict[str, Any]:
        """Runs run(bucket) for every bucket, `passes` times; compiles happen in the first pass only.

        Afterwards `stats()["branches"][name]["recompiles"]` counts compiles since warm-up: 0 while every request
        falls in a warmed bucket. A second pass that still compiles means guards on something that changes per
        call; it is logged and reported as `repeat_compiles`.
        """
        if isinstance(passes, bool) or not isinstance(passes, int) or passes < 1:
            raise ConfigError(f"passes must be an integer >= 1, got {passes!r}")
        buckets = list(buckets)
        if not buckets:
            raise ConfigError("warm_up needs at least one bucket")
        per_class = max(1, len({type(m) for m in self.branches["transformer"].modules}))
        if len(buckets) * per_class > torch._dynamo.config.recompile_limit:
            raise ConfigError(f"{len(buckets)} buckets need {len(buckets) * per_class} graphs per compiled code "
                              f"object, above compile.recompile_limit={torch._dynamo.config.recompile_limit}")
        start = time.perf_counter()
        first = {n: b.compiles for n, b in self.branches.items()}
        repeat: dict[str, int] = {n: 0 for n in self.branches}
        for index in range(passes):
            before = {n: b.compiles for n, b in self.branches.items()}
            for bucket in buckets:
                run(bucket)
            if index > 0:
                for n, b in self.branches.items():
                    repeat[n] += b.compiles - before[n]
        for n, count in repeat.items():
            if count:
                logger.error("compile branch %s compiled %d graph(s) on a repeated warm-up pass", n, count)
        for b in self.branches.values():
            b.warm_compiles = b.compiles
        self.buckets = len(buckets)
        self.warm_up_s = time.perf_counter() - start
        return {"buckets": len(buckets), "seconds": self.warm_up_s,
                "compiles": {n: b.compiles - first[n] for n, b in self.branches.items()}, "repeat_compiles": repeat}

    def stats(self) -> dict[str, Any]:
        return {
            "enabled": self.config.enabled,
            "backend": self.config.backend,
            "mode": self.config.mode,
            "warm": self.warm_up_s is not None,
            "buckets": self.buckets,
            "warm_up_s": self.warm_up_s,
            "branches": {n: b.stats() for n, b in self.branches.items()},
        }


def compile_regions(config: CompileConfig | None = None, *, transformer: torch.nn.Module | None = None,
                    vae_encoder: torch.nn.Module | None = None,
                    vae_decoder: torch.nn.Module | None = None) -> CompiledRegions:
    """Compiles the given modules, each as its own branch; modules left as None are not compiled."""
    return CompiledRegions(config or CompileConfig(), transformer, vae_encoder, vae_decoder)
