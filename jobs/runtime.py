"""The job runtime shared by every training job: Ray Train V2 TorchTrainer + DeepSpeed ZeRO, checkpoints, resume,
per-step metrics (CSV, PNG, ray.train.report, ray.util.metrics) and a timeout around fit().

A job supplies a task builder, named "module:function" so workers can import it: `build_task(ctx: WorkerContext)`.
A task with one model defines `.model`, `.batch(i)` and `.loss(model, batch) -> (loss, extras)` (the runtime
supplies its train step); a task with several declares them and writes its own step (rtedit.train.runtime's
Task and MultiModelTask):

    def models(self) -> dict[str, ModelSpec]   # {"student": ModelSpec(s), "teacher": ModelSpec(t, trainable=False)}
    def train_step(self, engines, step) -> dict[str, float]   # forward, losses, backward, step; returns "loss", ...

Jobs run as `python -m jobs.<name> --config jobs/configs/<name>.yaml [--set run.max_steps=10 ...]` through `main`.
Resume: rerun with the same run.name and run.storage_path; Ray Train V2 finds the run snapshot and hands the last
checkpoint to the new workers (ray.train.get_checkpoint), as it does after a worker failure (run.max_failures).

Before anything else runs, `check_cluster_fits` compares the workers' resources with what the cluster has free (or,
on an autoscaling cluster, with what it can grow to) and raises ClusterTooSmall with the numbers: a job beside
`serve run` used to wait for CPUs Serve held until run.timeout_s.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import math
import os
import re
import shutil
import sys
import tempfile
import threading
import time
import typing
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import yaml

from rtedit.errors import ConfigError
from rtedit.config_parsing import to_dict
from rtedit.device import PRECISIONS
from rtedit.train.config import JobConfig, load_job_config
from rtedit.train.runtime import (MetricsLog, ModelSpec, MultiModelTask, Task, Trainable, build_engines,
                                  export_models, mean_over_workers, metrics_row, model_specs, progress_line,
                                  train_step_of)

logger = logging.getLogger("jobs.runtime")

REPO_ROOT = Path(__file__).resolve().parents[1]
MODELS_DIR = "models"  # DeepSpeed checkpoints, one tag per trainable model, inside every reported checkpoint
STATE_DIR = "runtime-state"  # per rank: the step and the task's own state_dict()
METRICS_CSV = "metrics.csv"
EXPORT_DIR = "export"
WORKERS_DIR = "workers"
__all__ = ["ModelSpec", "MultiModelTask", "Task", "WorkerContext", "main", "run"]  # what jobs import
PLACEMENT_SLACK = 1e-9  # fractional CPUs (0.5 + 0.5) must add up to a whole one
RESOURCES_SETTLE_S = 3.0  # the cluster's view of free resources lags a just-finished job's release (~1 s at most)


class ClusterTooSmall(RuntimeError):
    """The cluster cannot place the job's workers: not with what is free now on a fixed cluster, nor on any node an
    autoscaling cluster can add. Raised at start, before data preparation, with the numbers."""


@dataclass
class WorkerContext:
    """What a task builder gets on each worker."""

    config: JobConfig
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    precision: str
    dtype: torch.dtype

    def dataset_shard(self, name: str = "train"):
        """This worker's streaming split (a ray.data.DataIterator) of a Ray Dataset passed to run(datasets=...)."""
        import ray.train

        shard = ray.train.get_dataset_shard(name)
        if shard is None:
            raise ValueError(f"no dataset {name!r} reached the workers: pass datasets={{{name!r}: ...}} to run() "
                             "(or return it from the job's prepare())")
        return shard

    def dataset_batches(self, name: str = "train", batch_size: int | None = None,
                        **iter_kwargs: Any) -> Iterator[dict[str, torch.Tensor]]:
        """Batches of this worker's shard, epoch after epoch without end, for a train step to take with next().

        Defaults to run.batch_size rows; iter_kwargs go to DataIterator.iter_torch_batches. Ray Data keeps no read
        position in checkpoints: after a resume the stream starts a new epoch.
        """
        shard, size = self.dataset_shard(name), batch_size or self.config.run.batch_size

        def batches() -> Iterator[dict[str, torch.Tensor]]:
            while True:
                empty = True
                for batch in shard.iter_torch_batches(batch_size=size, **iter_kwargs):
                    empty = False
                    yield batch
                if empty:
                    raise ValueError(f"dataset {name!r} gave rank {self.rank} no batch of {size} rows")

        return batches()


def resolve_task(spec: str):
    """'package.module:function' -> the function (imported, so a typo fails on the driver, before workers)."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ConfigError(f"task must look like 'module:function', got {spec!r}")
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"task {spec!r} cannot be imported: {exc}") from exc


# ---------------------------------------------------------------------------------------------------------------
# Worker side


class _Exporter:
    """ray.util.metrics for the dashboard's Grafana panels: ray.train.report values never reach Prometheus.

    Every column but step and attempt_start is a gauge named rtedit_train_<column> ("lr/generator" becomes
    rtedit_train_lr_generator), created the first time the column has a finite value.
    """

    DESCRIPTIONS: typing.ClassVar[dict[str, str]] = {"loss": "Training loss (mean over workers)",
                                                     "samples_per_s": "Training samples per second, all workers"}

    def __init__(self, run_name: str):
        from ray.util.metrics import Counter

        from deployments.gauges import GaugeKeeper

        self.tags = {"run": run_name}
        self.gauges: dict[str, Any] = {}
        self.values: dict[str, float] = {}
        self.steps = Counter("rtedit_train_steps_total", description="Optimizer steps taken", tag_keys=("run",))
        self.keeper = GaugeKeeper(self._set_gauges, name="rtedit-train-gauges")  # logged rows can be minutes apart

    def update(self, row: dict[str, float]) -> None:
        from ray.util.metrics import Gauge

        for key, value in row.items():
            if key in ("step", "attempt_start") or not math.isfinite(value):
                continue
            if key not in self.gauges:
                self.gauges[key] = Gauge("rtedit_train_" + re.sub(r"[^A-Za-z0-9_]", "_", key), tag_keys=("run",),
                                         description=self.DESCRIPTIONS.get(key, f"Training {key} (mean over workers)"))
            self.values[key] = value
        self._set_gauges()
        self.steps.inc(1, tags=self.tags)

    def _set_gauges(self) -> None:
        for key, value in list(self.values.items()):
            self.gauges[key].set(value, tags=self.tags)


def _save_and_report(task, engines: dict[str, Any], trainables: list[Trainable], ctx: WorkerContext,
                     log: MetricsLog, step: int, final: bool, metrics: dict[str, Any]) -> None:
    """Every trainable model's DeepSpeed checkpoint (each rank writes its shards), the step and task state of each
    rank, metrics and the optional export, reported as one checkpoint."""
    import ray
    import ray.train

    with tempfile.TemporaryDirectory(prefix=f"rtedit-ckpt-{ctx.rank}-") as tmp:
        tmp = Path(tmp)
        for folder in (MODELS_DIR, STATE_DIR, WORKERS_DIR):
            (tmp / folder).mkdir()
        for model in trainables:  # we load by tag, so no "latest" file (the engines would overwrite each other's)
            model.engine.save_checkpoint(tmp / MODELS_DIR, tag=model.name, client_state={"step": step},
                                         save_latest=False)
        task_state = task.state_dict() if callable(getattr(task, "state_dict", None)) else {}
        torch.save({"step": step, "task": task_state}, tmp / STATE_DIR / f"rank-{ctx.rank}.pt")
        # Which node and process each rank ran on: the merged checkpoint shows how the run was placed.
        (tmp / WORKERS_DIR / f"rank-{ctx.rank}.json").write_text(json.dumps(
            {"rank": ctx.rank, "node_id": ray.get_runtime_context().get_node_id(), "pid": os.getpid(),
             "device": str(ctx.device), "precision": ctx.precision}))
        if ctx.rank == 0:
            log.write_csv(tmp / METRICS_CSV)
            (tmp / "job_config.yaml").write_text(yaml.safe_dump(to_dict(ctx.config), sort_keys=False))
        if final and hasattr(task, "export"):
            export_models(task, engines, trainables, ctx.rank, tmp / EXPORT_DIR)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))


def _resume(task, trainables: list[Trainable], ctx: WorkerContext) -> tuple[int, MetricsLog]:
    """Every trainable model, the step, the task's state and the metrics so far from the last checkpoint, if any."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return 0, MetricsLog()
    with checkpoint.as_directory() as folder:
        folder = Path(folder)
        for model in trainables:
            loaded, _ = model.engine.load_checkpoint(folder / MODELS_DIR, tag=model.name)
            if loaded is None:
                raise RuntimeError(f"checkpoint {folder} holds no state of model {model.name!r}")
        state_file = folder / STATE_DIR / f"rank-{ctx.rank}.pt"
        if not state_file.is_file():  # more workers than the run that wrote it: start from rank 0's state
            state_file = folder / STATE_DIR / "rank-0.pt"
        state = torch.load(state_file, weights_only=False)  # our own file: the task's state may be any picklable
        start = int(state["step"])
        if callable(getattr(task, "load_state_dict", None)):
            task.load_state_dict(state["task"])
        csv_file = folder / METRICS_CSV
        log = MetricsLog.read_csv(csv_file).upto(start) if csv_file.is_file() else MetricsLog()
    logger.info("rank %d resumed from a checkpoint at step %d", ctx.rank, start)
    return start, log


def _worker_context(config: JobConfig) -> WorkerContext:
    import ray.train

    train_ctx = ray.train.get_context()
    local_rank = train_ctx.get_local_rank()
    on_gpu = config.scaling.use_gpu
    device = torch.device("cuda", local_rank) if on_gpu else torch.device("cpu")
    if on_gpu:
        torch.cuda.set_device(device)
    precision = config.deepspeed.resolve_precision(on_gpu)
    return WorkerContext(config, train_ctx.get_world_rank(), train_ctx.get_world_size(), local_rank, device,
                         precision, PRECISIONS[precision])


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def local_worker_context(config: JobConfig) -> WorkerContext:
    """Rank 0 of 1 in this process, without Ray (a job's --local run): the process group single-process DeepSpeed
    needs (gloo on the CPU, nccl on a GPU), the device, the precision; torch seeded with run.seed."""
    import deepspeed

    for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": os.environ.get("MASTER_PORT") or str(_free_port())}.items():
        os.environ.setdefault(key, value)
    on_gpu = config.scaling.use_gpu
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if on_gpu else "cpu")
    device = torch.device("cuda", 0) if on_gpu else torch.device("cpu")
    if on_gpu:
        torch.cuda.set_device(device)
    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if on_gpu else "gloo")
    precision = config.deepspeed.resolve_precision(on_gpu)
    torch.manual_seed(config.run.seed)
    return WorkerContext(config, 0, 1, 0, device, precision, PRECISIONS[precision])


def timed_step(engines, trainables, train_step, step: int, config: JobConfig, device, samples_per_step: int,
               clock_offset: float, start: int) -> dict[str, Any]:
    """One step of either loop (a Ray Train worker's, run_local's): the rate each model uses this step, the task's
    step, and its metrics row; `clock_offset` + perf_counter() is the run's elapsed time across resumes."""
    t0 = time.perf_counter()
    lrs = {m.name: m.set_lr(step, config.run.max_steps) for m in trainables}
    updates_before = [m.engine.global_steps for m in trainables]
    values = mean_over_workers(train_step(engines, step), device)
    if config.scaling.use_gpu:
        torch.cuda.synchronize(device)
    dt = time.perf_counter() - t0
    # A model this step did not update has no gradient norm for it.
    norms = {m.name: m.grad_norm() if m.engine.global_steps > before else math.nan
             for m, before in zip(trainables, updates_before)}
    return metrics_row(step + 1, values, lrs, norms, samples_per_step / dt, dt, clock_offset + time.perf_counter(),
                       start)


LOCAL_CHECKPOINT = "local-checkpoint"


def fit_steps(max_steps: int, done: int, elapsed_s: float, step_s: float, budget_s: float) -> int:
    """The step count that ends a run near `budget_s` seconds of training, `done` steps in after `elapsed_s`, at
    `step_s` a step: never more than max_steps, never fewer than done + 1."""
    return max(done + 1, min(max_steps, done + int((budget_s - elapsed_s) / max(step_s, 1e-9))))


def run_local(config: JobConfig, task: str, max_train_s: float | None = None) -> dict[str, Any]:
    """A job's task on one process without Ray (a job's --local): single-process DeepSpeed on one device, the
    worker loop's steps, seeds, metrics and export (run.output_path()/export), a checkpoint every
    run.checkpoint_every steps in run.output_path()/local-checkpoint (the layout of a Ray checkpoint: one DeepSpeed
    tag per model, the step and task state), resumed from there when a rerun finds one.

    `max_train_s`: a time budget for the steps. At the end of the warmup (at least 20 steps in), run.max_steps is
    lowered, if need be, to the steps that fit the budget at the speed measured so far; the lr schedule after the
    warmup then follows the new count, and the export's config says it."""
    config.validate()
    ctx = local_worker_context(config)
    device, run = ctx.device, config.run
    built = resolve_task(task)(ctx)
    specs = model_specs(built)
    engines, trainables = build_engines(specs, config, device, ctx.dtype)
    accum = config.deepspeed.grad_accum_steps
    train_step = train_step_of(built, specs, accum)
    out = run.output_path()
    checkpoint = out / LOCAL_CHECKPOINT
    start, log = 0, MetricsLog()
    if (checkpoint / STATE_DIR / "rank-0.pt").is_file():
        for model in trainables:
            loaded, _ = model.engine.load_checkpoint(checkpoint / MODELS_DIR, tag=model.name)
            if loaded is None:
                raise RuntimeError(f"checkpoint {checkpoint} holds no state of model {model.name!r}")
        state = torch.load(checkpoint / STATE_DIR / "rank-0.pt", weights_only=False)  # our own file
        start = int(state["step"])
        if callable(getattr(built, "load_state_dict", None)):
            built.load_state_dict(state["task"])
        log = MetricsLog.read_csv(checkpoint / METRICS_CSV).upto(start)
        logger.info("resumed from %s at step %d", checkpoint, start)
    torch.manual_seed(run.seed + start)  # as rank 0 of train_loop: the same streams as a one-worker Ray run
    t_start = time.perf_counter()
    elapsed_before = log.rows[-1]["elapsed_s"] if log.rows else 0.0
    export = None
    fit_at = max(20, *(m.optimizer.warmup_steps for m in trainables)) if max_train_s else None
    step = start
    while step < run.max_steps:
        row = timed_step(engines, trainables, train_step, step, config, device, run.batch_size * accum,
                         elapsed_before - t_start, start)
        done = step = step + 1
        log.append(row)
        if fit_at is not None and done - start == fit_at:
            recent = [r["step_time_s"] for r in log.rows[-(fit_at // 2):]]  # past the first steps' warm-up
            fitted = fit_steps(run.max_steps, done, time.perf_counter() - t_start, sum(recent) / len(recent),
                               max_train_s)
            if fitted < run.max_steps:
                logger.info("run.max_steps %d -> %d: %.1f ms a step fits %.0f s of training", run.max_steps, fitted,
                            1000 * sum(recent) / len(recent), max_train_s)
                run.max_steps = fitted
        final = done == run.max_steps
        if final or done % run.checkpoint_every == 0:
            for folder in (MODELS_DIR, STATE_DIR):
                (checkpoint / folder).mkdir(parents=True, exist_ok=True)
            for model in trainables:
                model.engine.save_checkpoint(checkpoint / MODELS_DIR, tag=model.name, client_state={"step": done},
                                             save_latest=False)
            task_state = built.state_dict() if callable(getattr(built, "state_dict", None)) else {}
            torch.save({"step": done, "task": task_state}, checkpoint / STATE_DIR / "rank-0.pt")
            log.write_csv(checkpoint / METRICS_CSV)
        if final and hasattr(built, "export"):
            export = out / EXPORT_DIR
            shutil.rmtree(export, ignore_errors=True)  # an earlier, shorter run's export
            export_models(built, engines, trainables, 0, export)
        if final or done % run.log_every == 0 or done == start + 1:
            logger.info("%s", progress_line(row, run.max_steps))
    csv_path = log.write_csv(out / METRICS_CSV)
    png_path = log.plot(out / "metrics.png", title=f"{run.name}: {len(log.rows)} steps")
    return {"run": run.name, "start": start, "steps": len(log.rows), "loss": log.rows[-1]["loss"] if log.rows else None,
            "seconds": round(time.perf_counter() - t_start, 1), "metrics_csv": str(csv_path),
            "metrics_png": str(png_path), "export": str(export) if export else None}


def train_loop(loop_config: dict[str, Any]) -> None:
    """Runs on every Ray Train worker: build the task and its engines, resume, train, checkpoint."""
    import ray.train

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    config = JobConfig(**loop_config["config"])
    run = config.run
    ctx = _worker_context(config)
    torch.manual_seed(run.seed)  # identical initial weights on every rank
    task = resolve_task(loop_config["task"])(ctx)
    specs = model_specs(task)
    engines, trainables = build_engines(specs, config, ctx.device, ctx.dtype)
    accum = config.deepspeed.grad_accum_steps
    train_step = train_step_of(task, specs, accum)
    start, log = _resume(task, trainables, ctx)
    torch.manual_seed(run.seed + 1000 * ctx.rank + start)  # data/noise streams differ per rank and per resume point

    exporter = _Exporter(run.name) if ctx.rank == 0 else None
    samples_per_step = run.batch_size * accum * ctx.world_size
    t_start = time.perf_counter()
    elapsed_before = log.rows[-1]["elapsed_s"] if log.rows else 0.0
    for step in range(start, run.max_steps):
        row = timed_step(engines, trainables, train_step, step, config, ctx.device, samples_per_step,
                         elapsed_before - t_start, start)
        done = step + 1
        log.append(row)
        if exporter:
            exporter.update(row)
        final = done == run.max_steps
        if final or done % run.checkpoint_every == 0:
            _save_and_report(task, engines, trainables, ctx, log, done, final, {**row, "checkpoint": True})
        elif done % run.log_every == 0:
            ray.train.report({**row, "checkpoint": False})
        if ctx.rank == 0 and (final or done % run.log_every == 0 or done == start + 1):
            logger.info("%s", progress_line(row, run.max_steps))


# ---------------------------------------------------------------------------------------------------------------
# Driver side


@dataclass
class RunResult:
    metrics: dict[str, Any]
    checkpoint_path: str
    metrics_csv: Path
    metrics_png: Path
    export_dir: Path | None
    seconds: float
    workers: list[dict[str, Any]]


def fit_with_timeout(trainer, timeout_s: float):
    """trainer.fit() with a deadline: Ray Train has none, and a starved placement group waits forever."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["result"] = trainer.fit()
        except BaseException as exc:  # re-raised on the caller's thread below
            box["error"] = exc

    thread = threading.Thread(target=target, name="ray-train-fit", daemon=True)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        raise TimeoutError(f"fit() did not finish within run.timeout_s={timeout_s}s; ray.shutdown() stops its workers")
    if "error" in box:
        raise box["error"]
    return box["result"]


def worker_env(config: JobConfig) -> dict[str, str]:
    """Env vars for every worker: Ray Train V2 does not pass the driver's own variables on a real cluster."""
    env = {"DS_ACCELERATOR": "cuda" if config.scaling.use_gpu else "cpu"}
    path = os.environ.get("PYTHONPATH", "")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), path) if p)  # workers import jobs.*
    return env


def worker_resources(config: JobConfig) -> dict[str, float]:
    """What each Ray Train worker reserves (its placement-group bundle)."""
    resources = {"CPU": config.scaling.cpus_per_worker}
    if config.scaling.use_gpu:
        resources["GPU"] = config.scaling.gpus_per_worker
    return resources


def unplaced_workers(bundle: dict[str, float], num_workers: int, strategy: str,
                     free_per_node: list[dict[str, float]]) -> int:
    """How many of `num_workers` bundles find no room in the nodes' free resources under the placement `strategy`
    (0: all of them fit). PACK and SPREAD may split the workers over nodes, STRICT_PACK needs one node for all of
    them, STRICT_SPREAD a node each."""
    def fits(free: dict[str, float]) -> int:  # how many bundles one node holds
        return min(int(free.get(name, 0.0) / amount + PLACEMENT_SLACK) for name, amount in bundle.items())

    per_node = [fits(free) for free in free_per_node]
    if strategy == "STRICT_PACK":
        return 0 if any(n >= num_workers for n in per_node) else num_workers
    if strategy == "STRICT_SPREAD":
        return max(0, num_workers - sum(1 for n in per_node if n >= 1))
    return max(0, num_workers - sum(per_node))


def _amounts(resources: dict[str, float]) -> str:
    return ", ".join(f"{amount:g} {name}" for name, amount in resources.items())


def check_cluster_fits(config: JobConfig) -> None:
    """Raises ClusterTooSmall when the connected cluster cannot place the job's workers, so the job fails in seconds
    with the numbers instead of waiting out run.timeout_s (Ray Train waits for resources without end)."""
    from ray._private import state  # per-node resources and the autoscaler's limits, as Ray Train's own check reads

    bundle, num_workers = worker_resources(config), config.scaling.num_workers
    strategy = config.scaling.placement_strategy
    needed = {name: amount * num_workers for name, amount in bundle.items()}
    fix = ("lower scaling.num_workers or scaling.cpus_per_worker (e.g. --set scaling.num_workers=1), stop what holds "
           "them, or give Ray more logical CPUs (ray start --head --num-cpus N)")
    autoscaler_max = state.state.get_max_resources_from_cluster_config()
    if autoscaler_max:  # nodes come on demand: only what no node type can ever provide is refused now
        short = {name: autoscaler_max.get(name, 0) for name, amount in needed.items()
                 if amount > autoscaler_max.get(name, 0)}
        if short:
            raise ClusterTooSmall(f"the job needs {num_workers} worker(s) x {_amounts(bundle)} = {_amounts(needed)}; "
                                  f"this autoscaling cluster can grow to {_amounts(short)} at most: {fix}")
        return
    deadline = time.monotonic() + RESOURCES_SETTLE_S
    while True:
        free_per_node = list(state.available_resources_per_node().values())
        missing = unplaced_workers(bundle, num_workers, strategy, free_per_node)
        if not missing or time.monotonic() >= deadline:
            break
        time.sleep(0.5)
    if missing:
        totals = state.total_resources_per_node().values()
        total = {name: sum(node.get(name, 0.0) for node in totals) for name in bundle}
        free = {name: sum(node.get(name, 0.0) for node in free_per_node) for name in bundle}
        held = {name: total[name] - free[name] for name in bundle}
        raise ClusterTooSmall(
            f"the job needs {num_workers} worker(s) x {_amounts(bundle)} = {_amounts(needed)} ({strategy}), but the "
            f"cluster has {_amounts(total)} in all and {_amounts(free)} free on {len(free_per_node)} node(s), so "
            f"{missing} worker(s) could not start: other work (Serve replicas, other jobs) holds {_amounts(held)}; "
            f"{fix}")


def _storage_path(config: JobConfig) -> str:
    path = config.run.storage_path
    return path if "://" in path else str(Path(path).expanduser().resolve())


def run(config: JobConfig, task: str, datasets: dict[str, Any] | None = None) -> RunResult:
    """Validate, train on Ray Train workers, then write metrics.csv, metrics.png and the export beside the run."""
    import ray.train
    from ray.train.torch import TorchTrainer

    config.validate()
    resolve_task(task)
    check_cluster_fits(config)
    if config.scaling.use_gpu and "DS_ACCELERATOR" not in os.environ:
        os.environ["DS_ACCELERATOR"] = "cuda"
    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # the driver may import deepspeed too (checkpoint tools)
    resources = worker_resources(config)
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"config": _sections(config), "task": task},
        scaling_config=ray.train.ScalingConfig(num_workers=config.scaling.num_workers, use_gpu=config.scaling.use_gpu,
                                               resources_per_worker=resources,
                                               placement_strategy=config.scaling.placement_strategy),
        run_config=ray.train.RunConfig(
            name=config.run.name, storage_path=_storage_path(config),
            failure_config=ray.train.FailureConfig(max_failures=config.run.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=config.run.num_to_keep),
            worker_runtime_env={"env_vars": worker_env(config)}),
        datasets=datasets,
    )
    start = time.perf_counter()
    result = fit_with_timeout(trainer, config.run.timeout_s)
    if result.error is not None:
        raise result.error
    seconds = time.perf_counter() - start
    out = config.run.output_path()
    out.mkdir(parents=True, exist_ok=True)
    export = None
    with result.checkpoint.as_directory() as folder:
        log = MetricsLog.read_csv(Path(folder) / METRICS_CSV)
        workers = [json.loads(p.read_text()) for p in sorted((Path(folder) / WORKERS_DIR).glob("rank-*.json"))]
        if (Path(folder) / EXPORT_DIR).is_dir():
            export = out / EXPORT_DIR
            shutil.rmtree(export, ignore_errors=True)
            shutil.copytree(Path(folder) / EXPORT_DIR, export)
    csv_path = log.write_csv(out / METRICS_CSV)
    png_path = log.plot(out / "metrics.png", title=f"{config.run.name}: {len(log.rows)} steps")
    logger.info("run %s done in %.1fs: %s, %s", config.run.name, seconds, csv_path, png_path)
    return RunResult(dict(result.metrics), result.checkpoint.path, csv_path, png_path, export, seconds, workers)


def _sections(config: JobConfig) -> dict[str, Any]:
    """The config as dataclass sections (picklable, no re-validation needed on workers)."""
    return {"run": config.run, "scaling": config.scaling, "deepspeed": config.deepspeed,
            "optimizer": config.optimizer, "models": config.models, "task": config.task}


def main(task: str, argv: list[str] | None = None, description: str = "",
         prepare: Callable[[JobConfig], dict[str, Any] | None] | None = None) -> RunResult:
    """CLI of every training job: --config YAML, --set overrides, --address of a running cluster.

    `prepare(config)` runs on the driver once Ray is up and before any worker starts (precomputing data, say);
    the Ray Datasets it returns, if any, reach the workers (WorkerContext.dataset_batches).
    """
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", required=True, type=Path, help="job YAML under jobs/configs/")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set run.max_steps=10 (repeatable)")
    parser.add_argument("--address", default=None,
                        help="Ray cluster address; default $RAY_ADDRESS (ray job submit sets it), else a local one")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    config = load_job_config(args.config, args.set)  # validated before any worker starts
    resolve_task(task)

    import ray

    address = args.address or os.environ.get("RAY_ADDRESS")
    ray.init(address=address or "local", log_to_driver=True)
    try:
        check_cluster_fits(config)  # before prepare(), which may take minutes
        datasets = prepare(config) if prepare is not None else None
        result = run(config, task, datasets=datasets)
    except ClusterTooSmall as exc:
        raise SystemExit(f"{type(exc).__name__}: {exc}") from None  # the numbers, not a traceback
    finally:
        ray.shutdown()
    print(json.dumps({"run": config.run.name, "steps": int(result.metrics.get("step", 0)),
                      "loss": result.metrics.get("loss"), "seconds": round(result.seconds, 1),
                      "metrics_csv": str(result.metrics_csv), "metrics_png": str(result.metrics_png),
                      "export": str(result.export_dir) if result.export_dir else None}))
    return result


if __name__ == "__main__":
    sys.exit("run a job module instead, e.g. python -m jobs.train_tiny --config jobs/configs/tiny.yaml")
