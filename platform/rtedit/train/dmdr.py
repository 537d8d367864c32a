"""DMD2-style distribution-matching distillation with an optional reward term (DMDR), over abstract velocity models.

Every model is a callable `velocity(x_t, t, cond) -> v` of the rectified flow the project samples:

    x_t = (1 - t) x0 + t noise,   v = noise - x0,   x0 prediction = x_t - t v.

- generator: its own timestep list (1 or 2 entries, descending, the first 1.0 = pure noise). A 2-step generator
  trains one step at a time: the step is drawn, and its input is made by running the earlier steps without grad
  and renoising their x0 prediction with fresh noise (DMD2's backward simulation);
- real score: the frozen teacher (exact for the toy known-answer test, a FLUX.2 klein transformer for real use);
- fake score: a trainable copy, trained with the flow-matching loss on detached generator samples (`fake_score_step`);
- generator loss (`generator_step`): the DMD gradient (fake x0 - real x0 at a noised generator sample, divided per
  sample by the mean |sample - real x0|, DMD2's weighting), applied as 0.5 * MSE(x, sg(x - grad)) so that
  d loss / d x = grad / numel; plus `reward_weight * reward_fn(candidate, baseline)` once `step >= reward_cold_start`;
- two time scales: the fake score takes `fake_updates_per_generator` updates per generator update
  (`is_generator_turn`); `train_one_step` runs one step of both as DMD2's train_one_step does.

A real-score CFG, or a LoRA fake score, lives inside the callables; nothing here knows the models' shapes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from rtedit.train.config import section_check

Velocity = Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor]
"""velocity(x_t [B, ...], t [B] in [0, 1], cond) -> v [B, ...]."""
RewardFn = Callable[[torch.Tensor, "torch.Tensor | None"], torch.Tensor]
"""reward_fn(candidate [B, ...], baseline or None) -> a scalar loss (lower is better), differentiable in candidate."""
RENOISE = ("fresh", "euler")
Update = Callable[[torch.Tensor], None]
"""Backpropagates a loss and steps one model's optimizer (a DeepSpeed engine's backward + step, or `torch_update`)."""


@dataclass
class DMDRConfig:
    """Settings of DMD / DMDR training; the defaults are DMD2's and DMDR's published ones."""

    generator_timesteps: tuple[float, ...] = (1.0,)
    """The generator's sampling timesteps, descending, starting at 1.0 (pure noise): (1.0,) or e.g. (1.0, 0.5)."""
    fake_updates_per_generator: int = 5
    """Fake-score updates per generator update (DMD2's and DMDR's ratio 5; RTDMD uses 10)."""
    dmd_t_min: float = 0.02
    """The DMD loss noises the generator sample at t ~ U[dmd_t_min, dmd_t_max] (DMD2's 0.02T to 0.98T)."""
    dmd_t_max: float = 0.98
    fake_t_min: float = 0.0
    """The fake score's flow-matching loss draws t ~ U[fake_t_min, fake_t_max]."""
    fake_t_max: float = 1.0
    normaliser_eps: float = 1e-8
    """Added to the per-sample mean |x - real x0| so a sample the teacher already reproduces divides by no zero."""
    reward_weight: float = 0.0
    """Weight of the reward loss in the generator loss (0: plain DMD; DMDR's 0.1)."""
    reward_cold_start: int = 2000
    """Generator updates before which the reward is off (DMDR's 2,000), counted in job steps."""
    renoise: str = "fresh"
    """How a multi-step generator's x0 becomes the next step's input: "fresh" noise (DMD2's), or "euler", the
    model's own noise estimate x0 + v, which is what the served Euler sampler feeds its next step."""

    def validate(self) -> DMDRConfig:
        need = section_check("dmdr")

        steps = tuple(self.generator_timesteps)
        need(len(steps) in (1, 2), "generator_timesteps", steps, "a list of 1 or 2 timesteps")
        need(all(isinstance(t, (int, float)) and math.isfinite(t) for t in steps), "generator_timesteps", steps,
             "finite numbers")
        need(steps[0] == 1.0, "generator_timesteps", steps, "a list starting at 1.0 (the generator starts from noise)")
        need(all(0 < b < a for a, b in zip(steps, steps[1:])), "generator_timesteps", steps,
             "strictly descending and > 0")
        need(isinstance(self.fake_updates_per_generator, int) and self.fake_updates_per_generator >= 1,
             "fake_updates_per_generator", self.fake_updates_per_generator, "an integer >= 1")
        for low, high in (("dmd_t_min", "dmd_t_max"), ("fake_t_min", "fake_t_max")):
            lo, hi = getattr(self, low), getattr(self, high)
            need(math.isfinite(lo) and math.isfinite(hi) and 0 <= lo < hi <= 1, f"{low}/{high}", (lo, hi),
                 "0 <= min < max <= 1")
        need(self.dmd_t_min > 0, "dmd_t_min", self.dmd_t_min, "> 0 (at t = 0 both scores return the sample itself)")
        need(math.isfinite(self.normaliser_eps) and self.normaliser_eps > 0, "normaliser_eps", self.normaliser_eps,
             "a finite number > 0")
        need(math.isfinite(self.reward_weight) and self.reward_weight >= 0, "reward_weight", self.reward_weight,
             "a finite number >= 0")
        need(isinstance(self.reward_cold_start, int) and self.reward_cold_start >= 0, "reward_cold_start",
             self.reward_cold_start, "an integer >= 0")
        need(self.renoise in RENOISE, "renoise", self.renoise, f"one of {list(RENOISE)}")
        self.generator_timesteps = tuple(float(t) for t in steps)
        return self


# ---------------------------------------------------------------------------------------------------------------
# The flow


def _per_sample(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """t [B] shaped to broadcast over a sample [B, ...]."""
    return t.to(like.dtype).reshape(-1, *([1] * (like.ndim - 1)))


def add_noise(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x_t = (1 - t) x0 + t noise."""
    t = _per_sample(t, x0)
    return (1 - t) * x0 + t * noise


def predict_x0(velocity: Velocity, x_t: torch.Tensor, t: torch.Tensor, cond: Any) -> torch.Tensor:
    """x0 = x_t - t v: a velocity model's estimate of the clean sample."""
    return x_t - _per_sample(t, x_t) * velocity(x_t, t, cond)


def uniform_t(batch: int, low: float, high: float, generator: torch.Generator | None, device) -> torch.Tensor:
    return low + (high - low) * torch.rand(batch, generator=generator, device=device)


def _randn_like(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


# ---------------------------------------------------------------------------------------------------------------
# The generator and its backward simulation


@dataclass
class GeneratorSample:
    """The generator's x0 prediction at one of its steps, and the input that step saw."""

    x0: torch.Tensor
    """The x0 prediction of the trained step (with grad when made with grad)."""
    x_t: torch.Tensor
    """That step's input: pure noise at step 0, else the renoised output of the earlier steps (no grad)."""
    step_index: int
    t: float


def draw_step_index(cfg: DMDRConfig, generator: torch.Generator | None = None) -> int:
    """The generator step to train, uniform over its timestep list (one per batch, as DMD2 draws it)."""
    steps = len(cfg.generator_timesteps)
    return 0 if steps == 1 else int(torch.randint(steps, (), generator=generator))


def backward_simulation(generator_model: Velocity, noise: torch.Tensor, cond: Any, cfg: DMDRConfig, step_index: int,
                        rng: torch.Generator | None = None) -> torch.Tensor:
    """The input of the generator's step `step_index`: its earlier steps run from `noise` without grad, each x0
    renoised with fresh noise to the next timestep, as the sampler would have produced it."""
    timesteps = cfg.generator_timesteps
    if not 0 <= step_index < len(timesteps):
        raise ValueError(f"step_index {step_index} is outside the generator's {len(timesteps)} steps")
    x_t = noise
    with torch.no_grad():
        for k in range(step_index):
            t = torch.full((noise.shape[0],), timesteps[k], device=noise.device)
            x0, next_noise = _x0_and_next_noise(generator_model, x_t, t, cond, cfg.renoise, rng)
            x_t = add_noise(x0, next_noise, torch.full_like(t, timesteps[k + 1]))
    return x_t.detach()


def _x0_and_next_noise(velocity: Velocity, x_t: torch.Tensor, t: torch.Tensor, cond: Any, renoise: str,
                       rng: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The x0 prediction and the noise its renoising to the next timestep uses (fresh, or the model's x0 + v)."""
    v = velocity(x_t, t, cond)
    x0 = x_t - _per_sample(t, x_t) * v
    return x0, (x0 + v if renoise == "euler" else _randn_like(x0, rng))


def generate(generator_model: Velocity, noise: torch.Tensor, cond: Any, cfg: DMDRConfig, step_index: int | None = None,
             rng: torch.Generator | None = None, grad: bool = True) -> GeneratorSample:
    """The generator's x0 at step `step_index` (drawn when None) from `noise`, with grad through that step only."""
    if step_index is None:
        step_index = draw_step_index(cfg, rng)
    x_t = backward_simulation(generator_model, noise, cond, cfg, step_index, rng)
    t_value = cfg.generator_timesteps[step_index]
    t = torch.full((noise.shape[0],), t_value, device=noise.device)
    with torch.set_grad_enabled(grad):
        x0 = predict_x0(generator_model, x_t, t, cond)
    return GeneratorSample(x0 if grad else x0.detach(), x_t, step_index, t_value)


@torch.no_grad()
def sample(generator_model: Velocity, noise: torch.Tensor, cond: Any, timesteps: Sequence[float],
           renoise: str = "fresh") -> torch.Tensor:
    """The generator's output after all its steps (inference: each x0 renoised to the next timestep; "euler" is the
    served Euler sampler's result at these timesteps)."""
    x_t = noise
    for k, t_value in enumerate(timesteps):
        t = torch.full((noise.shape[0],), float(t_value), device=noise.device)
        if k + 1 < len(timesteps):
            x0, next_noise = _x0_and_next_noise(generator_model, x_t, t, cond, renoise, None)
            x_t = add_noise(x0, next_noise, torch.full_like(t, float(timesteps[k + 1])))
        else:
            x0 = predict_x0(generator_model, x_t, t, cond)
    return x0


# ---------------------------------------------------------------------------------------------------------------
# The two updates


def reward_active(cfg: DMDRConfig, step: int) -> bool:
    """The reward term counts from step `reward_cold_start` on, and only with a positive weight."""
    return cfg.reward_weight > 0 and step >= cfg.reward_cold_start


def dmd_gradient(real_score: Velocity, fake_score: Velocity, x0: torch.Tensor, cond: Any, cfg: DMDRConfig,
                 rng: torch.Generator | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """DMD2's generator gradient at the sample x0: (fake x0 - real x0) at a noised x0, over mean |x0 - real x0|."""
    with torch.no_grad():
        x0 = x0.detach()
        t = uniform_t(x0.shape[0], cfg.dmd_t_min, cfg.dmd_t_max, rng, x0.device)
        x_t = add_noise(x0, _randn_like(x0, rng), t)
        real_x0 = predict_x0(real_score, x_t, t, cond)
        fake_x0 = predict_x0(fake_score, x_t, t, cond)
        dims = tuple(range(1, x0.ndim))
        normaliser = (x0 - real_x0).abs().mean(dim=dims, keepdim=True) + cfg.normaliser_eps
        grad = torch.nan_to_num((fake_x0 - real_x0) / normaliser)
    return grad, {"dmd/t": t.mean(), "dmd/normaliser": normaliser.mean(), "dmd/grad_abs": grad.abs().mean()}


def generator_step(generator_model: Velocity, real_score: Velocity, fake_score: Velocity, noise: torch.Tensor,
                   cond: Any, cfg: DMDRConfig, step: int, rng: torch.Generator | None = None,
                   reward_fn: RewardFn | None = None, baseline: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, GeneratorSample, dict[str, torch.Tensor]]:
    """The generator's loss at job step `step`: DMD plus (after the cold start) the weighted reward loss.

    Returns (loss to backpropagate into the generator only, the sample it was computed on, detached logs). The scores
    run without grad; `reward_fn` must hold its own model frozen.
    """
    # 1. The generator's x0 at a drawn step; its earlier steps ran without grad (backward simulation).
    generated = generate(generator_model, noise, cond, cfg, rng=rng, grad=True)
    x0 = generated.x0
    # 2. The DMD gradient at that sample, from the frozen teacher and the fake score.
    grad, logs = dmd_gradient(real_score, fake_score, x0, cond, cfg, rng)
    # 3. A surrogate whose gradient in x0 is grad (over x0.numel()), so autograd carries it into the generator.
    loss_dmd = 0.5 * F.mse_loss(x0.float(), (x0 - grad).detach().float())
    loss = loss_dmd
    logs["loss/dmd"] = loss_dmd.detach()
    # 4. The reward against the baseline (the teacher's output on the same input), after the cold start.
    if reward_fn is not None and reward_active(cfg, step):
        loss_reward = reward_fn(x0, baseline)
        loss = loss + cfg.reward_weight * loss_reward
        logs["loss/reward"] = loss_reward.detach()
    elif reward_fn is not None:
        logs["loss/reward"] = torch.zeros((), device=x0.device)
    logs["generator/step_index"] = torch.tensor(float(generated.step_index))
    return loss, generated, logs


def fake_score_step(fake_score: Velocity, samples: torch.Tensor, cond: Any, cfg: DMDRConfig,
                    rng: torch.Generator | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The fake score's flow-matching loss on detached generator samples: it tracks the generator's distribution."""
    x0 = samples.detach()
    t = uniform_t(x0.shape[0], cfg.fake_t_min, cfg.fake_t_max, rng, x0.device)
    noise = _randn_like(x0, rng)
    predicted = fake_score(add_noise(x0, noise, t), t, cond)
    loss = F.mse_loss(predicted.float(), (noise - x0).float())
    return loss, {"loss/fake": loss.detach()}


# ---------------------------------------------------------------------------------------------------------------
# One training step


def is_generator_turn(cfg: DMDRConfig, step: int) -> bool:
    """DMD2's two time scales: the generator updates on every `fake_updates_per_generator`-th step."""
    return step % cfg.fake_updates_per_generator == 0


def torch_update(optimizer: torch.optim.Optimizer) -> Update:
    """An Update for a plain torch optimizer: zero its grads, backpropagate, step."""
    def update(loss: torch.Tensor) -> None:
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return update


def train_one_step(step: int, generator_model: Velocity, real_score: Velocity, fake_score: Velocity,
                   noise: torch.Tensor, cond: Any, cfg: DMDRConfig, update_generator: Update, update_fake: Update,
                   rng: torch.Generator | None = None, reward_fn: RewardFn | None = None,
                   baseline: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """A generator turn on every ratio-th step, then a fake-score turn every step (on that turn's samples when it ran).

    The fake score's grads from the generator turn are none (it ran under no_grad), so its update sees only its own
    loss; the generator's update sees only the generator loss, as its samples are detached for the fake score.
    """
    logs: dict[str, torch.Tensor] = {}
    samples = None
    if is_generator_turn(cfg, step):
        loss, generated, gen_logs = generator_step(generator_model, real_score, fake_score, noise, cond, cfg, step,
                                                   rng, reward_fn, baseline)
        update_generator(loss)
        logs.update(gen_logs, **{"loss/generator": loss.detach()})
        samples = generated.x0.detach()
    if samples is None:
        samples = generate(generator_model, noise, cond, cfg, rng=rng, grad=False).x0
    loss_fake, fake_logs = fake_score_step(fake_score, samples, cond, cfg, rng)
    update_fake(loss_fake)
    logs.update(fake_logs)
    return logs


def edit_reward_fn(reward_model, sources: torch.Tensor, instructions: Sequence[str],
                   decode: Callable[[torch.Tensor], torch.Tensor]) -> RewardFn:
    """The editor's reward: rtedit.train.reward.loss.reward_loss of the decoded candidate against the decoded
    baseline (the teacher's edit of the same source), differentiable through `decode` into the generator."""
    from rtedit.train.reward.loss import reward_loss

    def reward_fn(candidate: torch.Tensor, baseline: torch.Tensor | None) -> torch.Tensor:
        if baseline is None:
            raise ValueError("the edit reward needs a baseline candidate (the teacher's output on the same input)")
        with torch.no_grad():
            decoded_baseline = decode(baseline)
        return reward_loss(reward_model, decode(candidate), sources, instructions, decoded_baseline)
    return reward_fn


__all__ = ["DMDRConfig", "GeneratorSample", "Update", "Velocity", "RewardFn", "add_noise", "backward_simulation",
           "dmd_gradient", "draw_step_index", "edit_reward_fn", "fake_score_step", "generate", "generator_step",
           "is_generator_turn", "predict_x0", "reward_active", "sample", "torch_update", "train_one_step"]
