"""The sampler's side of a frame: the seed's noise, the sigma schedule, and one Euler step of the flow."""

from __future__ import annotations

import copy
import threading
from collections import OrderedDict

import numpy as np
import torch
from diffusers.pipelines.flux2.pipeline_flux2_klein import compute_empirical_mu


def initial_noise(seed: int, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The seed's noise, drawn from a CPU generator exactly as diffusers' randn_tensor draws it, on every device."""
    generator = torch.Generator("cpu").manual_seed(seed)
    noise = torch.randn(shape, generator=generator, dtype=dtype)
    if device.type == "cuda":  # pinned and non-blocking: a pageable copy would wait for the GPU to drain
        noise = noise.pin_memory()
    return noise.to(device, non_blocking=True)


class NoiseCache:
    """The seeds' noise on the device, for the last `entries` (seed, shape, dtype, device): a stream's frames share
    one seed (what keeps them stable from frame to frame), so drawing it on the host for every frame is waste."""

    def __init__(self, entries: int = 16) -> None:
        self.entries = entries
        self._noise: OrderedDict[tuple, torch.Tensor] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    def get(self, seed: int, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """`initial_noise(seed, shape, dtype, device)`; callers never write into it (Euler steps make new tensors)."""
        key = (seed, tuple(shape), dtype, str(device))
        with self._lock:
            noise = self._noise.get(key)
            if noise is not None:
                self._noise.move_to_end(key)
                self.hits += 1
                return noise
            self.misses += 1
        noise = initial_noise(seed, shape, dtype, device)
        with self._lock:
            self._noise[key] = noise
            while len(self._noise) > self.entries:
                self._noise.popitem(last=False)
        return noise

    def stats(self) -> dict:
        return {"entries": len(self._noise), "hits": self.hits, "misses": self.misses}


class TimestepCache:
    """The pipeline's sigma schedule (linspace, empirical mu shift) per (sequence length, steps, device).

    A private copy of the scheduler computes it, so the shared scheduler's state is never touched per request.
    """

    def __init__(self, scheduler) -> None:
        self._scheduler = copy.deepcopy(scheduler)
        self._schedules: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        self._lock = threading.Lock()

    def get(self, seq_len: int, steps: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (timesteps [steps], sigmas [steps + 1]) on the device."""
        key = (seq_len, steps, str(device))
        with self._lock:
            if key not in self._schedules:
                mu = compute_empirical_mu(image_seq_len=seq_len, num_steps=steps)
                if getattr(self._scheduler.config, "use_flow_sigmas", False):
                    self._scheduler.set_timesteps(steps, device=device, mu=mu)
                else:
                    sigmas = np.linspace(1.0, 1 / steps, steps)
                    self._scheduler.set_timesteps(sigmas=sigmas, device=device, mu=mu)
                self._schedules[key] = (self._scheduler.timesteps.clone(), self._scheduler.sigmas.clone())
            return self._schedules[key]

    def __len__(self) -> int:
        return len(self._schedules)


def euler_step(latents: torch.Tensor, velocity: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor):
    """FlowMatchEulerDiscreteScheduler.step's arithmetic: a float32 sample, cast back to the velocity's dtype."""
    return (latents.to(torch.float32) + (sigma_next - sigma) * velocity).to(velocity.dtype)


def sampler_sigmas(scheduler, steps: tuple[int, ...], seq_len: int) -> torch.Tensor:
    """The sigmas at which the sampler evaluates the transformer for these step counts (no duplicates)."""
    schedules = TimestepCache(scheduler)
    visited = [schedules.get(seq_len, n, torch.device("cpu"))[1][:-1] for n in steps]  # the last sigma is 0
    return torch.unique(torch.cat(visited).float()) if visited else torch.zeros(0)
