"""Tiny MLP jobs that exercise the shared runtime in seconds on CPU: python -m jobs.train_tiny --config
jobs/configs/tiny.yaml (one model) or jobs/configs/tiny_pair.yaml (two trainable models at two rates and a frozen
one). Tests use them for ZeRO, checkpoints, resume, worker-failure recovery and Ray Data shards (task.kind=rows).
"""

from __future__ import annotations

import logging
import os
import sys
import time
import typing
from dataclasses import dataclass
from pathlib import Path

import torch

from jobs.runtime import ModelSpec, WorkerContext, main
from rtedit.errors import ConfigError
from rtedit.train.config import JobConfig

logger = logging.getLogger("jobs.train_tiny")


@dataclass
class TinyTaskConfig:
    kind: typing.Literal["single", "pair", "rows"] = "single"
    """single: one MLP fits y = x @ w* + noise; pair: a frozen teacher MLP, a student fitted to it every step and a
    second one ("slow") every slow_every-th step; rows: one MLP on the rows of the Ray dataset "train"."""
    in_dim: int = 16
    hidden: int = 32
    noise: float = 0.01
    slow_every: int = 2
    """pair: the slow model's optimizer steps every this many steps (DMD2's two time scales, in small)."""
    rows: int = 64
    """rows: rows of the Ray dataset that prepare() builds (ids 0..rows-1)."""
    fail_once_at_step: int | None = None
    """Fault injection for tests: the worker of fail_rank exits at this step, once (fail_marker remembers it)."""
    fail_rank: int = 1
    fail_marker: str | None = None
    fail_delay_s: float = 3.0
    """Seconds the failing worker waits first, so the controller has registered the last reported checkpoint."""
    step_sleep_s: float = 0.0
    """Seconds each batch waits: lets tests watch a run while it is going (metrics scrapes)."""

    def validate(self) -> None:
        if self.in_dim < 1 or self.hidden < 1:
            raise ConfigError(f"task.in_dim and task.hidden must be >= 1, got {self.in_dim}, {self.hidden}")
        if self.step_sleep_s < 0:
            raise ConfigError(f"task.step_sleep_s must be >= 0, got {self.step_sleep_s}")
        if self.noise < 0:
            raise ConfigError(f"task.noise must be >= 0, got {self.noise}")
        if self.slow_every < 1 or self.rows < 1:
            raise ConfigError(f"task.slow_every and task.rows must be >= 1, got {self.slow_every}, {self.rows}")
        if self.fail_once_at_step is not None and not self.fail_marker:
            raise ConfigError("task.fail_marker is required with task.fail_once_at_step")


def _mlp(cfg: TinyTaskConfig) -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(cfg.in_dim, cfg.hidden), torch.nn.Tanh(), torch.nn.Linear(cfg.hidden, 1))


def _save(model: torch.nn.Module, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, path)


class TinyTask:
    """y = x @ w* + noise, fitted by a two-layer MLP; batch i is a pure function of (seed, rank, i)."""

    def __init__(self, ctx: WorkerContext):
        self.ctx = ctx
        self.cfg = ctx.config.task_config(TinyTaskConfig)
        self.model = _mlp(self.cfg)
        self.w_true = torch.randn(self.cfg.in_dim, 1, generator=torch.Generator().manual_seed(1234))

    def batch(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.cfg
        if index == cfg.fail_once_at_step and self.ctx.rank == cfg.fail_rank and not Path(cfg.fail_marker).exists():
            Path(cfg.fail_marker).write_text(str(index))
            logger.warning("fault injection: rank %d exits at step %d", self.ctx.rank, index)
            time.sleep(cfg.fail_delay_s)
            os._exit(1)  # a crash, not an exception: the worker process dies
        if cfg.step_sleep_s:
            time.sleep(cfg.step_sleep_s)
        g = torch.Generator().manual_seed(self.ctx.config.run.seed * 7919 + self.ctx.rank * 104729 + index)
        x = torch.randn(self.ctx.config.run.batch_size, cfg.in_dim, generator=g)
        y = x @ self.w_true + cfg.noise * torch.randn(x.shape[0], 1, generator=g)
        return x.to(self.ctx.device, self.ctx.dtype), y.to(self.ctx.device, self.ctx.dtype)

    def loss(self, model, batch):
        x, y = batch
        pred = model(x).float()
        loss = torch.nn.functional.mse_loss(pred, y.float())
        return loss, {"mae": (pred - y.float()).abs().mean().item()}

    def export(self, model: torch.nn.Module, folder: Path) -> None:
        _save(model, folder / "model.pt")


class TinyPairTask(TinyTask):
    """Two trainable models updated at different rates and a frozen one, the shape of DMD2's step in small: a frozen
    random teacher MLP gives the targets, "student" fits them every step and "slow" every slow_every-th step."""

    def __init__(self, ctx: WorkerContext):
        super().__init__(ctx)
        if ctx.config.deepspeed.grad_accum_steps != 1:
            raise ConfigError("task.kind=pair takes one micro-batch per step: set deepspeed.grad_accum_steps=1")
        self.slow = _mlp(self.cfg)
        self.teacher = _mlp(self.cfg)
        self.slow_updates = 0  # a task counter: checkpointed through state_dict, so a resume neither loses nor repeats

    def models(self) -> dict[str, ModelSpec]:
        return {"student": ModelSpec(self.model), "slow": ModelSpec(self.slow),
                "teacher": ModelSpec(self.teacher, trainable=False)}

    def train_step(self, engines, step: int) -> dict[str, float]:
        x, _ = self.batch(step)
        with torch.no_grad():
            target = engines["teacher"](x).float()
        student, slow = engines["student"], engines["slow"]
        loss = torch.nn.functional.mse_loss(student(x).float(), target)
        student.backward(loss)
        student.step()  # optimizer step, then DeepSpeed zeroes the student's grads
        logs = {"loss": loss.detach()}
        if step % self.cfg.slow_every == 0:  # the second time scale; other steps leave "slow" as it is
            slow_loss = torch.nn.functional.mse_loss(slow(x).float(), target)
            slow.backward(slow_loss)
            slow.step()
            self.slow_updates += 1
            logs["loss/slow"] = slow_loss.detach()
        return {**logs, "slow_updates": self.slow_updates}

    def state_dict(self) -> dict[str, int]:
        return {"slow_updates": self.slow_updates}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.slow_updates = state["slow_updates"]

    def export(self, models: dict[str, torch.nn.Module], folder: Path) -> None:
        for name in ("student", "slow"):
            _save(models[name], folder / f"{name}.pt")


class TinyRowsTask(TinyTask):
    """One MLP on the rows of the Ray dataset "train" (prepare() makes it): x is a fixed function of each row's id.
    Each rank remembers the ids it trained on (its state_dict), so tests can see how the rows were split."""

    def __init__(self, ctx: WorkerContext):
        super().__init__(ctx)
        self.rows = ctx.dataset_batches("train")
        self.seen: list[int] = []

    def batch(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        ids = next(self.rows)["id"]
        self.seen += [int(i) for i in ids]
        x = torch.stack([torch.randn(self.cfg.in_dim, generator=torch.Generator().manual_seed(int(i))) for i in ids])
        return x.to(self.ctx.device, self.ctx.dtype), (x @ self.w_true).to(self.ctx.device, self.ctx.dtype)

    def state_dict(self) -> dict[str, list[int]]:
        return {"seen": list(self.seen)}

    def load_state_dict(self, state: dict[str, list[int]]) -> None:
        self.seen = list(state["seen"])


def build_task(ctx: WorkerContext) -> TinyTask:
    kind = ctx.config.task_config(TinyTaskConfig).kind
    return {"single": TinyTask, "pair": TinyPairTask, "rows": TinyRowsTask}[kind](ctx)


def prepare(config: JobConfig) -> dict | None:
    """Driver side: check the task section; task.kind=rows gets its dataset, ids 0..rows-1."""
    cfg = config.task_config(TinyTaskConfig)
    if cfg.kind != "rows":
        return None
    import ray.data

    return {"train": ray.data.from_items([{"id": i} for i in range(cfg.rows)])}


if __name__ == "__main__":
    main("jobs.train_tiny:build_task", sys.argv[1:], description=__doc__.splitlines()[0], prepare=prepare)
