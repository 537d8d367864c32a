"""DMD / DMDR distillation of the toy editor: python -m jobs.dmdr --config jobs/configs/dmdr_toy.yaml [--local].

A frozen full-attention teacher is the real score; the generator (a causal student folder, or the teacher's weights
in task.mode) and the fake score (a copy of the teacher) are one DeepSpeed engine each. One job step is DMD2's
two-time-scale update (rtedit.train.dmdr.train_one_step): a fake-score update every step, a generator update on
every task.fake_updates_per_generator-th, the reward term (task.reward_model) after its cold start, and, with
task.gan_discriminator_weight > 0, DMD2's GAN head (a third trainable model, `gan_head`, updated inside the fake
score's turn; the generator's GAN term weighted by task.gan_generator_weight). The last step exports a served
folder whose rtedit.json names the generator's steps and causal mode (rtedit.train.tasks.dmdr).

`--local` runs the same task in this process with single-process DeepSpeed and no Ray (jobs.runtime.run_local, as
jobs.train_teacher --local): the runtime's step loop, metrics columns, checkpoint layout (one DeepSpeed tag per model,
the step and task state) and export, written under run.output_path(); rerunning it resumes from its last checkpoint.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

import torch

from jobs import distill, runtime
from jobs.runtime import ModelSpec, WorkerContext
from rtedit.config_parsing import to_dict
from rtedit.errors import ConfigError
from rtedit.train.config import JobConfig, load_job_config
from rtedit.train.dmdr import GAN, gan_active, is_generator_turn, reward_active, train_one_step
from rtedit.train.tasks.distill import cache_config, load_distill_cache
from rtedit.train.tasks.dmdr import (DMDRTaskConfig, LatentDecoder, PickingBatcher, batch_reward_fn, build_fake_score,
                                     build_gan_head, build_generator, conditions, euler_sample, exact_targets,
                                     export_generator, generator_timesteps, load_reward_model, load_teacher,
                                     reward_win_rate, served_sigmas, VelocityModel)

logger = logging.getLogger("jobs.dmdr")
TASK = "jobs.dmdr:build_task"
LOCAL_CHECKPOINT = runtime.LOCAL_CHECKPOINT


def _update(engine):
    """rtedit.train.dmdr's Update for a DeepSpeed engine: backward, then step (grad_accum_steps is 1)."""
    def update(loss: torch.Tensor) -> None:
        engine.backward(loss)
        engine.step()
    return update


class DMDRTask:
    """The generator, fake score and optional GAN head (trainable), the teacher and optional reward model (frozen),
    one two-time-scale update per job step."""

    def __init__(self, ctx: WorkerContext):
        self.ctx = ctx
        self.cfg = cfg = ctx.config.task_config(DMDRTaskConfig)
        if ctx.config.deepspeed.grad_accum_steps != 1:
            raise ConfigError("deepspeed.grad_accum_steps must be 1 for dmdr: each update of the two time scales is "
                              f"one batch, got {ctx.config.deepspeed.grad_accum_steps}")
        data = cache_config(cfg)  # reads the fields it shares with DistillTaskConfig
        self.cache = load_distill_cache(cfg, data)
        self.batches = PickingBatcher(self.cache, data, ctx.config.run.batch_size, ctx.config.run.seed, ctx.rank)
        height, width = self.cache["source"].shape[2:]
        self.dmdr = cfg.dmdr_config(generator_timesteps(cfg.steps, height * width))
        teacher = load_teacher(cfg.teacher)
        self.generator = build_generator(teacher, cfg).place(ctx.device, ctx.dtype)
        self.fake_score = build_fake_score(teacher).place(ctx.device, ctx.dtype)
        self.teacher = VelocityModel(teacher).place(ctx.device, ctx.dtype)
        self.gan_head = build_gan_head(teacher, cfg) if gan_active(self.dmdr) else None
        self.reward = self.decode = None
        self.baseline_sigmas = served_sigmas(cfg.baseline_steps, height * width)
        if cfg.reward_model:
            self.reward = load_reward_model(cfg.reward_model, ctx.device)
            self.decode = LatentDecoder(cfg.taef2_dir, height, width, ctx.device)
        self.updates = {"generator": 0, "fake_score": 0}
        logger.info("rank %d: %d examples, %d-step %s generator at %s, ratio %d, reward %s, GAN head %s", ctx.rank,
                    len(self.cache["families"]), cfg.steps, self.generator.mode, self.dmdr.generator_timesteps,
                    self.dmdr.fake_updates_per_generator, cfg.reward_model or "off",
                    f"on ({cfg.gan_real} real, weights {cfg.gan_discriminator_weight} / {cfg.gan_generator_weight})"
                    if self.gan_head is not None else "off")

    def models(self) -> dict[str, ModelSpec]:
        specs = {"generator": ModelSpec(self.generator), "fake_score": ModelSpec(self.fake_score),
                 "teacher": ModelSpec(self.teacher, trainable=False)}
        if self.gan_head is not None:
            specs["gan_head"] = ModelSpec(self.gan_head)
        if self.reward is not None:
            specs["reward"] = ModelSpec(self.reward, trainable=False)
        return specs

    def train_step(self, engines, step: int) -> dict[str, torch.Tensor]:
        device = self.ctx.device
        batch = self.batches(step)
        pick = self.batches.last_pick
        cond = conditions(batch, device)
        # Noise and draws are a pure function of (seed, rank, step): a resumed run redoes a step exactly.
        rng = torch.Generator(device=device).manual_seed(self.ctx.config.run.seed * 1_000_003 + self.ctx.rank * 7919
                                                         + step + 1)
        noise = torch.randn(batch["noisy"].shape, generator=rng, device=device)
        generator_turn = is_generator_turn(self.dmdr, step)
        reward_fn = baseline = None
        if self.reward is not None and generator_turn:
            reward_fn = batch_reward_fn(engines["reward"], self.decode, self.cache, pick)
            if reward_active(self.dmdr, step):
                baseline = euler_sample(engines["teacher"], noise, cond, self.baseline_sigmas.to(device))
        gan = real = None
        if self.gan_head is not None:
            # The plain modules, not the engines: DeepSpeed hooks an engine's forward outputs so that any backward
            # through them runs that engine's backward epilogue, and the GAN terms backpropagate through the fake
            # score and the head outside their engines' backward (into the generator's sample, the head's leaves).
            fake_score, head = engines["fake_score"].module, engines["gan_head"].module
            gan = GAN(lambda x_t, t, c: fake_score(x_t, t, c, features=True), head, _update(engines["gan_head"]))
            real = (exact_targets(self.cache, pick, device) if self.cfg.gan_real == "target" else
                    euler_sample(engines["teacher"], noise, cond, self.baseline_sigmas.to(device)))
        logs = train_one_step(step, engines["generator"], engines["teacher"], engines["fake_score"], noise, cond,
                              self.dmdr, _update(engines["generator"]), _update(engines["fake_score"]), rng,
                              reward_fn, baseline, gan, real)
        self.updates["fake_score"] += 1
        if generator_turn:
            self.updates["generator"] += 1
        if baseline is not None:
            with torch.no_grad():
                candidate = euler_sample(engines["generator"], noise, cond, served_sigmas(
                    self.cfg.steps, noise.shape[1]).to(device))
            logs["reward/win_rate"] = reward_win_rate(engines["reward"], self.decode, self.cache, pick, candidate,
                                                      baseline)
        # "loss" is the fake score's, the one term every step has; the generator's terms come on its turns.
        return {"loss": logs["loss/fake"], **logs, "updates/generator": torch.tensor(float(self.updates["generator"])),
                "updates/fake_score": torch.tensor(float(self.updates["fake_score"]))}

    def state_dict(self) -> dict[str, Any]:
        return {"updates": dict(self.updates)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.updates = dict(state["updates"])

    def export(self, models, folder: Path) -> None:
        generator = models["generator"]
        export_generator(generator.transformer, self.cfg, generator.mode, generator.condition_timestep, folder,
                         job_config=to_dict(self.ctx.config))


def build_task(ctx: WorkerContext) -> DMDRTask:
    return DMDRTask(ctx)


def prepare(config: JobConfig) -> None:
    """Driver side, before any worker: absolute paths, the task section validated, the teacher's latent cache."""
    distill.prepare(config, DMDRTaskConfig, (*distill.PATH_KEYS, "generator", "reward_model"))


def local(config: JobConfig) -> dict[str, Any]:
    """run.max_steps steps of the task in this process (jobs.runtime.run_local: single-process DeepSpeed, no Ray),
    checkpointed every run.checkpoint_every steps under run.output_path(); resumes from that checkpoint when there is
    one (every model, its optimizer and the task's update counters)."""
    return runtime.run_local(config, TASK)


def main(argv: list[str] | None = None) -> Any:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--local" not in argv:
        return runtime.main(TASK, argv, description=__doc__.splitlines()[0], prepare=prepare)
    parser = argparse.ArgumentParser(description="the dmdr task without Ray: single-process DeepSpeed")
    parser.add_argument("--local", action="store_true")
    parser.add_argument("--config", required=True, type=Path)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    config = load_job_config(args.config, args.set)
    prepare(config)
    result = local(config)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
