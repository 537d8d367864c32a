"""Ray-free pieces of the job runtime: the models a task declares, the default train step of single-model tasks,
optimizer, lr schedule, DeepSpeed config, the per-step metrics row and log.

jobs/runtime.py wires these into Ray Train; keeping them here lets them be tested without a cluster.
"""

from __future__ import annotations

import contextlib
import csv
import logging
import math
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from rtedit.errors import ConfigError
from rtedit.train.config import JobConfig, OptimizerConfig

logger = logging.getLogger(__name__)

METRIC_FIELDS = ("step", "loss", "lr", "grad_norm", "samples_per_s", "step_time_s", "elapsed_s", "attempt_start")
"""The columns every run logs, in this order; whatever else a train step returns follows them."""
INT_FIELDS = ("step", "attempt_start")
SINGLE_MODEL = "model"
"""The name of the one model of a task that defines only `model`, `batch` and `loss`."""
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")


# ---------------------------------------------------------------------------------------------------------------
# The task interface


@dataclass
class ModelSpec:
    """One model a task declares. A trainable one gets its own optimizer, lr schedule and DeepSpeed engine; a frozen
    one is moved to the device and job dtype, put in eval mode with requires_grad off, and passed as is."""

    module: torch.nn.Module
    trainable: bool = True
    zero_stage: int | None = None
    """ZeRO stage of this model's engine: models.<name>.zero_stage in the job config wins, default deepspeed's."""
    optimizer: dict[str, Any] = field(default_factory=dict)
    """Fields of the job's `optimizer` section that differ for this model (models.<name>.optimizer wins)."""


class Task(Protocol):
    """A task with one model: the runtime's default train step runs grad_accum_steps micro-batches through loss."""

    model: torch.nn.Module

    def batch(self, index: int) -> Any:
        """Micro-batch `index` (0-based, counted across resumes) for this worker."""

    def loss(self, model: torch.nn.Module, batch: Any) -> tuple[torch.Tensor, dict[str, float]]:
        """Forward pass: the scalar loss to backpropagate and extra values to log (columns of metrics.csv)."""

    # Optional: export(model, folder) on rank 0 after the last step; state_dict()/load_state_dict(state) for
    # counters that must survive a resume (saved per rank with every checkpoint).


class MultiModelTask(Protocol):
    """A task with several models (distillation, reward model, DMD's generator + fake score) and its own step."""

    def models(self) -> dict[str, ModelSpec]:
        """Every model by name; trainable ones become DeepSpeed engines, frozen ones stay modules."""

    def train_step(self, engines: Mapping[str, Any], step: int) -> dict[str, float]:
        """One job step (0-based): forward, losses, engines[name].backward(loss) and .step() of the models this
        step updates (a model may skip steps), and the values to log: "loss" (the total or main loss) and any
        others, each averaged over workers. deepspeed.grad_accum_steps applies to every engine: an engine steps
        its optimizer on every grad_accum_steps-th .step() call."""

    # Optional: export(models, folder) with every model unwrapped (ZeRO-3 gathered), state_dict/load_state_dict.


def model_specs(task: Any) -> dict[str, ModelSpec]:
    """The task's models(), or {"model": ModelSpec(task.model)} for a task that defines only `model`."""
    specs = task.models() if callable(getattr(task, "models", None)) else {SINGLE_MODEL: ModelSpec(task.model)}
    for name, spec in specs.items():
        if not _NAME.fullmatch(name):  # names become checkpoint folders and metric columns
            raise ValueError(f"model name {name!r} must be letters, digits, '_', '.' or '-'")
        if not isinstance(spec, ModelSpec) or not isinstance(spec.module, torch.nn.Module):
            raise TypeError(f"models()[{name!r}] must be a ModelSpec of a torch.nn.Module, got {spec!r}")
    if not any(s.trainable for s in specs.values()):
        raise ValueError(f"a task needs at least one trainable model, got {sorted(specs)}")
    return specs


def train_step_of(task: Any, specs: Mapping[str, ModelSpec], accum: int) -> Callable[[Mapping[str, Any], int], dict]:
    """The task's own train_step, or the default one for a task whose only model is "model"."""
    if callable(getattr(task, "train_step", None)):
        return task.train_step
    if list(specs) != [SINGLE_MODEL]:
        raise TypeError(f"a task with models {sorted(specs)} must define train_step(engines, step)")
    return default_train_step(task, accum)


def default_train_step(task: Any, accum: int) -> Callable[[Mapping[str, Any], int], dict[str, Any]]:
    """The train_step of a task with one model: `accum` micro-batches of task.batch/task.loss, one optimizer step."""

    def train_step(engines: Mapping[str, Any], step: int) -> dict[str, Any]:
        engine = engines[SINGLE_MODEL]
        losses, extras = [], {}
        for micro in range(accum):
            loss, extra = task.loss(engine, task.batch(step * accum + micro))
            engine.backward(loss)
            engine.step()  # DeepSpeed steps the optimizer and zeroes the grads at the last micro-batch only
            losses.append(loss.detach().float())
            for key, value in extra.items():
                extras.setdefault(key, []).append(float(value))
        return {"loss": torch.stack(losses).mean(), **{k: sum(v) / len(v) for k, v in extras.items()}}

    return train_step


# ---------------------------------------------------------------------------------------------------------------
# Engines: one per trainable model


def freeze(module: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """A frozen model as train steps see it: on the device, in the job dtype, eval mode, no gradients."""
    return module.to(device, dtype).eval().requires_grad_(False)


@dataclass
class Trainable:
    """One trainable model: its DeepSpeed engine and the optimizer settings its lr schedule follows."""

    name: str
    engine: Any
    optimizer: OptimizerConfig
    zero_stage: int

    def set_lr(self, step: int, max_steps: int) -> float:
        """Set and return the rate of job step `step` (set each step: nothing to checkpoint or restore)."""
        lr = lr_at(step, self.optimizer, max_steps)
        for group in self.engine.optimizer.param_groups:
            group["lr"] = lr
        return lr

    def grad_norm(self) -> float:
        norm = self.engine.get_global_grad_norm()
        if norm is None:
            return float("nan")
        return float(norm.item() if torch.is_tensor(norm) else norm)


def build_engines(specs: dict[str, ModelSpec], config: JobConfig, device: torch.device,
                  dtype: torch.dtype) -> tuple[dict[str, Any], list[Trainable]]:
    """A DeepSpeed engine (own optimizer, ZeRO stage) per trainable model; frozen ones on the device as they are."""
    import deepspeed

    unknown = sorted(set(config.models) - {name for name, spec in specs.items() if spec.trainable})
    if unknown:
        raise ConfigError(f"models.{unknown[0]}: the task trains no model of that name; it trains "
                          f"{[name for name, spec in specs.items() if spec.trainable]}")
    engines: dict[str, Any] = {}
    trainables = []
    for name, spec in specs.items():
        if not spec.trainable:
            engines[name] = freeze(spec.module, device, dtype)
            continue
        optimizer_config = config.optimizer_for(name, spec.optimizer)
        stage = config.zero_stage_for(name, spec.zero_stage)
        optimizer = build_optimizer(spec.module.parameters(), optimizer_config)
        engine, _, _, _ = deepspeed.initialize(model=spec.module, optimizer=optimizer,
                                               config=deepspeed_config(config, config.scaling.use_gpu, stage))
        engines[name] = engine
        trainables.append(Trainable(name, engine, optimizer_config, stage))
    return engines, trainables


@contextlib.contextmanager
def gathered(trainables: list[Trainable]) -> Iterator[None]:
    """Full parameters of every model on every rank for the duration of the block (ZeRO-3 partitions them)."""
    with contextlib.ExitStack() as stack:
        for model in trainables:
            if model.zero_stage == 3:
                import deepspeed

                stack.enter_context(deepspeed.zero.GatheredParameters(list(model.engine.module.parameters()),
                                                                      modifier_rank=None))
        yield


def export_models(task: Any, engines: Mapping[str, Any], trainables: list[Trainable], rank: int, folder: Path) -> None:
    """task.export on rank 0 with unwrapped models: the one model of a single-model task, else the mapping."""
    modules = {**engines, **{model.name: model.engine.module for model in trainables}}
    with gathered(trainables):
        if rank == 0:
            task.export(modules if callable(getattr(task, "models", None)) else modules[SINGLE_MODEL], folder)


# ---------------------------------------------------------------------------------------------------------------
# Optimizer, lr schedule, DeepSpeed config


def lr_multiplier(step: int, optimizer: OptimizerConfig, max_steps: int) -> float:
    """The lr factor after `step` optimizer steps: linear warmup, then constant or cosine to min_lr_ratio."""
    if optimizer.warmup_steps and step < optimizer.warmup_steps:
        return (step + 1) / optimizer.warmup_steps
    if optimizer.schedule == "constant":
        return 1.0
    span = max(1, max_steps - optimizer.warmup_steps)
    progress = min(1.0, (step - optimizer.warmup_steps) / span)
    return optimizer.min_lr_ratio + (1 - optimizer.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_optimizer(params: Iterable[torch.nn.Parameter], optimizer: OptimizerConfig) -> torch.optim.Optimizer:
    """A torch.optim optimizer: DeepSpeed's fused ones would JIT-compile ops, which CPU CI cannot afford."""
    params = [p for p in params if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters")
    if optimizer.name == "adamw":
        return torch.optim.AdamW(params, lr=optimizer.lr, betas=optimizer.betas, weight_decay=optimizer.weight_decay)
    return torch.optim.SGD(params, lr=optimizer.lr, momentum=optimizer.betas[0], weight_decay=optimizer.weight_decay)


def lr_at(step: int, optimizer: OptimizerConfig, max_steps: int) -> float:
    """The learning rate of job step `step`: every model follows the job's steps, whatever its update rate."""
    return optimizer.lr * lr_multiplier(step, optimizer, max_steps)


def deepspeed_config(config: JobConfig, on_gpu: bool, zero_stage: int | None = None) -> dict[str, Any]:
    """The DeepSpeed config dict of one engine: ZeRO stage (default the job's), precision, clipping, batch sizes."""
    precision = config.deepspeed.resolve_precision(on_gpu)
    ds: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": config.run.batch_size,
        "gradient_accumulation_steps": config.deepspeed.grad_accum_steps,
        "zero_optimization": {"stage": config.deepspeed.zero_stage if zero_stage is None else zero_stage},
        "bf16": {"enabled": precision == "bf16"},
        # DeepSpeed prints its own progress every N steps; the runtime logs instead.
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if config.deepspeed.grad_clip > 0:
        ds["gradient_clipping"] = config.deepspeed.grad_clip
    return ds






# ---------------------------------------------------------------------------------------------------------------
# Per-step metrics


def mean_over_workers(values: Mapping[str, Any], device: torch.device) -> dict[str, float]:
    """Every value a train step returned, averaged over the workers (each rank must return the same keys)."""
    keys = sorted(values)  # one order on every rank, whatever order a step built its dict in
    # float32, as the single-model runtime reduced its loss: the same sums, bit for bit.
    local = torch.tensor([float(values[k]) for k in keys], dtype=torch.float32, device=device)
    world = 1
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(local, op=torch.distributed.ReduceOp.SUM)
        world = torch.distributed.get_world_size()
    mean = dict(zip(keys, local.tolist()))
    return {k: mean[k] / world for k in values}


def metrics_row(step: int, values: Mapping[str, float], lrs: Mapping[str, float], grad_norms: Mapping[str, float],
                samples_per_s: float, step_time_s: float, elapsed_s: float, attempt_start: int) -> dict[str, float]:
    """One CSV row: the runtime's columns, per-model lr/grad_norm when there are several models, then the step's.

    `lr` and `grad_norm` are those of the first trainable model the task declares; `loss` is the step's "loss".
    """
    if "loss" not in values:
        raise KeyError(f"a train step must return 'loss' (the total or main loss), got {sorted(values)}")
    main = next(iter(lrs))
    row = {"step": step, "loss": values["loss"], "lr": lrs[main], "grad_norm": grad_norms[main],
           "samples_per_s": samples_per_s, "step_time_s": step_time_s, "elapsed_s": elapsed_s,
           "attempt_start": attempt_start}
    if len(lrs) > 1:
        row.update({f"lr/{name}": lr for name, lr in lrs.items()})
        row.update({f"grad_norm/{name}": norm for name, norm in grad_norms.items()})
    for key, value in values.items():
        if key != "loss" and key in row:
            raise ValueError(f"train step value {key!r} has the name of a runtime column; rename it")
        row.setdefault(key, value)
    return row


@dataclass
class MetricsLog:
    """Per-step training metrics: one row per optimizer step, saved as CSV and drawn as a PNG.

    The columns are METRIC_FIELDS, then any others in the order they first appear; a row without one is NaN there.
    """

    rows: list[dict[str, float]] = field(default_factory=list)

    @property
    def columns(self) -> list[str]:
        columns = dict.fromkeys(METRIC_FIELDS)
        for row in self.rows:
            columns.update(dict.fromkeys(row))
        return list(columns)

    def append(self, row: Mapping[str, float]) -> None:
        self.rows.append({**{k: float(row.get(k, math.nan)) for k in METRIC_FIELDS},
                          **{k: float(v) for k, v in row.items() if k not in METRIC_FIELDS}})

    def upto(self, step: int) -> MetricsLog:
        """Rows of steps <= step: after a resume, steps past the checkpoint are redone, not duplicated."""
        return MetricsLog([r for r in self.rows if r["step"] <= step])

    def write_csv(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self.columns, restval="nan")
            writer.writeheader()
            for row in self.rows:
                writer.writerow({k: (int(v) if k in INT_FIELDS else f"{v:.6g}") for k, v in row.items()})
        return path

    @classmethod
    def read_csv(cls, path: str | Path) -> MetricsLog:
        with Path(path).open(newline="") as f:
            return cls([{k: float(v) if v else math.nan for k, v in row.items()} for row in csv.DictReader(f)])

    def plot(self, path: str | Path, title: str = "") -> Path:
        """One panel each for loss, lr, grad norm and throughput against step, then one per other metric.

        A column "a/b" joins panel "a" (lr/generator beside lr); timing columns are left out.
        """
        import matplotlib

        matplotlib.use("Agg")  # headless: never needs a display
        import matplotlib.pyplot as plt

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        panels = _panels(self.columns)
        ncols = 2 if len(panels) <= 4 else 3
        nrows = math.ceil(len(panels) / ncols)
        fig, axes = plt.subplots(nrows, ncols, figsize=(5 * ncols, 3.25 * nrows), squeeze=False)
        for ax, (label, log_y, keys) in zip(axes.flat, panels):
            finite_values = []
            for key in keys:
                # Steps where a metric is NaN (a model that did not update) are left out, not drawn as gaps.
                points = [(r["step"], r[key]) for r in self.rows if math.isfinite(r.get(key, math.nan))]
                ax.plot([p[0] for p in points], [p[1] for p in points], lw=1.2, label=key)
                finite_values += [p[1] for p in points]
            ax.set_title(label)
            ax.set_xlabel("step")
            if log_y and finite_values and all(v > 0 for v in finite_values):
                ax.set_yscale("log")
            if len(keys) > 1:
                ax.legend(fontsize=7)
            ax.grid(alpha=0.3)
        for ax in list(axes.flat)[len(panels):]:
            ax.set_visible(False)
        fig.suptitle(title)
        fig.tight_layout()
        fig.savefig(path, dpi=90)
        plt.close(fig)
        return path


_BASE_PANELS = {"loss": ("loss", True), "lr": ("learning rate", False), "grad_norm": ("grad norm", True),
                "samples_per_s": ("samples/s", False)}
_NOT_DRAWN = {"step", "step_time_s", "elapsed_s", "attempt_start"}


def _panels(columns: list[str]) -> list[tuple[str, bool, list[str]]]:
    """(title, log y, columns) per panel: the four base panels, then one per prefix of the other columns."""
    groups: dict[str, list[str]] = {key: [] for key in _BASE_PANELS}
    for column in columns:
        if column not in _NOT_DRAWN:
            groups.setdefault(column.split("/")[0], []).append(column)
    for key in ("lr", "grad_norm"):  # with lr/<name> per model, plain lr is the first one's again
        if len(groups[key]) > 1:
            groups[key].remove(key)
    return [(*_BASE_PANELS.get(prefix, (prefix, False)), keys) for prefix, keys in groups.items() if keys]


def progress_line(row: Mapping[str, float], max_steps: int) -> str:
    eta = (max_steps - row["step"]) * row["step_time_s"]
    extras = " ".join(f"{k} {v:.4g}" for k, v in row.items() if k not in METRIC_FIELDS and math.isfinite(v))
    return (f"step {int(row['step'])}/{max_steps} loss {row['loss']:.4g} lr {row['lr']:.3g} "
            f"grad_norm {row['grad_norm']:.3g} {row['samples_per_s']:.1f} samples/s eta {eta:.0f}s"
            + (f" | {extras}" if extras else ""))
