"""Typed configs of training jobs, parsed from YAML and validated before any worker starts.

A job YAML has the shared sections `run`, `scaling`, `deepspeed`, `optimizer`, an optional `models` section (per-model
ZeRO stage and optimizer changes for tasks that train several models) and one job-specific `task` section that the
job parses into its own dataclass with the same `from_dict`. Unknown keys, wrong types, NaN and infinities raise
ConfigError naming the field.
"""

from __future__ import annotations

import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

from rtedit.config_parsing import from_dict, set_dotted
from rtedit.errors import ConfigError

T = TypeVar("T")


def _check(condition: bool, name: str, value: Any, requirement: str) -> None:
    if not condition:
        raise ConfigError(f"{name} must be {requirement}, got {value!r}")


def section_check(section: str) -> typing.Callable[[bool, str, Any, str], None]:
    """_check for the fields of one config section: need(ok, "lr", value, "> 0") names "<section>.lr"."""
    def need(condition: bool, name: str, value: Any, requirement: str) -> None:
        _check(condition, f"{section}.{name}", value, requirement)
    return need


# ---------------------------------------------------------------------------------------------------------------
# Shared sections


@dataclass
class RunConfig:
    """Where the run lives and how long it goes; rerunning with the same name and storage_path resumes it."""

    name: str
    """Run name: a folder under storage_path (checkpoints, metrics)."""
    storage_path: str
    """Local folder, NFS mount or s3:// / gs:// URI shared by all nodes."""
    max_steps: int
    """Optimizer steps in total (across resumes)."""
    batch_size: int
    """Samples per worker per micro-step."""
    checkpoint_every: int = 100
    """Steps between checkpoints; the last step always checkpoints."""
    log_every: int = 10
    """Steps between progress lines and ray.train.report calls."""
    num_to_keep: int = 2
    """Checkpoints kept in storage."""
    max_failures: int = 0
    """Worker-group restarts allowed (FailureConfig.max_failures; -1 for unlimited)."""
    timeout_s: float = 3600.0
    """fit() is abandoned (and the job fails) after this many seconds."""
    seed: int = 0
    """Seed of model initialisation (same on every rank) and of data (offset by rank)."""
    output_dir: str | None = None
    """Where metrics.csv/metrics.png and exports go; default storage_path/name when storage_path is local."""

    def validate(self) -> None:
        _check(bool(self.name.strip()) and "/" not in self.name, "run.name", self.name, "a non-empty name without '/'")
        _check(bool(self.storage_path.strip()), "run.storage_path", self.storage_path, "non-empty")
        for name in ("max_steps", "batch_size", "checkpoint_every", "log_every", "num_to_keep"):
            _check(getattr(self, name) >= 1, f"run.{name}", getattr(self, name), ">= 1")
        _check(self.max_failures >= -1, "run.max_failures", self.max_failures, ">= -1")
        _check(math.isfinite(self.timeout_s) and self.timeout_s > 0, "run.timeout_s", self.timeout_s,
               "a positive number")

    def output_path(self) -> Path:
        if self.output_dir:
            return Path(self.output_dir).expanduser()
        if "://" in self.storage_path:
            return Path("runs") / self.name
        return Path(self.storage_path).expanduser() / self.name


@dataclass
class ScalingConfig:
    """Ray Train workers: one process per GPU, or CPU processes for tests."""

    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 1.0
    """Only used with use_gpu."""
    placement_strategy: typing.Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    """Ray placement of the workers: PACK fills a node first; STRICT_SPREAD puts each worker on its own node."""

    def validate(self) -> None:
        _check(self.num_workers >= 1, "scaling.num_workers", self.num_workers, ">= 1")
        _check(self.cpus_per_worker > 0, "scaling.cpus_per_worker", self.cpus_per_worker, "> 0")
        _check(self.gpus_per_worker > 0, "scaling.gpus_per_worker", self.gpus_per_worker, "> 0")


@dataclass
class DeepSpeedConfig:
    """The DeepSpeed engine every job trains through."""

    zero_stage: int = 2
    """ZeRO stage 1, 2 or 3."""
    precision: typing.Literal["auto", "bf16", "fp32"] = "auto"
    """auto: bf16 on GPU, fp32 on CPU."""
    grad_clip: float = 1.0
    """Global gradient-norm clip; 0 disables it."""
    grad_accum_steps: int = 1

    def validate(self) -> None:
        _check(self.zero_stage in (1, 2, 3), "deepspeed.zero_stage", self.zero_stage, "1, 2 or 3")
        _check(self.grad_clip >= 0, "deepspeed.grad_clip", self.grad_clip, ">= 0")
        _check(self.grad_accum_steps >= 1, "deepspeed.grad_accum_steps", self.grad_accum_steps, ">= 1")

    def resolve_precision(self, on_gpu: bool) -> str:
        if self.precision == "auto":
            return "bf16" if on_gpu else "fp32"
        return self.precision


@dataclass
class OptimizerConfig:
    """A torch.optim optimizer (DeepSpeed's own optimizers need compiled ops) and its schedule."""

    name: typing.Literal["adamw", "sgd"] = "adamw"
    lr: float = 3e-4
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 0
    schedule: typing.Literal["cosine", "constant"] = "cosine"
    min_lr_ratio: float = 0.1
    """Cosine decays to lr * min_lr_ratio at max_steps."""

    def validate(self, section: str = "optimizer") -> None:
        _check(self.lr > 0, f"{section}.lr", self.lr, "> 0")
        _check(self.weight_decay >= 0, f"{section}.weight_decay", self.weight_decay, ">= 0")
        _check(all(0 <= b < 1 for b in self.betas), f"{section}.betas", self.betas, "in [0, 1)")
        _check(self.warmup_steps >= 0, f"{section}.warmup_steps", self.warmup_steps, ">= 0")
        _check(0 <= self.min_lr_ratio <= 1, f"{section}.min_lr_ratio", self.min_lr_ratio, "in [0, 1]")


@dataclass
class ModelConfig:
    """One trainable model of a task that declares several (section `models.<name>`, name as the task declares it)."""

    zero_stage: int | None = None
    """ZeRO stage of this model's engine; default the task's choice, else deepspeed.zero_stage."""
    optimizer: dict[str, Any] = field(default_factory=dict)
    """Fields of the `optimizer` section that differ for this model, e.g. {lr: 1.0e-5}; the rest are inherited."""


@dataclass
class JobConfig:
    """One training job: shared sections plus the job's own `task` section (parsed by the job)."""

    run: RunConfig
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    models: dict[str, ModelConfig] = field(default_factory=dict)
    task: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> JobConfig:
        self.run.validate()
        self.scaling.validate()
        self.deepspeed.validate()
        self._check_optimizer(self.optimizer, "optimizer")
        for name, model in self.models.items():
            if model.zero_stage is not None:
                _check(model.zero_stage in (1, 2, 3), f"models.{name}.zero_stage", model.zero_stage, "1, 2 or 3")
            self.optimizer_for(name)
        return self

    def _check_optimizer(self, optimizer: OptimizerConfig, section: str) -> None:
        optimizer.validate(section)
        _check(optimizer.warmup_steps <= self.run.max_steps, f"{section}.warmup_steps", optimizer.warmup_steps,
               f"<= run.max_steps ({self.run.max_steps})")

    def optimizer_for(self, name: str, task_changes: dict[str, Any] | None = None) -> OptimizerConfig:
        """Model `name`'s optimizer: the `optimizer` section, changed by the task's defaults, then by models.<name>."""
        section = f"models.{name}.optimizer"
        changes = {**(task_changes or {}), **(self.models[name].optimizer if name in self.models else {})}
        optimizer = from_dict(OptimizerConfig, changes, section, base=self.optimizer)
        self._check_optimizer(optimizer, section)
        return optimizer

    def zero_stage_for(self, name: str, task_default: int | None = None) -> int:
        """Model `name`'s ZeRO stage: models.<name>.zero_stage, else the task's choice, else deepspeed.zero_stage."""
        configured = self.models[name].zero_stage if name in self.models else None
        stage = next(s for s in (configured, task_default, self.deepspeed.zero_stage) if s is not None)
        _check(stage in (1, 2, 3), f"models.{name}.zero_stage", stage, "1, 2 or 3")
        return stage

    def task_config(self, cls: type[T]) -> T:
        """The task section as the job's dataclass, validated when it has validate()."""
        task = from_dict(cls, self.task, "task")
        if hasattr(task, "validate"):
            task.validate()
        return task


def load_job_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> JobConfig:
    """Read, override (`run.max_steps=10`) and validate a job YAML."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot read job config {path}: {exc}") from exc
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override must look like section.key=value, got {item!r}")
        key, raw = item.split("=", 1)
        set_dotted(data, key.strip(), yaml.safe_load(raw))
    return from_dict(JobConfig, data).validate()
