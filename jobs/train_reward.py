"""Train the EditReward model: python -m jobs.train_reward --config jobs/configs/reward_toy.yaml.

A Qwen3.5 vision-language reward model (rtedit.train.reward) trained with Bradley-Terry-with-ties on preference
pairs (data first: python -m jobs.make_reward_data --out data/reward-toy --n 2000). It runs on the shared runtime
(jobs/runtime.py): DeepSpeed at the config's ZeRO stage, the model built under deepspeed.zero.Init at ZeRO-3,
checkpoints and resume, metrics.csv/metrics.png with loss, accuracy and held-out accuracy per kind of wrong
candidate. The last step exports a folder EditReward.from_pretrained loads.

`--local` runs the same task and model builder in this process with single-process DeepSpeed and no Ray (the
Ray bundle and a 9B model's code need not share one carry), times `run.max_steps` steps and prints peak GPU and
host memory and samples per second as JSON (`--max-seconds S` ends the steps S seconds after the start, `--export DIR`
saves the model); `task.offload_optimizer` (optimizer state in host memory) is honoured
there, since the shared runtime's engines take no per-model DeepSpeed settings beyond the ZeRO stage.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path


from jobs import runtime
from jobs.runtime import WorkerContext
from rtedit.errors import ConfigError
from rtedit.train.config import JobConfig, load_job_config
from rtedit.train.reward.task import RewardTask, RewardTaskConfig, export_reward, time_steps
from rtedit.train.runtime import Trainable, build_optimizer, deepspeed_config

os.environ.setdefault("HF_HUB_OFFLINE", "1")
logger = logging.getLogger("jobs.train_reward")
STARTED = time.perf_counter()  # --max-seconds counts from here: reading the pairs and building the model count
TASK = "jobs.train_reward:build_task"
MODEL = "reward"


def zero3_config(config: JobConfig) -> dict | None:
    """The engine's DeepSpeed config when the reward model trains at ZeRO-3 (zero.Init builds it sharded), else None."""
    stage = config.zero_stage_for(MODEL)
    return deepspeed_config(config, config.scaling.use_gpu, stage) if stage == 3 else None


def build_task(ctx: WorkerContext) -> RewardTask:
    cfg = ctx.config.task_config(RewardTaskConfig)
    if cfg.offload_optimizer:
        raise ConfigError("task.offload_optimizer needs per-model DeepSpeed settings the shared runtime does not take "
                          "yet (ModelSpec has a ZeRO stage only): use `python -m jobs.train_reward --local`")
    return RewardTask(ctx, zero3_config(ctx.config))


def prepare(config: JobConfig) -> None:
    """Driver side: absolute paths for workers, the task section validated, the pair data present."""
    for key in ("data_dir", "backbone", "tokenizer"):
        value = config.task.get(key)
        if value and key == "data_dir" or (value and Path(value).is_dir()):
            config.task[key] = str(Path(value).expanduser().resolve())
    config.task.setdefault("data_dir", str(Path(RewardTaskConfig.data_dir).resolve()))
    cfg = config.task_config(RewardTaskConfig)
    if not (Path(cfg.data_dir) / "train").is_dir():
        raise ConfigError(f"no pairs under {cfg.data_dir}/train: make them first with "
                          f"python -m jobs.make_reward_data --out {cfg.data_dir} --n 2000")


def local(config: JobConfig, export: Path | None = None, max_seconds: float = 0.0) -> dict:
    """The task on one process, single-process DeepSpeed (no Ray): time run.max_steps steps; optionally export.

    max_seconds > 0: the steps end that many seconds after this module was imported (reading the pairs and
    building the model count too), run.max_steps cut to what fits once the first steps are timed."""
    import deepspeed

    ctx = runtime.local_worker_context(config)
    device, on_gpu, precision = ctx.device, config.scaling.use_gpu, ctx.precision
    cfg = config.task_config(RewardTaskConfig)
    stage = config.zero_stage_for(MODEL)
    ds = deepspeed_config(config, on_gpu, stage)
    if cfg.offload_optimizer:
        ds["zero_optimization"]["offload_optimizer"] = {"device": "cpu", "pin_memory": on_gpu}
        ds["zero_force_ds_cpu_optimizer"] = False  # our torch.optim AdamW steps on the host copy
    task = RewardTask(ctx, ds if stage == 3 else None)
    optimizer_config = config.optimizer_for(MODEL)
    optimizer = build_optimizer(task.model.parameters(), optimizer_config)
    engine, _, _, _ = deepspeed.initialize(model=task.model, optimizer=optimizer, config=ds)
    trainable = Trainable(MODEL, engine, optimizer_config, stage)
    original = task.train_step

    def step_with_lr(engines, step):
        trainable.set_lr(step, config.run.max_steps)  # a budget may lower max_steps after the first steps
        return original(engines, step)

    task.train_step = step_with_lr
    budget = max(1.0, max_seconds - (time.perf_counter() - STARTED)) if max_seconds > 0 else 0.0
    result = time_steps(task, engine, config.run.max_steps, device, budget_s=budget, log_every=config.run.log_every)
    result.update({"parameters": sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel()
                                     for p in task.model.parameters()),
                   "trainable_parameters": sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel()
                                               for p in task.model.parameters() if p.requires_grad),
                   "zero_stage": stage, "precision": precision, "offload_optimizer": cfg.offload_optimizer,
                   "lora": cfg.lora, "backbone": cfg.backbone, "head": cfg.head,
                   "gradient_checkpointing": cfg.gradient_checkpointing})
    if export is not None:
        import contextlib

        gather = (deepspeed.zero.GatheredParameters(list(engine.module.parameters()), modifier_rank=None)
                  if stage == 3 else contextlib.nullcontext())
        with gather:  # ZeRO-3 holds shards: the whole tensors for the save
            export_reward(engine.module, export, {"task": config.task, "local": True})
        result["export"] = str(export)
    return result


def main(argv: list[str] | None = None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--local" not in argv:
        return runtime.main(TASK, argv, description=__doc__.splitlines()[0], prepare=prepare)
    parser = argparse.ArgumentParser(description="the reward task without Ray: single-process DeepSpeed")
    parser.add_argument("--local", action="store_true")
    parser.add_argument("--config", required=True, type=Path)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--export", type=Path, default=None, help="save the trained model here")
    parser.add_argument("--json", type=Path, default=None, help="also write the timing JSON here")
    parser.add_argument("--max-seconds", type=float, default=0.0,
                        help="end the steps this many seconds after the start (data and model build included): "
                             "run.max_steps cut to what fits, timed on the first steps (the lr schedule follows)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    config = load_job_config(args.config, args.set)
    prepare(config)
    result = local(config, args.export, args.max_seconds)
    text = json.dumps(result, indent=1)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")
    print(text)
    return result


if __name__ == "__main__":
    main()
