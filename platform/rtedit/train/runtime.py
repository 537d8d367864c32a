"""Ray-free pieces of the job runtime: optimizer, lr schedule, DeepSpeed config, and the per-step metrics log.

jobs/runtime.py wires these into Ray Train; keeping them here lets them be tested without a cluster.
"""

from __future__ import annotations

import csv
import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from rtedit.train.config import JobConfig, OptimizerConfig

logger = logging.getLogger(__name__)

METRIC_FIELDS = ("step", "loss", "lr", "grad_norm", "samples_per_s", "step_time_s", "elapsed_s", "attempt_start")


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


def deepspeed_config(config: JobConfig, on_gpu: bool) -> dict[str, Any]:
    """The DeepSpeed config dict for this job: ZeRO stage, precision, clipping, batch sizes."""
    precision = config.deepspeed.resolve_precision(on_gpu)
    ds: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": config.run.batch_size,
        "gradient_accumulation_steps": config.deepspeed.grad_accum_steps,
        "zero_optimization": {"stage": config.deepspeed.zero_stage},
        "bf16": {"enabled": precision == "bf16"},
        # DeepSpeed prints its own progress every N steps; the runtime logs instead.
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if config.deepspeed.grad_clip > 0:
        ds["gradient_clipping"] = config.deepspeed.grad_clip
    return ds


def dtype_of(precision: str) -> torch.dtype:
    return {"bf16": torch.bfloat16, "fp32": torch.float32}[precision]


@dataclass
class MetricsLog:
    """Per-step training metrics: one row per optimizer step, saved as CSV and drawn as a PNG."""

    rows: list[dict[str, float]] = field(default_factory=list)

    def append(self, row: dict[str, float]) -> None:
        self.rows.append({k: float(row.get(k, float("nan"))) for k in METRIC_FIELDS})

    def upto(self, step: int) -> MetricsLog:
        """Rows of steps <= step: after a resume, steps past the checkpoint are redone, not duplicated."""
        return MetricsLog([r for r in self.rows if r["step"] <= step])

    def write_csv(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=METRIC_FIELDS)
            writer.writeheader()
            for row in self.rows:
                writer.writerow({k: (int(v) if k in ("step", "attempt_start") else f"{v:.6g}") for k, v in row.items()})
        return path

    @classmethod
    def read_csv(cls, path: str | Path) -> MetricsLog:
        with Path(path).open(newline="") as f:
            return cls([{k: float(v) for k, v in row.items() if k in METRIC_FIELDS} for row in csv.DictReader(f)])

    def plot(self, path: str | Path, title: str = "") -> Path:
        """Loss, lr, grad norm and throughput against step, one panel each."""
        import matplotlib

        matplotlib.use("Agg")  # headless: never needs a display
        import matplotlib.pyplot as plt

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        steps = [r["step"] for r in self.rows]
        fig, axes = plt.subplots(2, 2, figsize=(10, 6.5))
        for ax, (key, label, log_y) in zip(axes.flat, (("loss", "loss", True), ("lr", "learning rate", False),
                                                        ("grad_norm", "grad norm", True),
                                                        ("samples_per_s", "samples/s", False))):
            values = [r[key] for r in self.rows]
            ax.plot(steps, values, lw=1.2)
            ax.set_title(label)
            ax.set_xlabel("step")
            if log_y and values and all(v > 0 for v in values if math.isfinite(v)):
                ax.set_yscale("log")
            ax.grid(alpha=0.3)
        fig.suptitle(title)
        fig.tight_layout()
        fig.savefig(path, dpi=90)
        plt.close(fig)
        return path


def progress_line(row: dict[str, float], max_steps: int) -> str:
    eta = (max_steps - row["step"]) * row["step_time_s"]
    return (f"step {int(row['step'])}/{max_steps} loss {row['loss']:.4g} lr {row['lr']:.3g} "
            f"grad_norm {row['grad_norm']:.3g} {row['samples_per_s']:.1f} samples/s eta {eta:.0f}s")
