"""A tiny regression job that exercises the shared runtime in seconds on CPU: python -m jobs.train_tiny --config
jobs/configs/tiny.yaml. Tests use it for ZeRO, checkpoints, resume and worker-failure recovery.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from jobs.runtime import WorkerContext, main
from rtedit.errors import ConfigError

logger = logging.getLogger("jobs.train_tiny")


@dataclass
class TinyTaskConfig:
    in_dim: int = 16
    hidden: int = 32
    noise: float = 0.01
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
        if self.fail_once_at_step is not None and not self.fail_marker:
            raise ConfigError("task.fail_marker is required with task.fail_once_at_step")


class TinyTask:
    """y = x @ w* + noise, fitted by a two-layer MLP; batch i is a pure function of (seed, rank, i)."""

    def __init__(self, ctx: WorkerContext):
        self.ctx = ctx
        self.cfg = ctx.config.task_config(TinyTaskConfig)
        self.model = torch.nn.Sequential(torch.nn.Linear(self.cfg.in_dim, self.cfg.hidden), torch.nn.Tanh(),
                                         torch.nn.Linear(self.cfg.hidden, 1))
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
        loss = torch.nn.functional.mse_loss(model(x).float(), y.float())
        return loss, {}

    def export(self, model: torch.nn.Module, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, folder / "model.pt")


def build_task(ctx: WorkerContext) -> TinyTask:
    return TinyTask(ctx)


if __name__ == "__main__":
    main("jobs.train_tiny:build_task", sys.argv[1:], description=__doc__.splitlines()[0])
