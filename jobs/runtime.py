"""The job runtime shared by every training job: Ray Train V2 TorchTrainer + DeepSpeed ZeRO, checkpoints, resume,
per-step metrics (CSV, PNG, ray.util.metrics) and a timeout around fit().

A job supplies a task builder, named "module:function" so workers can import it:

    def build_task(ctx: WorkerContext) -> Task    # Task: .model, .batch(i), .loss(model, batch), optional .export

and runs `python -m jobs.<name> --config jobs/configs/<name>.yaml [--set run.max_steps=10 ...]` through `main`.
Resume: rerun with the same run.name and run.storage_path; Ray Train V2 finds the run snapshot and hands the last
checkpoint to the new workers (ray.train.get_checkpoint), as it does after a worker failure (run.max_failures).
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import math
import os
import shutil
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol

import torch
import yaml

from rtedit.errors import ConfigError
from rtedit.config_parsing import to_dict
from rtedit.train.config import JobConfig, load_job_config
from rtedit.train.runtime import (MetricsLog, build_optimizer, deepspeed_config, dtype_of, lr_multiplier,
                                  progress_line)

logger = logging.getLogger("jobs.runtime")

REPO_ROOT = Path(__file__).resolve().parents[1]
CKPT_TAG = "state"  # DeepSpeed checkpoint tag inside every reported checkpoint folder
METRICS_CSV = "metrics.csv"
EXPORT_DIR = "export"
WORKERS_DIR = "workers"


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
        """This worker's streaming split of a Ray Dataset passed to run(datasets=...)."""
        import ray.train

        return ray.train.get_dataset_shard(name)


class Task(Protocol):
    model: torch.nn.Module

    def batch(self, index: int) -> Any:
        """Micro-batch `index` (0-based, counted across resumes) for this worker."""

    def loss(self, model: torch.nn.Module, batch: Any) -> tuple[torch.Tensor, dict[str, float]]:
        """Forward pass: the scalar loss to backpropagate and extra values to log."""


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
    """ray.util.metrics for the dashboard's Grafana panels: ray.train.report values never reach Prometheus."""

    def __init__(self, run_name: str):
        from ray.util.metrics import Counter, Gauge

        self.tags = {"run": run_name}
        self.loss = Gauge("rtedit_train_loss", description="Training loss (mean over workers)", tag_keys=("run",))
        self.throughput = Gauge("rtedit_train_samples_per_s", description="Training samples per second, all workers",
                                tag_keys=("run",))
        self.steps = Counter("rtedit_train_steps_total", description="Optimizer steps taken", tag_keys=("run",))

    def update(self, row: dict[str, float]) -> None:
        if math.isfinite(row["loss"]):
            self.loss.set(row["loss"], tags=self.tags)
        self.throughput.set(row["samples_per_s"], tags=self.tags)
        self.steps.inc(1, tags=self.tags)


def _grad_norm(engine) -> float:
    norm = engine.get_global_grad_norm()
    if norm is None:
        return float("nan")
    return float(norm.item() if torch.is_tensor(norm) else norm)


def _gathered(engine, zero_stage: int):
    """Full parameters on every rank for the duration of the block (ZeRO-3 partitions them)."""
    import contextlib

    if zero_stage != 3:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(list(engine.module.parameters()), modifier_rank=None)


def _save_and_report(engine, task, ctx: WorkerContext, log: MetricsLog, step: int, final: bool,
                     metrics: dict[str, Any]) -> None:
    """DeepSpeed checkpoint (every rank writes its shard) + metrics + optional export, reported as one checkpoint."""
    import ray
    import ray.train

    with tempfile.TemporaryDirectory(prefix=f"rtedit-ckpt-{ctx.rank}-") as tmp:
        engine.save_checkpoint(tmp, tag=CKPT_TAG, client_state={"step": step})
        # Which node and process each rank ran on: the merged checkpoint shows how the run was placed.
        (Path(tmp) / WORKERS_DIR).mkdir(exist_ok=True)
        (Path(tmp) / WORKERS_DIR / f"rank-{ctx.rank}.json").write_text(json.dumps(
            {"rank": ctx.rank, "node_id": ray.get_runtime_context().get_node_id(), "pid": os.getpid(),
             "device": str(ctx.device), "precision": ctx.precision}))
        if ctx.rank == 0:
            log.write_csv(Path(tmp) / METRICS_CSV)
            (Path(tmp) / "job_config.yaml").write_text(yaml.safe_dump(to_dict(ctx.config), sort_keys=False))
        if final and hasattr(task, "export"):
            with _gathered(engine, ctx.config.deepspeed.zero_stage):
                if ctx.rank == 0:
                    task.export(engine.module, Path(tmp) / EXPORT_DIR)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))


def train_loop(loop_config: dict[str, Any]) -> None:
    """Runs on every Ray Train worker: build the task, wrap it in DeepSpeed, resume, train, checkpoint."""
    import deepspeed
    import ray.train
    import torch.distributed as dist

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    config = JobConfig(**loop_config["config"])
    run = config.run
    train_ctx = ray.train.get_context()
    rank, world = train_ctx.get_world_rank(), train_ctx.get_world_size()
    local_rank = train_ctx.get_local_rank()
    on_gpu = config.scaling.use_gpu
    device = torch.device("cuda", local_rank) if on_gpu else torch.device("cpu")
    if on_gpu:
        torch.cuda.set_device(device)
    precision = config.deepspeed.resolve_precision(on_gpu)
    ctx = WorkerContext(config, rank, world, local_rank, device, precision, dtype_of(precision))

    torch.manual_seed(run.seed)  # identical initial weights on every rank
    task = resolve_task(loop_config["task"])(ctx)
    optimizer = build_optimizer(task.model.parameters(), config.optimizer)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_multiplier(s, config.optimizer, run.max_steps))
    engine, _, _, _ = deepspeed.initialize(model=task.model, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=deepspeed_config(config, on_gpu))

    start, log = 0, MetricsLog()
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            _, client_state = engine.load_checkpoint(folder, tag=CKPT_TAG)
            start = int(client_state["step"])
            if (Path(folder) / METRICS_CSV).is_file():
                log = MetricsLog.read_csv(Path(folder) / METRICS_CSV).upto(start)
        logger.info("rank %d resumed from a checkpoint at step %d", rank, start)
    torch.manual_seed(run.seed + 1000 * rank + start)  # data/noise streams differ per rank and per resume point

    exporter = _Exporter(run.name) if rank == 0 else None
    accum = config.deepspeed.grad_accum_steps
    samples_per_step = run.batch_size * accum * world
    t_start = time.perf_counter()
    elapsed_before = log.rows[-1]["elapsed_s"] if log.rows else 0.0
    for step in range(start, run.max_steps):
        t0 = time.perf_counter()
        lr = engine.get_lr()[0]  # the rate this step uses (the scheduler moves on inside engine.step)
        losses = []
        for micro in range(accum):
            batch = task.batch(step * accum + micro)
            loss, _extra = task.loss(engine, batch)
            engine.backward(loss)
            engine.step()
            losses.append(loss.detach().float())
        mean_loss = torch.stack(losses).mean()
        reduced = mean_loss.to(device).clone()
        dist.all_reduce(reduced, op=dist.ReduceOp.SUM)
        if on_gpu:
            torch.cuda.synchronize(device)
        dt = time.perf_counter() - t0
        done = step + 1
        row = {"step": done, "loss": reduced.item() / world, "lr": lr, "grad_norm": _grad_norm(engine),
               "samples_per_s": samples_per_step / dt, "step_time_s": dt,
               "elapsed_s": elapsed_before + time.perf_counter() - t_start, "attempt_start": start}
        log.append(row)
        if exporter:
            exporter.update(row)
        final = done == run.max_steps
        if final or done % run.checkpoint_every == 0:
            _save_and_report(engine, task, ctx, log, done, final, {**row, "checkpoint": True})
        elif done % run.log_every == 0:
            ray.train.report({**row, "checkpoint": False})
        if rank == 0 and (final or done % run.log_every == 0 or done == start + 1):
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


def _storage_path(config: JobConfig) -> str:
    path = config.run.storage_path
    return path if "://" in path else str(Path(path).expanduser().resolve())


def run(config: JobConfig, task: str, datasets: dict[str, Any] | None = None) -> RunResult:
    """Validate, train on Ray Train workers, then write metrics.csv, metrics.png and the export beside the run."""
    import ray.train
    from ray.train.torch import TorchTrainer

    config.validate()
    resolve_task(task)
    if config.scaling.use_gpu and "DS_ACCELERATOR" not in os.environ:
        os.environ["DS_ACCELERATOR"] = "cuda"
    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # the driver may import deepspeed too (checkpoint tools)
    resources = {"CPU": config.scaling.cpus_per_worker}
    if config.scaling.use_gpu:
        resources["GPU"] = config.scaling.gpus_per_worker
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
            "optimizer": config.optimizer, "task": config.task}


def main(task: str, argv: list[str] | None = None, description: str = "",
         prepare: Callable[[JobConfig], None] | None = None) -> RunResult:
    """CLI of every training job: --config YAML, --set overrides, --address of a running cluster.

    `prepare(config)` runs on the driver once Ray is up and before any worker starts (precomputing data, say).
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
        if prepare is not None:
            prepare(config)
        result = run(config, task)
    finally:
        ray.shutdown()
    print(json.dumps({"run": config.run.name, "steps": int(result.metrics.get("step", 0)),
                      "loss": result.metrics.get("loss"), "seconds": round(result.seconds, 1),
                      "metrics_csv": str(result.metrics_csv), "metrics_png": str(result.metrics_png),
                      "export": str(result.export_dir) if result.export_dir else None}))
    return result


if __name__ == "__main__":
    sys.exit("run a job module instead, e.g. python -m jobs.train_tiny --config jobs/configs/tiny.yaml")
