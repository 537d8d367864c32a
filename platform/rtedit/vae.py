"""Pixels <-> the transformer's latent space: the FLUX.2 VAE (and, when configured, TAEF2) plus the latent batch-norm."""

from __future__ import annotations

import torch

from rtedit.latents import bn_denormalize, bn_normalize, patchify, unpatchify


class LatentCodec:
    """Encodes [-1, 1] pixels to patchified, BN-normalised latents [B, 128, H/16, W/16] and decodes them back.

    The 32-channel autoencoder is swappable (FLUX.2's VAE, or TAEF2); the batch-norm statistics always come from
    the FLUX.2 VAE, because they define the transformer's latent space.
    """

    def __init__(self, vae) -> None:
        self.vae = vae
        # Computed as the pipeline computes them (sqrt in the buffer dtype), once instead of per frame.
        self.bn_mean = vae.bn.running_mean.view(1, -1, 1, 1)
        self.bn_std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps)
        self.scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)

    @property
    def dtype(self) -> torch.dtype:
        return self.vae.dtype

    @property
    def device(self) -> torch.device:
        return self.vae.device

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] in [-1, 1] -> normalised patchified latent; the distribution's mode, as editing uses it."""
        raw = self.vae.encode(pixels.to(self.device, self.dtype)).latent_dist.mode()
        return bn_normalize(patchify(raw), self.bn_mean, self.bn_std)

    def encode_reference(self, pixels: torch.Tensor) -> torch.Tensor:
        """References take this eager path so their odd sizes never touch compiled, bucketed code."""
        raw = self.vae.encode(pixels.to(self.device, self.dtype)).latent_dist.mode()
        return bn_normalize(patchify(raw), self.bn_mean, self.bn_std)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised patchified latent -> [B, 3, H, W] pixels in about [-1, 1]."""
        raw = unpatchify(bn_denormalize(latents, self.bn_mean, self.bn_std))
        return self.vae.decode(raw.to(self.device), return_dict=False)[0]
