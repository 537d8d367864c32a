"""DMD / DMDR on the toy editor: a 1- or 2-step generator learns to match a frozen full-attention teacher.

- real score: the teacher folder's transformer (full attention, frozen, as distill's load_teacher loads it);
- generator: a student folder's transformer (a causal one, e.g. the distill job's `session` export, keeps its mode
  and condition timestep) or, without one, the teacher's weights with `mode`'s processors; its timesteps are the
  served sampler's sigmas for `steps` (what Editor.edit evaluates it at), so what trains is what serves;
- fake score: a trainable full-attention copy of the teacher, trained with the flow-matching loss;
- the losses are rtedit.train.dmdr's (generator_step, fake_score_step, train_one_step) over `VelocityModel`s, which
  run the transformer on a FlowBatcher batch's conditions (source latents, instruction embeddings, layout) exactly
  as distill's velocity_pass does: the data are the teacher's own latent cache, the clean targets unused;
- reward (optional, off unless `reward_model` is set): edit_reward_fn with the reward folder's EditReward, the
  candidates decoded through TAEF2, against the teacher's `baseline_steps`-step edit of the same input;
- GAN head (optional, off unless `gan_discriminator_weight > 0`): rtedit.train.dmdr's GANHead on the fake score's
  last hidden states of X's tokens (`VelocityModel(..., features=True)`: the input of the transformer's norm_out),
  real samples the batch's exact targets (`gan_real: target`) or the teacher's `baseline_steps`-step edits;
- export: the teacher's folder with the generator's transformer and an rtedit.json naming its steps (other step
  counts are refused when served) and its causal mode.
"""

from __future__ import annotations

import json
import math
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from rtedit.errors import ConfigError
from rtedit.train.config import section_check
from rtedit.train.dmdr import DMDRConfig, GANHead, RewardFn, edit_reward_fn
from rtedit.train.tasks.distill import export_student, load_teacher, student_layout, velocity_pass
from rtedit.train.tasks.teacher import FlowBatcher, sampler_sigmas

MODES = ("off", "kv", "session")


@dataclass
class DMDRTaskConfig:
    """The `task` section of jobs/configs/dmdr_toy.yaml."""

    teacher: str = "models/toy-editor"
    """A full-attention served folder with training_config.json: the real score, the fake score's start, the data."""
    generator: str | None = None
    """The generator's start: a served student folder (its rtedit.json's causal mode must be `mode`); None: the
    teacher's weights."""
    mode: typing.Literal["off", "kv", "session", False] = "session"
    """The generator's attention: off (full attention), kv or session (rtedit.model.causal). YAML reads a bare
    `off` as false, which means off here too."""
    condition_timestep: float = 0.0
    """The timestep a causal generator modulates its conditions at (a student folder's own wins)."""
    steps: int = 1
    """The generator's step count (1 or 2): the exported folder serves exactly this."""
    fake_updates_per_generator: int = 5
    renoise: typing.Literal["fresh", "euler"] = "euler"
    """A 2-step generator's second input in training: "euler" is what the served Euler sampler feeds it (the first
    step's x0 + v), "fresh" DMD2's fresh noise."""
    dmd_t_min: float = 0.02
    dmd_t_max: float = 0.98
    fake_t_min: float = 0.0
    fake_t_max: float = 1.0
    reward_model: str | None = None
    """An EditReward folder (jobs.train_reward's export); None: plain DMD."""
    reward_weight: float = 0.0
    reward_cold_start: int = 2000
    baseline_steps: int = 4
    """Steps of the teacher's edit that the reward compares the generator's against (and, with gan_real: teacher,
    the GAN head's real samples)."""
    gan_discriminator_weight: float = 0.0
    """> 0 builds the GAN head (one more trainable model, `gan_head`) and trains it in the fake score's update with
    this weight (DMD2's 1e-2); 0: no GAN head."""
    gan_generator_weight: float = 0.0
    """The generator's GAN loss weight (DMD2's 5e-3 on SDXL); needs gan_discriminator_weight > 0."""
    gan_t_min: float = 0.0
    gan_t_max: float = 1.0
    """The head's inputs are noised at t ~ U[gan_t_min, gan_t_max] (DMD2's diffusion GAN)."""
    gan_head_hidden: int = 128
    """The head's hidden width (its input is the transformer's inner width)."""
    gan_real: typing.Literal["target", "teacher"] = "target"
    """The head's real samples: the batch's exact targets (the cache's), or the teacher's baseline_steps-step edits."""
    data_dir: str = "data/toy"
    cache_dir: str | None = None
    taef2_dir: str | None = None
    encode_device: str | None = None
    encode_batch: int = 256
    logit_mean: float | None = None
    """Sampling fields of the teacher's cache config (distill's); DMD draws its own timesteps, so only the batches'
    mix of examples is affected."""
    logit_std: float | None = None
    focus_steps: tuple[int, ...] | None = None
    focus_share: float | None = None
    family_weights: dict[str, float] | None = None
    export_dtype: typing.Literal["float32", "bfloat16", "float16"] | None = None
    name: str | None = None

    def validate(self) -> None:
        need = section_check("task")

        need(bool(self.teacher), "teacher", self.teacher, "a model folder")
        need(bool(self.data_dir), "data_dir", self.data_dir, "a folder")
        if self.mode is False:
            self.mode = "off"
        need(self.mode in MODES, "mode", self.mode, f"one of {list(MODES)}")
        need(isinstance(self.steps, int) and self.steps in (1, 2), "steps", self.steps, "1 or 2")
        need(math.isfinite(self.condition_timestep) and 0 <= self.condition_timestep <= 1, "condition_timestep",
             self.condition_timestep, "in [0, 1]")
        need(isinstance(self.baseline_steps, int) and self.baseline_steps >= 1, "baseline_steps", self.baseline_steps,
             "an integer >= 1")
        need(self.encode_batch >= 1, "encode_batch", self.encode_batch, ">= 1")
        need(isinstance(self.gan_head_hidden, int) and self.gan_head_hidden >= 1, "gan_head_hidden",
             self.gan_head_hidden, "an integer >= 1")
        need(self.gan_real in ("target", "teacher"), "gan_real", self.gan_real, "target or teacher")
        if self.reward_weight > 0 and not self.reward_model:
            raise ConfigError(f"task.reward_weight is {self.reward_weight} but task.reward_model is not set: name an "
                              "EditReward folder (jobs.train_reward's export), or set the weight to 0")
        if self.reward_model and not self.reward_weight > 0:
            raise ConfigError(f"task.reward_model is set but task.reward_weight is {self.reward_weight!r}: give it a "
                              "positive weight (DMDR's 0.1), or leave the reward model out")
        self.dmdr_config((1.0,) if self.steps == 1 else (1.0, 0.5))

    def dmdr_config(self, timesteps: tuple[float, ...]) -> DMDRConfig:
        """The losses' settings with the generator's timesteps; their errors name this section's fields."""
        try:
            return DMDRConfig(generator_timesteps=timesteps, fake_updates_per_generator=self.fake_updates_per_generator,
                              dmd_t_min=self.dmd_t_min, dmd_t_max=self.dmd_t_max, fake_t_min=self.fake_t_min,
                              fake_t_max=self.fake_t_max, reward_weight=self.reward_weight,
                              reward_cold_start=self.reward_cold_start, renoise=self.renoise,
                              gan_discriminator_weight=self.gan_discriminator_weight,
                              gan_generator_weight=self.gan_generator_weight, gan_t_min=self.gan_t_min,
                              gan_t_max=self.gan_t_max).validate()
        except ConfigError as exc:
            raise ConfigError(str(exc).replace("dmdr.", "task.", 1)) from None


def generator_timesteps(steps: int, seq_len: int) -> tuple[float, ...]:
    """The sigmas the served sampler evaluates a `steps`-step model at, descending (1.0 first)."""
    return tuple(sorted((float(s) for s in sampler_sigmas((steps,), seq_len)), reverse=True))


# ---------------------------------------------------------------------------------------------------------------
# The models


class VelocityModel(torch.nn.Module):
    """velocity(x_t, t, cond) of rtedit.train.dmdr over a transformer: X's velocity on a batch's conditions, in the
    mode's masked pass (conditions first, modulated at condition_timestep) or full attention (the batch's order).

    `cond` is the FlowBatcher batch (its "cond", "embeds", "layout"); the DeepSpeed engine wraps this module, so the
    whole pass runs inside engine(...)."""

    def __init__(self, transformer: torch.nn.Module, mode: str = "off", condition_timestep: float | None = None):
        super().__init__()
        self.transformer, self.mode, self.condition_timestep = transformer, mode, condition_timestep
        self.device, self.dtype = torch.device("cpu"), torch.float32

    def place(self, device: torch.device, dtype: torch.dtype) -> VelocityModel:
        """Where the passes run and the dtype they compute in (the job's)."""
        self.device, self.dtype = device, dtype
        return self

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: dict[str, Any], features: bool = False) -> torch.Tensor:
        """X's velocity [B, N, C]; with `features`, X's last hidden states [B, N, D] instead (the input of the
        transformer's norm_out: the GAN head's features; full attention only)."""
        batch = {"noisy": x_t, "cond": cond["cond"], "sigma": t, "embeds": cond["embeds"]}
        if features:
            if self.mode != "off":
                raise ValueError(f"features are read from a full-attention pass, not mode {self.mode!r}")
            captured: list[torch.Tensor] = []
            hook = self.transformer.norm_out.register_forward_pre_hook(lambda _, args: captured.append(args[0]))
            try:
                velocity_pass(self.transformer, None, cond["layout"], batch, self.device, self.dtype)
            finally:
                hook.remove()
            return captured[-1][:, cond["layout"].target]
        if self.mode == "off":
            return velocity_pass(self.transformer, None, cond["layout"], batch, self.device, self.dtype).float()
        layout = student_layout(cond["layout"], self.condition_timestep)
        return velocity_pass(self.transformer, self.mode, layout, batch, self.device, self.dtype).float()


def copy_transformer(transformer: torch.nn.Module) -> torch.nn.Module:
    """A fresh trainable copy built from config and weights (no hooks or processors of the original come along)."""
    copy = type(transformer).from_config(transformer.config)
    copy.load_state_dict(transformer.state_dict())
    return copy.to(next(transformer.parameters()).dtype).train().requires_grad_(True)


def build_generator(teacher: torch.nn.Module, cfg: DMDRTaskConfig) -> VelocityModel:
    """The generator: the student folder's transformer in its own causal mode, or a copy of the teacher's."""
    from diffusers import Flux2Transformer2DModel

    from rtedit.model.causal import install_causal_processors
    from rtedit.presets import Sidecar

    condition_timestep = cfg.condition_timestep
    if cfg.generator:
        folder = Path(cfg.generator)
        if not (folder / "transformer").is_dir():
            raise ConfigError(f"task.generator: {folder} is not a model folder (no transformer/)")
        sidecar = Sidecar.load(folder) or Sidecar()
        if sidecar.attention != cfg.mode:
            raise ConfigError(f"task.generator: {folder} was trained with attention {sidecar.attention!r} "
                              f"(rtedit.json causal={sidecar.causal!r}) but task.mode is {cfg.mode!r}")
        if sidecar.condition_timestep is not None:
            condition_timestep = sidecar.condition_timestep
        transformer = Flux2Transformer2DModel.from_pretrained(folder / "transformer", torch_dtype=torch.float32)
        transformer = transformer.train().requires_grad_(True)
    else:
        transformer = copy_transformer(teacher)
    if cfg.mode != "off":
        install_causal_processors(transformer, cfg.mode)
    return VelocityModel(transformer, cfg.mode, condition_timestep if cfg.mode != "off" else None)


def build_fake_score(teacher: torch.nn.Module) -> VelocityModel:
    """The fake score: a trainable full-attention copy of the teacher (DMD2 starts it at the real score)."""
    return VelocityModel(copy_transformer(teacher))


def build_gan_head(teacher: torch.nn.Module, cfg: DMDRTaskConfig) -> GANHead:
    """The GAN head over the fake score's hidden states (the teacher's inner width; the fake score is its copy)."""
    config = teacher.config
    return GANHead(config.num_attention_heads * config.attention_head_dim, cfg.gan_head_hidden)


def exact_targets(cache: dict[str, Any], pick: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The batch's exact target latents as packed tokens [B, N, C]: the GAN head's real samples."""
    from rtedit.model.packing import pack

    return pack(cache["target"][pick].float()).to(device)


class PickingBatcher(FlowBatcher):
    """FlowBatcher that also remembers the example indices of its last batch (the reward needs the instructions and
    source images, which a batch carries only as embeddings and latents)."""

    last_pick: torch.Tensor | None = None

    def sample(self, g: torch.Generator) -> tuple[bool, torch.Tensor]:
        use_ref, pick = super().sample(g)
        self.last_pick = pick
        return use_ref, pick


def conditions(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """The generator's `cond` from a FlowBatcher batch: conditions on the device, the layout there too."""
    return {"cond": batch["cond"].to(device), "embeds": batch["embeds"].to(device),
            "layout": batch["layout"].to(device)}


@torch.no_grad()
def euler_sample(velocity, noise: torch.Tensor, cond: Any, sigmas: torch.Tensor) -> torch.Tensor:
    """The served sampler's result (Euler over `sigmas`, the last 0): the teacher's baseline edit."""
    x = noise
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        t = torch.full((noise.shape[0],), float(sigma), device=noise.device)
        x = x + (float(sigma_next) - float(sigma)) * velocity(x, t, cond)
    return x


def served_sigmas(steps: int, seq_len: int) -> torch.Tensor:
    """The sampler's sigmas for `steps` steps, the final 0 included (rtedit.model.schedule's TimestepCache)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from rtedit.model.schedule import TimestepCache
    from rtedit.presets import SCHEDULER_CONFIG

    return TimestepCache(FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG)).get(seq_len, steps,
                                                                                   torch.device("cpu"))[1].float()


# ---------------------------------------------------------------------------------------------------------------
# The reward


class LatentDecoder:
    """Packed latent tokens [B, N, 128] -> pixels [B, 3, H, W] in [0, 1] through TAEF2, differentiable."""

    def __init__(self, taef2_dir: str | None, height: int, width: int, device: torch.device):
        from rtedit.accel.taef2 import load_taef2
        from rtedit.train.tasks.teacher import build_placeholder_vae
        from rtedit.vae import LatentCodec

        taef2 = load_taef2(taef2_dir, device=device, dtype=torch.float32).requires_grad_(False)
        self.codec = LatentCodec(build_placeholder_vae().to(device), taef2)
        self.height, self.width = height, width

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        from rtedit.model.packing import unpack

        pixels = self.codec.decode(unpack(tokens.float(), self.height, self.width))
        return ((pixels + 1) / 2).clamp(0, 1)


def load_reward_model(folder: str, device: torch.device) -> torch.nn.Module:
    """The frozen EditReward the reward term scores with (float32: its gradient reaches the generator)."""
    from rtedit.train.reward.model import EditReward

    if not Path(folder).is_dir():
        raise ConfigError(f"task.reward_model: {folder} is not a folder")
    return EditReward.from_pretrained(folder, device=device, dtype=torch.float32)


def batch_reward_fn(reward_model: torch.nn.Module, decode: LatentDecoder, cache: dict[str, Any],
                    pick: torch.Tensor) -> RewardFn:
    """edit_reward_fn over this batch's source images (decoded from the cache) and instructions."""
    from rtedit.model.packing import pack

    with torch.no_grad():
        sources = decode(pack(cache["source"][pick].float()).to(decode.codec.device))
    instructions = [cache["instructions"][int(i)] for i in cache["instruction"][pick]]
    return edit_reward_fn(reward_model, sources, instructions, decode)


def reward_win_rate(reward_model: torch.nn.Module, decode: LatentDecoder, cache: dict[str, Any], pick: torch.Tensor,
                    candidate: torch.Tensor, baseline: torch.Tensor) -> torch.Tensor:
    """The share of the batch where the reward model prefers the generator's edit to the teacher's baseline."""
    from rtedit.model.packing import pack
    from rtedit.train.reward.loss import reward_loss

    with torch.no_grad():
        sources = decode(pack(cache["source"][pick].float()).to(decode.codec.device))
        instructions = [cache["instructions"][int(i)] for i in cache["instruction"][pick]]
        losses = reward_loss(reward_model, decode(candidate), sources, instructions, decode(baseline), "none")
    return (losses < math.log(2)).float().mean()  # -log sigmoid(logit) < log 2  <=>  logit > 0


# ---------------------------------------------------------------------------------------------------------------
# Export


def export_generator(transformer: torch.nn.Module, cfg: DMDRTaskConfig, mode: str, condition_timestep: float | None,
                     folder: str | Path, job_config: dict[str, Any] | None = None) -> Path:
    """The teacher's folder with the generator's transformer; rtedit.json names its steps and causal mode (distill's
    export_student writes the folder, then the sidecar says what DMD trained)."""
    from types import SimpleNamespace

    from rtedit.presets import SIDECAR_NAME

    folder = Path(folder)
    written = SimpleNamespace(teacher=cfg.teacher, export_dtype=cfg.export_dtype, name=cfg.name, mode=mode,
                              condition_timestep=condition_timestep or 0.0)
    export_student(transformer, written, folder, job_config=job_config)
    sidecar = json.loads((folder / SIDECAR_NAME).read_text())
    teacher_sidecar = Path(cfg.teacher) / SIDECAR_NAME
    teacher_name = (json.loads(teacher_sidecar.read_text()).get("name") if teacher_sidecar.is_file()
                    else None) or Path(cfg.teacher).name
    kind = "DMDR" if cfg.reward_model else "DMD"
    attention = "full attention" if mode == "off" else f"{mode} causal"
    sidecar["name"] = cfg.name or f"{teacher_name} ({cfg.steps}-step {kind}, {attention})"
    sidecar["description"] = (f"{cfg.steps}-step {attention} editor distilled from {teacher_name} by rtedit's dmdr "
                              f"job ({kind}: distribution matching" + (" with the EditReward loss)." if cfg.reward_model
                                                                        else ")."))
    sidecar["steps"] = [cfg.steps]
    if mode == "off":
        sidecar.pop("causal", None)
        sidecar.pop("condition_timestep", None)
    (folder / SIDECAR_NAME).write_text(json.dumps(sidecar, indent=2) + "\n")
    return folder


__all__ = ["DMDRTaskConfig", "LatentDecoder", "PickingBatcher", "VelocityModel", "batch_reward_fn", "build_fake_score",
           "build_gan_head", "build_generator", "conditions", "euler_sample", "exact_targets", "export_generator",
           "generator_timesteps", "load_reward_model", "load_teacher", "reward_win_rate", "served_sigmas"]
