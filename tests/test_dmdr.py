"""rtedit.train.dmdr: the config, the backward simulation, the reward's cold start, the optional GAN head, and a
known-answer toy run.

Known answer: the teacher is the exact flow velocity of an 8-mode 2-D Gaussian mixture (posterior mean in closed
form), so the distribution the 1-step generator must match is known exactly: 1/8 of the mass per mode.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from rtedit.errors import ConfigError
from rtedit.train.dmdr import (GAN, DMDRConfig, GANHead, add_noise, backward_simulation, discriminator_loss,
                               fake_score_step, generate, generator_step, predict_x0, sample, torch_update,
                               train_one_step)

MODES, RADIUS, STD = 8, 2.0, 0.2
MEANS = torch.stack([torch.tensor([RADIUS * math.cos(2 * math.pi * k / MODES),
                                   RADIUS * math.sin(2 * math.pi * k / MODES)]) for k in range(MODES)])
WEIGHTS = torch.full((MODES,), 1 / MODES)


def mixture_velocity(x_t: torch.Tensor, t: torch.Tensor, means: torch.Tensor, log_weights: torch.Tensor,
                     stds: torch.Tensor) -> torch.Tensor:
    """The exact flow velocity (x_t - E[x0 | x_t]) / t of x0 ~ sum_k w_k N(mean_k, std_k^2 I)."""
    t = t.reshape(-1, 1)
    var = (1 - t) ** 2 * stds[None] ** 2 + t ** 2  # x_t | k ~ N((1 - t) mean_k, var_k I)
    offset = x_t[:, None, :] - (1 - t)[:, :, None] * means[None]
    log_post = log_weights.log_softmax(-1)[None] - (offset ** 2).sum(-1) / (2 * var) - torch.log(var)
    mean_given_k = means[None] + ((1 - t) * stds[None] ** 2 / var)[:, :, None] * offset
    x0 = (log_post.softmax(-1)[:, :, None] * mean_given_k).sum(1)
    return (x_t - x0) / t.clamp_min(1e-6)


def teacher(x_t, t, cond=None):
    return mixture_velocity(x_t, t, MEANS, WEIGHTS.log(), torch.full((MODES,), STD))


class MixtureScore(nn.Module):
    """The fake score: a trainable copy of the teacher (its means, weights and spreads start at the teacher's)."""

    def __init__(self):
        super().__init__()
        self.means = nn.Parameter(MEANS.clone())
        self.log_weights = nn.Parameter(WEIGHTS.log().clone())
        self.log_stds = nn.Parameter(torch.full((MODES,), math.log(STD)))

    def forward(self, x_t, t, cond=None):
        return mixture_velocity(x_t, t, self.means, self.log_weights, self.log_stds.exp())


class MLPVelocity(nn.Module):
    """The generator: a small MLP velocity model; its last layer starts at 0, so it starts at x0 = noise."""

    def __init__(self, width: int = 128):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(2 + 16, width), nn.SiLU(), nn.Linear(width, width), nn.SiLU(),
                                 nn.Linear(width, width), nn.SiLU(), nn.Linear(width, 2))
        self.register_buffer("freqs", torch.arange(1, 9).float() * math.pi)
        with torch.no_grad():
            self.net[-1].weight.zero_()
            self.net[-1].bias.zero_()

    def forward(self, x_t, t, cond=None):
        angles = t.reshape(-1, 1) * self.freqs
        return self.net(torch.cat([x_t, angles.sin(), angles.cos()], -1))


def mode_masses(x: torch.Tensor) -> torch.Tensor:
    return torch.bincount(torch.cdist(x, MEANS).argmin(-1), minlength=MODES).float() / len(x)


# ---------------------------------------------------------------------------------------------------------------
# Config


@pytest.mark.parametrize("changes, message", [
    ({"generator_timesteps": ()}, "1 or 2 timesteps"),
    ({"generator_timesteps": (1.0, 0.7, 0.3)}, "1 or 2 timesteps"),
    ({"generator_timesteps": (0.9,)}, "starting at 1.0"),
    ({"generator_timesteps": (1.0, 1.0)}, "descending"),
    ({"generator_timesteps": (1.0, 0.0)}, "descending"),
    ({"generator_timesteps": (1.0, float("nan"))}, "finite"),
    ({"fake_updates_per_generator": 0}, "fake_updates_per_generator"),
    ({"dmd_t_min": 0.5, "dmd_t_max": 0.4}, "dmd_t_min/dmd_t_max"),
    ({"dmd_t_min": 0.0}, "dmd_t_min"),
    ({"fake_t_max": 1.5}, "fake_t_min/fake_t_max"),
    ({"reward_weight": -0.1}, "reward_weight"),
    ({"reward_weight": float("inf")}, "reward_weight"),
    ({"reward_cold_start": -1}, "reward_cold_start"),
    ({"normaliser_eps": 0.0}, "normaliser_eps"),
    ({"gan_discriminator_weight": -0.01}, "gan_discriminator_weight must be a finite number >= 0"),
    ({"gan_discriminator_weight": float("nan")}, "gan_discriminator_weight"),
    ({"gan_generator_weight": float("inf"), "gan_discriminator_weight": 0.01}, "gan_generator_weight"),
    ({"gan_generator_weight": 0.005}, "gan_generator_weight must be 0 while gan_discriminator_weight is 0"),
    ({"gan_t_min": 0.6, "gan_t_max": 0.5}, "gan_t_min/gan_t_max"),
    ({"gan_t_max": 1.5}, "gan_t_min/gan_t_max"),
    ({"gan_t_min": 1.0, "gan_t_max": 1.0}, "gan_t_min/gan_t_max"),
    ({"gan_t_min": -0.1}, "gan_t_min/gan_t_max"),
])
def test_config_refuses_bad_values(changes, message):
    with pytest.raises(ConfigError, match=message):
        DMDRConfig(**changes).validate()


def test_config_accepts_published_defaults_and_two_steps():
    cfg = DMDRConfig(generator_timesteps=[1, 0.5], reward_weight=0.1).validate()
    assert cfg.generator_timesteps == (1.0, 0.5)
    assert cfg.fake_updates_per_generator == 5 and cfg.reward_cold_start == 2000
    assert cfg.gan_discriminator_weight == 0 and cfg.gan_generator_weight == 0  # the GAN head is off by default
    DMDRConfig(gan_discriminator_weight=0.01, gan_generator_weight=0.005, gan_t_min=0.0, gan_t_max=0.0).validate()


# ---------------------------------------------------------------------------------------------------------------
# Backward simulation and the reward's cold start


def test_two_step_backward_simulation_runs_its_earlier_step_without_grad():
    torch.manual_seed(0)
    generator = MLPVelocity(16)
    with torch.no_grad():
        generator.net[-1].weight.normal_()
    cfg = DMDRConfig(generator_timesteps=(1.0, 0.5)).validate()
    noise = torch.randn(8, 2)
    x_t = backward_simulation(generator, noise, None, cfg, step_index=1, rng=torch.Generator().manual_seed(1))
    assert not x_t.requires_grad and x_t.grad_fn is None
    # Step 1's input is step 0's x0 renoised to t = 0.5: not the noise, and made by the generator.
    assert not torch.allclose(x_t, noise)
    trained = generate(generator, noise, None, cfg, step_index=1, rng=torch.Generator().manual_seed(1))
    assert trained.x0.requires_grad and trained.t == 0.5
    assert torch.equal(trained.x_t, x_t)
    trained.x0.sum().backward()
    assert all(p.grad is not None for p in generator.parameters())
    # The gradient is that of step 1 alone: with step 0's pass detached, it equals one pass at the fixed input.
    grads = [p.grad.clone() for p in generator.parameters()]
    generator.zero_grad()
    predict_x0(generator, x_t, torch.full((8,), 0.5), None).sum().backward()
    assert all(torch.allclose(a, p.grad) for a, p in zip(grads, generator.parameters()))
    # Step 0 is pure noise in, no simulation.
    assert torch.equal(backward_simulation(generator, noise, None, cfg, step_index=0), noise)


def test_generator_step_leaves_the_scores_without_grads():
    torch.manual_seed(0)
    generator, fake = MLPVelocity(16), MixtureScore()
    loss, _, _ = generator_step(generator, teacher, fake, torch.randn(16, 2), None, DMDRConfig().validate(), step=0)
    loss.backward()
    assert all(p.grad is None for p in fake.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in generator.parameters())


def test_reward_term_is_zero_before_the_cold_start():
    cfg = DMDRConfig(reward_weight=0.5, reward_cold_start=10).validate()
    calls = []

    def reward_fn(candidate, baseline):
        calls.append(candidate.shape)
        return candidate.sum() * 0 + 3.0

    losses = {}
    for step in (0, 9, 10):
        torch.manual_seed(0)
        generator, fake = MLPVelocity(16), MixtureScore()
        loss, _, logs = generator_step(generator, teacher, fake, torch.randn(16, 2), None, cfg, step,
                                       torch.Generator().manual_seed(2), reward_fn=reward_fn)
        losses[step] = (float(loss.detach()), float(logs["loss/dmd"]), float(logs["loss/reward"]))
    assert len(calls) == 1  # only step 10 asked for the reward
    for step in (0, 9):
        assert losses[step][0] == pytest.approx(losses[step][1]) and losses[step][2] == 0.0
    assert losses[10][0] == pytest.approx(losses[10][1] + 0.5 * 3.0) and losses[10][2] == 3.0


# ---------------------------------------------------------------------------------------------------------------
# The GAN head


class FeatureScore(nn.Module):
    """A velocity model with intermediate features (its hidden layer), as the GAN head reads a fake score's."""

    def __init__(self, width: int = 16):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(3, width), nn.SiLU())
        self.out = nn.Linear(width, 2)

    def features(self, x_t, t, cond=None):
        return self.body(torch.cat([x_t, t.reshape(-1, 1)], -1))

    def forward(self, x_t, t, cond=None):
        return self.out(self.features(x_t, t, cond))


GAN_ON = dict(gan_discriminator_weight=0.5, gan_generator_weight=0.3)


def _grads(module: nn.Module) -> list[torch.Tensor | None]:
    return [None if p.grad is None else p.grad.clone() for p in module.parameters()]


def test_gan_off_adds_no_terms_and_a_head_must_match_the_config():
    torch.manual_seed(0)
    generator, fake = MLPVelocity(16), FeatureScore()
    head = GANHead(16, 8)
    gan = GAN(fake.features, head, torch_update(torch.optim.SGD(head.parameters(), lr=0.1)))
    noise, real = torch.randn(8, 2), torch.randn(8, 2)
    off, on = DMDRConfig().validate(), DMDRConfig(**GAN_ON).validate()
    logs = train_one_step(0, generator, teacher, fake, noise, None, off, lambda loss: None, lambda loss: None,
                          torch.Generator().manual_seed(1))
    assert not any("gan" in key for key in logs)
    with pytest.raises(ValueError, match="GAN head is given"):
        generator_step(generator, teacher, fake, noise, None, off, 0, gan=gan)
    with pytest.raises(ValueError, match="GAN head is missing"):
        fake_score_step(fake, noise, None, on)
    with pytest.raises(ValueError, match="real samples"):
        fake_score_step(fake, noise, None, on, gan=gan)
    logs = train_one_step(0, generator, teacher, fake, noise, None, on, lambda loss: None, lambda loss: None,
                          torch.Generator().manual_seed(1), gan=gan, real=real)
    assert {"loss/gan_generator", "loss/gan_discriminator", "gan/real_prob", "gan/fake_prob"} <= logs.keys()


def test_gan_gradients_reach_the_generator_the_head_and_the_fake_scores_features_only_as_dmd2s_losses_say():
    """Each update sees exactly the gradient of its DMD2 loss: the generator's of dmd + w_g softplus(-D(x0)) (none
    into the head or the fake score), the head's of w_d (softplus(D(fake)) + softplus(-D(real))), the fake score's
    of flow matching + w_d times that loss (through its features)."""
    torch.manual_seed(0)
    generator, fake, head = MLPVelocity(16), FeatureScore(), GANHead(16, 8)
    with torch.no_grad():
        generator.net[-1].weight.normal_(0, 0.1)
    cfg = DMDRConfig(**GAN_ON, gan_t_min=0.1, gan_t_max=0.9).validate()
    noise, real = torch.randn(8, 2), MEANS[torch.arange(8)] + 0.1 * torch.randn(8, 2)
    head_losses = []

    def update_head(loss):
        head_losses.append(loss)
        loss.backward()

    gan = GAN(fake.features, head, update_head)

    # Generator: the GAN term's gradient reaches the generator and nothing else.
    loss, generated, logs = generator_step(generator, teacher, fake, noise, None, cfg, 0,
                                           torch.Generator().manual_seed(3), gan=gan)
    assert loss.item() == pytest.approx(logs["loss/dmd"].item() + 0.3 * logs["loss/gan_generator"].item(), rel=1e-6)
    loss.backward()
    assert all(p.grad is None for p in [*fake.parameters(), *head.parameters()])
    via_term = _grads(generator)
    assert all(g is not None and g.abs().sum() > 0 for g in via_term)
    # The same draws, differentiated directly: the same generator gradient.
    generator.zero_grad()
    rng = torch.Generator().manual_seed(3)
    x0 = generate(generator, noise, None, cfg, rng=rng).x0
    from rtedit.train.dmdr import dmd_gradient, uniform_t
    grad, _ = dmd_gradient(teacher, fake, x0, None, cfg, rng)
    t = uniform_t(8, cfg.gan_t_min, cfg.gan_t_max, rng, x0.device)
    logits = head(fake.features(add_noise(x0, torch.randn(x0.shape, generator=rng), t), t))
    direct = 0.5 * torch.nn.functional.mse_loss(x0, (x0 - grad).detach()) + 0.3 * torch.nn.functional.softplus(
        -logits).mean()
    direct_grads = torch.autograd.grad(direct, list(generator.parameters()))
    assert all(torch.allclose(a, b, atol=1e-7) for a, b in zip(via_term, direct_grads))

    # Fake-score turn: the head's update and the fake score's loss.
    fake.zero_grad(), head.zero_grad()
    samples = generated.x0.detach()
    loss_fake, logs = fake_score_step(fake, samples, None, cfg, torch.Generator().manual_seed(4), gan, real)
    assert loss_fake.item() == pytest.approx(logs["loss/fake"].item(), abs=0)  # its value: flow matching alone
    head_grads = _grads(head)
    assert all(g is not None and g.abs().sum() > 0 for g in head_grads)
    assert len(head_losses) == 1
    assert head_losses[0].item() == pytest.approx(0.5 * logs["loss/gan_discriminator"].item())
    assert all(p.grad is None for p in fake.parameters())  # the head's backward stopped at its detached features
    loss_fake.backward()
    fake_grads = _grads(fake)
    assert all(p.grad is None for p in generator.parameters())  # its samples came detached
    # Directly: the flow-matching loss plus w_d times the discriminator loss, into the fake score and the head.
    fake.zero_grad(), head.zero_grad()
    rng = torch.Generator().manual_seed(4)
    t = uniform_t(8, cfg.fake_t_min, cfg.fake_t_max, rng, samples.device)
    eps = torch.randn(samples.shape, generator=rng)
    flow = torch.nn.functional.mse_loss(fake(add_noise(samples, eps, t), t), eps - samples)
    scores = []
    for x in (real, samples):
        t = uniform_t(8, cfg.gan_t_min, cfg.gan_t_max, rng, x.device)
        scores.append(head(fake.features(add_noise(x, torch.randn(x.shape, generator=rng), t), t)))
    (flow + 0.5 * discriminator_loss(*scores)).backward()
    assert all(torch.allclose(a, p.grad, atol=1e-7) for a, p in zip(fake_grads, fake.parameters()))
    assert all(torch.allclose(a, p.grad, atol=1e-7) for a, p in zip(head_grads, head.parameters()))
    assert fake.out.weight.grad.abs().sum() > 0 and fake.body[0].weight.grad.abs().sum() > 0


def test_the_discriminator_loss_falls_from_two_log_two_on_separable_real_and_fake_features():
    """Known answer: an untrained head says ~1/2 to everything, so the loss starts near 2 ln 2; real and fake
    clusters far apart (and shown clean, gan_t_max = 0) are separable, so it must fall near 0."""
    torch.manual_seed(0)
    fake, head = FeatureScore(), GANHead(16, 16)
    with torch.no_grad():
        head.out.weight.mul_(0.01)
        head.out.bias.zero_()
    cfg = DMDRConfig(gan_discriminator_weight=1.0, gan_t_min=0.0, gan_t_max=0.0).validate()
    gan = GAN(fake.features, head, torch_update(torch.optim.Adam(head.parameters(), lr=1e-2)))
    update_fake = torch_update(torch.optim.Adam(fake.parameters(), lr=1e-3))
    rng = torch.Generator().manual_seed(5)
    losses, logs = [], {}
    for _ in range(150):
        real = torch.tensor([2.0, 0.0]) + 0.3 * torch.randn(64, 2, generator=rng)
        generated = torch.tensor([-2.0, 0.0]) + 0.3 * torch.randn(64, 2, generator=rng)
        loss, logs = fake_score_step(fake, generated, None, cfg, rng, gan, real)
        update_fake(loss)
        losses.append(float(logs["loss/gan_discriminator"]))
    assert losses[0] == pytest.approx(2 * math.log(2), abs=0.02)
    assert losses[-1] < 0.05 and max(losses[-10:]) < 0.1, losses[::15]
    assert float(logs["gan/real_prob"]) > 0.95 and float(logs["gan/fake_prob"]) < 0.05


# ---------------------------------------------------------------------------------------------------------------
# Known answer



def test_teacher_is_the_mixtures_flow(one_thread):
    torch.manual_seed(0)
    x = torch.randn(20000, 2)
    ts = torch.linspace(1, 0, 65)
    for t, t_next in zip(ts[:-1], ts[1:]):
        x = x + (t_next - t) * teacher(x, torch.full((len(x),), float(t)))
    assert torch.allclose(mode_masses(x), WEIGHTS, atol=0.015)
    assert torch.cdist(x, MEANS).min(-1).values.mean() < 1.2 * STD * math.sqrt(math.pi / 2)


def test_one_step_generator_matches_the_mixtures_mode_masses_and_a_reward_tilts_them(one_thread):
    torch.manual_seed(0)
    plain_steps, reward_steps, batch = 4000, 2000, 256
    cfg = DMDRConfig(fake_updates_per_generator=5, fake_t_min=0.02, reward_weight=0.8,
                     reward_cold_start=plain_steps).validate()
    generator, fake = MLPVelocity(), MixtureScore()
    update_generator = torch_update(torch.optim.Adam(generator.parameters(), lr=1e-3))
    update_fake = torch_update(torch.optim.Adam(fake.parameters(), lr=1e-2))
    rng = torch.Generator().manual_seed(1)

    def favour_mode_0(candidate, baseline):  # a smooth bump around mode 0
        return -torch.exp(-((candidate - MEANS[0]) ** 2).sum(-1) / (2 * 1.2 ** 2)).mean()

    def masses() -> torch.Tensor:
        return mode_masses(sample(generator, torch.randn(20000, 2, generator=rng), None, cfg.generator_timesteps))

    def spread() -> float:  # mean distance to the nearest mode: N(0, I) noise is ~0.97, the mixture itself ~0.25
        x = sample(generator, torch.randn(20000, 2, generator=rng), None, cfg.generator_timesteps)
        return float(torch.cdist(x, MEANS).min(-1).values.mean())

    start, start_spread = masses(), spread()
    rewarded = []
    for step in range(plain_steps + reward_steps):
        if step == plain_steps:
            plain, plain_spread = masses(), spread()
        logs = train_one_step(step, generator, teacher, fake, torch.randn(batch, 2, generator=rng), None, cfg,
                              update_generator, update_fake, rng, reward_fn=favour_mode_0)
        if "loss/reward" in logs:
            rewarded.append(float(logs["loss/reward"]) != 0.0)
    tilted = masses()
    print("spread: start", start_spread, "plain DMD", plain_spread)
    print("mode masses: start", start.tolist(), "plain DMD", plain.tolist(), "with reward", tilted.tolist())
    assert not any(rewarded[:plain_steps // cfg.fake_updates_per_generator]) and all(
        rewarded[plain_steps // cfg.fake_updates_per_generator:])
    # The noise's own masses are 1/8 by symmetry: the generator must also have moved its samples onto the modes.
    assert plain_spread < 0.55 * start_spread, (start_spread, plain_spread)
    assert (plain - WEIGHTS).abs().max() <= 0.05, plain
    assert tilted[0] - plain[0] >= 0.15, (plain, tilted)
    assert (tilted[1:] >= 0.5 * plain[1:]).all(), (plain, tilted)
