"""Train the toy teacher: python -m jobs.train_teacher --config jobs/configs/toy_teacher.yaml.

A small Flux2Transformer2DModel editor, trained with rectified flow on toy-world TAEF2 latents (the source image
enters as reference tokens, as in klein's editing), saved at the end as a diffusers folder with rtedit.json that
Editor.from_pretrained loads and `serve` serves. The driver precomputes latents and instruction embeddings once
(rtedit.train.tasks.teacher.build_cache); workers only read them, so scaling runs measure the trainer.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import torch

from jobs import runtime
from jobs.runtime import WorkerContext
from rtedit.model.packing import PATCH_PIXELS
from rtedit.config_parsing import to_dict
from rtedit.train.config import JobConfig
from rtedit.train.tasks.teacher import (FlowBatcher, TeacherTaskConfig, build_cache, build_transformer, cache_file,
                                  export_model, flow_loss, load_cache)

logger = logging.getLogger("jobs.train_teacher")
TASK = "jobs.train_teacher:build_task"


class TeacherTask:
    def __init__(self, ctx: WorkerContext):
        self.ctx = ctx
        self.cfg = ctx.config.task_config(TeacherTaskConfig)
        cache = load_cache(cache_file(self.cfg, "train"))
        self.batches = FlowBatcher(cache, self.cfg, ctx.config.run.batch_size, ctx.config.run.seed, ctx.rank)
        self.model = build_transformer(self.cfg).to(ctx.device)
        logger.info("rank %d: %d examples, %.1fM transformer parameters", ctx.rank, len(cache["families"]),
                    sum(p.numel() for p in self.model.parameters()) / 1e6)

    def batch(self, index: int):
        return self.batches(index)

    def loss(self, model, batch):
        return flow_loss(model, batch, self.ctx.device, self.ctx.dtype), {}

    def export(self, model, folder: Path) -> None:
        # Trained at one image size: the patchified latents' side times the pixels per token.
        native = int(self.batches.cache["source"].shape[-1]) * PATCH_PIXELS
        export_model(model, self.cfg, folder, job_config=to_dict(self.ctx.config), native_size=native)


def build_task(ctx: WorkerContext) -> TeacherTask:
    return TeacherTask(ctx)


def prepare(config: JobConfig) -> None:
    """Driver side, before any worker: validate the task section and build the latent caches."""
    # Workers run in other folders (and on other nodes): hand them absolute paths.
    for key in ("data_dir", "cache_dir", "taef2_dir"):
        if config.task.get(key):
            config.task[key] = str(Path(config.task[key]).expanduser().resolve())
    task = config.task_config(TeacherTaskConfig)
    splits = [s for s in ("train", "eval") if (Path(task.data_dir) / s).is_dir()]
    if config.scaling.use_gpu and not torch.cuda.is_available() and task.encode_device is None:
        # A CPU head node would take long to encode the data: do it once in a one-GPU Ray task instead.
        import ray

        remote = ray.remote(num_gpus=1, num_cpus=1)(build_cache)
        ray.get([remote.remote(task, split) for split in splits])
        return
    for split in splits:
        build_cache(task, split)


if __name__ == "__main__":
    runtime.main(TASK, sys.argv[1:], description=__doc__.splitlines()[0], prepare=prepare)
