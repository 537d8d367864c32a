"""rtedit.train.dmdr: the config, the backward simulation, the reward's cold start, and a known-answer toy run.

Known answer: the teacher is the exact flow velocity of an 8-mode 2-D Gaussian mixture (posterior mean in closed
form), so the distribution the 1-step generator must match is known exactly: 1/8 of the mass per mode.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from rtedit.errors import ConfigError
from rtedit.train.dmdr import (DMDRConfig, backward_simulation, generate, generator_step, predict_x0, sample,
                               torch_update, train_one_step)

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
])
def test_config_refuses_bad_values(changes, message):
    with pytest.raises(ConfigError, match=message):
        DMDRConfig(**changes).validate()


def test_config_accepts_published_defaults_and_two_steps():
    cfg = DMDRConfig(generator_timesteps=[1, 0.5], reward_weight=0.1).validate()
    assert cfg.generator_timesteps == (1.0, 0.5)
    assert cfg.fake_updates_per_generator == 5 and cfg.reward_cold_start == 2000


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
