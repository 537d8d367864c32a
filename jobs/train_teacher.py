"""Train the toy teacher: python -m jobs.train_teacher --config jobs/configs/toy_teacher.yaml [--local].

A small Flux2Transformer2DModel editor, trained with rectified flow on toy-world TAEF2 latents (the source image
enters as reference tokens, as in klein's editing), saved at the end as a diffusers folder with rtedit.json that
Editor.from_pretrained loads and `serve` serves. The driver precomputes latents and instruction embeddings once
(rtedit.train.tasks.teacher.build_cache); workers only read them, so scaling runs measure the trainer.

`task.init_from` starts from a served teacher folder's weights (a fine-tune: jobs/configs/toy_teacher_finetune.yaml
from models/toy-editor). `--local` runs the task in this process on one device with single-process DeepSpeed and no
Ray (jobs.runtime.run_local: the runtime's checkpoints, metrics and export under run.output_path()).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import torch

from jobs import runtime
from jobs.runtime import WorkerContext
from rtedit.model.packing import PATCH_PIXELS
from rtedit.config_parsing import to_dict
from rtedit.errors import ConfigError
from rtedit.train.config import JobConfig, load_job_config
from rtedit.train.tasks.teacher import (FlowBatcher, TeacherTaskConfig, build_cache, build_transformer, cache_file,
                                        check_init_from, export_model, flow_loss, load_cache, load_init_transformer)

logger = logging.getLogger("jobs.train_teacher")
TASK = "jobs.train_teacher:build_task"


class TeacherTask:
    def __init__(self, ctx: WorkerContext):
        self.ctx = ctx
        self.cfg = ctx.config.task_config(TeacherTaskConfig)
        cache = load_cache(cache_file(self.cfg, "train"))
        self.batches = FlowBatcher(cache, self.cfg, ctx.config.run.batch_size, ctx.config.run.seed, ctx.rank)
        model = build_transformer(self.cfg)
        if self.cfg.init_from is not None:  # every rank loads the same weights: no broadcast needed
            load_init_transformer(model, self.cfg)
        self.model = model.to(ctx.device)
        logger.info("rank %d: %d examples, %.1fM transformer parameters%s", ctx.rank, len(cache["families"]),
                    sum(p.numel() for p in self.model.parameters()) / 1e6,
                    f", from {self.cfg.init_from}" if self.cfg.init_from else "")

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


def prepare(config: JobConfig, local: bool = False) -> None:
    """Driver side, before any worker: validate the task section (and task.init_from's folder against it) and build
    the latent caches (on this machine's GPU when it has one, else in a one-GPU Ray task unless `local`)."""
    # Workers run in other folders (and on other nodes): hand them absolute paths.
    for key in ("data_dir", "cache_dir", "taef2_dir", "init_from"):
        if config.task.get(key):
            config.task[key] = str(Path(config.task[key]).expanduser().resolve())
    task = config.task_config(TeacherTaskConfig)
    if task.init_from is not None:
        check_init_from(task)  # seconds, before minutes of precompute
    splits = [s for s in ("train", "eval") if (Path(task.data_dir) / s).is_dir()]
    if local and config.scaling.use_gpu and not torch.cuda.is_available():
        raise ConfigError("--local with scaling.use_gpu=true needs a GPU here; --set scaling.use_gpu=false runs on "
                          "the CPU")
    if config.scaling.use_gpu and not torch.cuda.is_available() and task.encode_device is None:
        # A CPU head node would take long to encode the data: do it once in a one-GPU Ray task instead.
        import ray

        remote = ray.remote(num_gpus=1, num_cpus=1)(build_cache)
        ray.get([remote.remote(task, split) for split in splits])
        return
    for split in splits:
        build_cache(task, split)


def main(argv: list[str] | None = None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--local" not in argv:
        return runtime.main(TASK, argv, description=__doc__.splitlines()[0], prepare=prepare)
    parser = argparse.ArgumentParser(description="the teacher task without Ray: single-process DeepSpeed")
    parser.add_argument("--local", action="store_true")
    parser.add_argument("--config", required=True, type=Path)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--max-train-s", type=float, default=None,
                        help="time budget of the steps: run.max_steps is lowered at the end of the warmup to fit it")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        config = load_job_config(args.config, args.set)
        prepare(config, local=True)
    except ConfigError as exc:
        raise SystemExit(f"ConfigError: {exc}") from None
    result = runtime.run_local(config, TASK, max_train_s=args.max_train_s)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
