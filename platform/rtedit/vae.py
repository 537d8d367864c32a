"""Pixels <-> the transformer's latent space: the FLUX.2 VAE or TAEF2, plus the latent batch-norm.

Where TAEF2 plugs in (settled in rtedit.accel.taef2): it encodes to and decodes from the *BN-normalised* latent, so with
TAEF2 the FLUX.2 batch-norm is skipped; with the full VAE it stays on the patchified side, as in the pipeline.
"""

from __future__ import annotations

import contextlib

import torch

from rtedit.model.packing import bn_denormalize, bn_normalize, patchify, unpatchify

AUTOENCODERS = ("vae", "taef2")


class LatentCodec:
    """Encodes [-1, 1] pixels to patchified, normalised latents [B, 128, H/16, W/16] and decodes them back."""

    def __init__(self, vae, taef2=None) -> None:
        self.vae, self.taef2 = vae, taef2
        self.reference_context = contextlib.nullcontext  # selective compile swaps in "run the encoder eagerly"
        # Computed as the pipeline computes them (sqrt in the buffer dtype), once instead of per frame.
        self.bn_mean = vae.bn.running_mean.view(1, -1, 1, 1)
        self.bn_std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps)

    @property
    def name(self) -> str:
        return "taef2" if self.taef2 is not None else "vae"

    @property
    def dtype(self) -> torch.dtype:
        return self.vae.dtype

    @property
    def device(self) -> torch.device:
        return self.vae.device

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """The input image's path (bucketed sizes; the one selective compile targets)."""
        return self._encode(pixels)

    def encode_reference(self, pixels: torch.Tensor) -> torch.Tensor:
        """References take this eager path so their odd sizes never touch compiled, bucketed code."""
        with self.reference_context():
            return self._encode(pixels)

    def _encode(self, pixels: torch.Tensor) -> torch.Tensor:
        pixels = pixels.to(self.device, self.dtype)
        if self.taef2 is not None:
            return patchify(self.taef2.encode(pixels))
        # The distribution's mode, as Flux2KleinPipeline encodes editing inputs (sample_mode="argmax").
        raw = self.vae.encode(pixels).latent_dist.mode()
        return bn_normalize(patchify(raw), self.bn_mean, self.bn_std)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised patchified latent -> [B, 3, H, W] pixels in about [-1, 1]."""
        if self.taef2 is not None:
            return self.taef2.decode(unpatchify(latents))
        raw = unpatchify(bn_denormalize(latents, self.bn_mean, self.bn_std))
        return self.vae.decode(raw.to(self.device), return_dict=False)[0]
