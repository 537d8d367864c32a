"""Distil a causal student from a full-attention teacher: python -m jobs.distill --config jobs/configs/distill_toy.yaml.

The teacher (default the committed toy editor, models/toy-editor) stays frozen; the student starts from its
transformer weights and trains with the causal mask of task.mode ("kv" or "session", rtedit.model.causal) on
output (velocity) and attention-output distillation (rtedit.train.tasks.distill). The last step exports a served
folder: the teacher's with the student's transformer and rtedit.json "causal"/"condition_timestep". The driver
builds the teacher's latent cache once (rtedit.train.tasks.teacher.build_cache); workers only read it.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import torch

from jobs import runtime
from jobs.runtime import ModelSpec, WorkerContext
from rtedit.config_parsing import to_dict
from rtedit.train.config import JobConfig
from rtedit.train.tasks.distill import (AttentionTap, DistillTaskConfig, build_student, cache_config, export_student,
                                        load_distill_cache, load_teacher, student_layout, teacher_targets)
from rtedit.train.tasks.teacher import FlowBatcher, build_cache

logger = logging.getLogger("jobs.distill")
TASK = "jobs.distill:build_task"


class DistillTask:
    """A frozen teacher and a causal student (models()), one optimizer step of the student per job step."""

    def __init__(self, ctx: WorkerContext):
        self.ctx = ctx
        self.cfg = ctx.config.task_config(DistillTaskConfig)
        data = cache_config(self.cfg)
        cache = load_distill_cache(self.cfg, data)
        self.batches = FlowBatcher(cache, data, ctx.config.run.batch_size, ctx.config.run.seed, ctx.rank)
        self.teacher = load_teacher(self.cfg.teacher)
        self.student = build_student(self.teacher, self.cfg)
        self.teacher_tap = AttentionTap(self.teacher) if self.student.tap is not None else None
        self.accum = ctx.config.deepspeed.grad_accum_steps
        logger.info("rank %d: %d examples, %s student (condition timestep %s), %.1fM parameters, weights output %s "
                    "attention %s", ctx.rank, len(cache["families"]), self.cfg.mode, self.cfg.condition_timestep,
                    sum(p.numel() for p in self.teacher.parameters()) / 1e6, self.cfg.output_weight,
                    self.cfg.attention_weight)

    def models(self) -> dict[str, ModelSpec]:
        return {"student": ModelSpec(self.student), "teacher": ModelSpec(self.teacher, trainable=False)}

    def train_step(self, engines, step: int) -> dict[str, torch.Tensor]:
        student, teacher = engines["student"], engines["teacher"]
        device, dtype = self.ctx.device, self.ctx.dtype
        sums: dict[str, torch.Tensor] = {}
        for micro in range(self.accum):  # DeepSpeed steps the optimizer at the last micro-batch only
            batch = self.batches(step * self.accum + micro)
            targets = teacher_targets(teacher, self.teacher_tap, batch, device, dtype)
            layout = student_layout(batch["layout"], self.cfg.condition_timestep)
            loss, parts = student(batch, targets, layout, device, dtype)
            student.backward(loss)
            student.step()
            for key, value in {"loss": loss.detach(), **parts}.items():
                sums[key] = sums.get(key, 0) + value.float() / self.accum
        return sums

    def export(self, models, folder: Path) -> None:
        export_student(models["student"].transformer, self.cfg, folder, job_config=to_dict(self.ctx.config))


def build_task(ctx: WorkerContext) -> DistillTask:
    return DistillTask(ctx)


PATH_KEYS = ("teacher", "data_dir", "cache_dir", "taef2_dir")


def prepare(config: JobConfig, task_config: type = DistillTaskConfig, path_keys: tuple[str, ...] = PATH_KEYS) -> None:
    """Driver side, before any worker: validate the task section, build the teacher's latent cache of the data.
    Any task over a teacher and its cache (jobs.dmdr too) passes its config class and its path fields."""
    for key in path_keys:  # workers run elsewhere: absolute paths
        if config.task.get(key) or key in ("teacher", "data_dir"):
            default = getattr(task_config, key, None)
            config.task[key] = str(Path(config.task.get(key) or default).expanduser().resolve())
    cfg = config.task_config(task_config)
    data = cache_config(cfg)
    load_teacher(cfg.teacher)  # a bad teacher folder fails here, not on every worker
    if config.scaling.use_gpu and not torch.cuda.is_available() and cfg.encode_device is None:
        import ray  # a CPU head node: encode in a one-GPU Ray task, as jobs.train_teacher does

        ray.get(ray.remote(num_gpus=1, num_cpus=1)(build_cache).remote(data, "train"))
        return
    build_cache(data, "train")


if __name__ == "__main__":
    runtime.main(TASK, sys.argv[1:], description=__doc__.splitlines()[0], prepare=prepare)
