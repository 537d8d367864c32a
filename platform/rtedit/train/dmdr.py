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
  (`is_generator_turn`); `train_one_step` runs one step of both as DMD2's train_one_step does;
- optional GAN head (DMD2's `cls_on_clean_image`, off unless `gan_discriminator_weight > 0`): a small head (`GANHead`)
  on the fake score's intermediate features of a noised sample (t ~ U[gan_t_min, gan_t_max], DMD2's diffusion GAN)
  gives one realism logit. Inside `fake_score_step` the head and, through its features, the fake score are trained
  with the non-saturating discriminator loss softplus(D(fake)) + softplus(-D(real)) on real samples (the exact
  targets, or the teacher's edits) against detached generator samples, weighted by `gan_discriminator_weight`;
  `generator_step` adds `gan_generator_weight * softplus(-D(generated))`, whose gradient reaches the generator's
  sample only (`input_gradient_term`): every model's update sees only its own loss, one optimizer (or DeepSpeed
  engine) each.

A real-score CFG, or a LoRA fake score, lives inside the callables; nothing here knows the models' shapes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from torch import nn

from rtedit.train.config import section_check

Velocity = Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor]
"""velocity(x_t [B, ...], t [B] in [0, 1], cond) -> v [B, ...]."""
RewardFn = Callable[[torch.Tensor, "torch.Tensor | None"], torch.Tensor]
"""reward_fn(candidate [B, ...], baseline or None) -> a scalar loss (lower is better), differentiable in candidate."""
RENOISE = ("fresh", "euler")
Update = Callable[[torch.Tensor], None]
"""Backpropagates a loss and steps one model's optimizer (a DeepSpeed engine's backward + step, or `torch_update`)."""
Features = Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor]
"""features(x_t [B, ...], t [B], cond) -> the fake score's intermediate features [B, ...] at x_t, with grad into it."""


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
    gan_discriminator_weight: float = 0.0
    """Weight of the GAN head's discriminator loss in the fake score's update (0: no GAN head; DMD2's
    guidance_cls_loss_weight 1e-2). It trains the head and, through its features, the fake score."""
    gan_generator_weight: float = 0.0
    """Weight of the non-saturating GAN loss softplus(-D(x0)) in the generator loss (DMD2's gen_cls_loss_weight:
    5e-3 on SDXL, 3e-3 on ImageNet, 1e-3 on SD 1.5); needs the head on."""
    gan_t_min: float = 0.0
    """The discriminator sees its inputs noised at t ~ U[gan_t_min, gan_t_max] (DMD2's diffusion GAN over the whole
    schedule); gan_t_min = gan_t_max = 0 shows it the clean samples."""
    gan_t_max: float = 1.0

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
        for name in ("gan_discriminator_weight", "gan_generator_weight"):
            value = getattr(self, name)
            need(isinstance(value, (int, float)) and math.isfinite(value) and value >= 0, name, value,
                 "a finite number >= 0")
        need(self.gan_generator_weight == 0 or self.gan_discriminator_weight > 0, "gan_generator_weight",
             self.gan_generator_weight, "0 while gan_discriminator_weight is 0 (the GAN head would never learn: give "
             "it a positive gan_discriminator_weight, DMD2's 1e-2)")
        lo, hi = self.gan_t_min, self.gan_t_max
        need(all(isinstance(v, (int, float)) and math.isfinite(v) for v in (lo, hi)) and 0 <= lo <= hi <= 1
             and lo < 1, "gan_t_min/gan_t_max", (lo, hi), "0 <= min <= max <= 1 with min < 1 (at t = 1 the head sees "
             "pure noise)")
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


def gan_active(cfg: DMDRConfig) -> bool:
    """The GAN head trains (and so is built) when its discriminator loss has a positive weight."""
    return cfg.gan_discriminator_weight > 0


class GANHead(nn.Module):
    """DMD2's discriminator head, for token features: [B, N, D] (or [B, D]) -> one realism logit per sample.

    DMD2 downsamples the UNet bottleneck with strided convolutions, GroupNorm and SiLU to one logit; over a
    transformer's tokens (already mixed by attention) a per-token MLP, the mean over tokens and a linear layer do
    that job. It computes in its own parameters' dtype and returns float32 logits."""

    def __init__(self, dim: int, hidden: int = 128):
        super().__init__()
        self.net = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden),
                                 nn.SiLU())
        self.out = nn.Linear(hidden, 1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        h = self.net(features.to(self.out.weight.dtype))
        if h.ndim > 2:
            h = h.mean(dim=tuple(range(1, h.ndim - 1)))
        return self.out(h).squeeze(-1).float()


@dataclass
class GAN:
    """The GAN head's parts as the two steps call them: the fake score's features, the head, and the head's Update."""

    features: Features
    head: Callable[[torch.Tensor], torch.Tensor]
    update_head: Update


def _check_gan(cfg: DMDRConfig, gan: GAN | None) -> None:
    if gan_active(cfg) != (gan is not None):
        raise ValueError(f"gan_discriminator_weight is {cfg.gan_discriminator_weight} but the GAN head is "
                         f"{'missing' if gan is None else 'given'}: build it exactly when the weight is positive")


def gan_logits(gan: GAN, samples: torch.Tensor, cond: Any, cfg: DMDRConfig, rng: torch.Generator | None,
               head_input: Callable[[torch.Tensor], torch.Tensor] = lambda f: f
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """(the head's logits [B], the features they were read from) of `samples` noised at t ~ U[gan_t_min, gan_t_max]
    (DMD2's diffusion GAN). `head_input` maps the features before the head (a detached leaf, say)."""
    t = uniform_t(samples.shape[0], cfg.gan_t_min, cfg.gan_t_max, rng, samples.device)
    features = gan.features(add_noise(samples, _randn_like(samples, rng), t), t, cond)
    return gan.head(head_input(features)), features


def discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """The non-saturating GAN discriminator loss: softplus(D(fake)) + softplus(-D(real)) (DMD2's)."""
    return F.softplus(fake_logits).mean() + F.softplus(-real_logits).mean()


def input_gradient_term(loss_fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """A term whose value is loss_fn(x) and whose gradient reaches x alone, never the parameters loss_fn runs
    (torch.autograd.grad accumulates nothing into them): the generator's GAN loss passes through the fake score and
    the head, which their own updates train."""
    leaf = x.detach().requires_grad_(True)
    value = loss_fn(leaf)
    (grad,) = torch.autograd.grad(value, leaf)
    linear = (x.float() * grad.float()).sum()
    return value.detach() + linear - linear.detach()


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
                   reward_fn: RewardFn | None = None, baseline: torch.Tensor | None = None, gan: GAN | None = None
                   ) -> tuple[torch.Tensor, GeneratorSample, dict[str, torch.Tensor]]:
    """The generator's loss at job step `step`: DMD, plus (after the cold start) the weighted reward loss, plus the
    weighted GAN generator loss when the head is on.

    Returns (loss to backpropagate into the generator only, the sample it was computed on, detached logs). The scores
    and the GAN head take no gradient; `reward_fn` must hold its own model frozen.
    """
    _check_gan(cfg, gan)
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
    # 5. The GAN generator loss: the head's non-saturating loss at the noised sample, its gradient into x0 only.
    if gan is not None and cfg.gan_generator_weight > 0:
        loss_gan = input_gradient_term(lambda x: F.softplus(-gan_logits(gan, x, cond, cfg, rng)[0]).mean(), x0)
        loss = loss + cfg.gan_generator_weight * loss_gan
        logs["loss/gan_generator"] = loss_gan.detach()
    logs["generator/step_index"] = torch.tensor(float(generated.step_index))
    return loss, generated, logs


def fake_score_step(fake_score: Velocity, samples: torch.Tensor, cond: Any, cfg: DMDRConfig,
                    rng: torch.Generator | None = None, gan: GAN | None = None, real: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The fake score's flow-matching loss on detached generator samples: it tracks the generator's distribution.

    With the GAN head on, the head's discriminator loss on `real` against `samples` updates the head here (through
    gan.update_head), and the returned loss also carries that loss's gradient into the fake score's features (DMD2's
    guidance update trains the classifier's trunk too); its value, and "loss/fake", stay the flow-matching loss.
    """
    _check_gan(cfg, gan)
    x0 = samples.detach()
    t = uniform_t(x0.shape[0], cfg.fake_t_min, cfg.fake_t_max, rng, x0.device)
    noise = _randn_like(x0, rng)
    predicted = fake_score(add_noise(x0, noise, t), t, cond)
    loss = F.mse_loss(predicted.float(), (noise - x0).float())
    logs = {"loss/fake": loss.detach()}
    if gan is not None:
        if real is None:
            raise ValueError("the GAN head needs real samples (the exact targets, or the teacher's outputs)")
        # The head reads detached copies of the features: its loss backpropagates into the head alone (its own
        # update), and the features' gradient goes into the fake score's loss as a term worth zero.
        leaves: list[torch.Tensor] = []

        def leaf(features: torch.Tensor) -> torch.Tensor:
            leaves.append(features.detach().requires_grad_(True))
            return leaves[-1]

        real_logits, real_features = gan_logits(gan, real.detach(), cond, cfg, rng, leaf)
        fake_logits, fake_features = gan_logits(gan, x0, cond, cfg, rng, leaf)
        loss_d = discriminator_loss(real_logits, fake_logits)
        grads = torch.autograd.grad(loss_d, leaves, retain_graph=True)
        gan.update_head(cfg.gan_discriminator_weight * loss_d)
        trunk = sum((f.float() * g.float()).sum() for f, g in zip((real_features, fake_features), grads))
        loss = loss + cfg.gan_discriminator_weight * (trunk - trunk.detach())
        logs.update({"loss/gan_discriminator": loss_d.detach(),
                     "gan/real_prob": torch.sigmoid(real_logits).mean().detach(),
                     "gan/fake_prob": torch.sigmoid(fake_logits).mean().detach()})
    return loss, logs


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
                   baseline: torch.Tensor | None = None, gan: GAN | None = None,
                   real: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """A generator turn on every ratio-th step, then a fake-score turn every step (on that turn's samples when it ran;
    with the GAN head on, the head's update is inside it, on `real` against those samples).

    The fake score's grads from the generator turn are none (it ran under no_grad; the GAN term's gradient reaches
    the sample only), so its update sees only its own loss; the generator's update sees only the generator loss, as
    its samples are detached for the fake score.
    """
    logs: dict[str, torch.Tensor] = {}
    samples = None
    if is_generator_turn(cfg, step):
        loss, generated, gen_logs = generator_step(generator_model, real_score, fake_score, noise, cond, cfg, step,
                                                   rng, reward_fn, baseline, gan)
        update_generator(loss)
        logs.update(gen_logs, **{"loss/generator": loss.detach()})
        samples = generated.x0.detach()
    if samples is None:
        samples = generate(generator_model, noise, cond, cfg, rng=rng, grad=False).x0
    loss_fake, fake_logs = fake_score_step(fake_score, samples, cond, cfg, rng, gan, real)
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


__all__ = ["DMDRConfig", "Features", "GAN", "GANHead", "GeneratorSample", "Update", "Velocity", "RewardFn", "add_noise",
           "backward_simulation", "discriminator_loss", "dmd_gradient", "draw_step_index", "edit_reward_fn",
           "fake_score_step", "gan_active", "gan_logits", "generate", "generator_step", "input_gradient_term",
           "is_generator_turn", "predict_x0", "reward_active", "sample", "torch_update", "train_one_step"]
