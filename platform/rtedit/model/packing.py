"""Latent layout for FLUX.2: pure reshapes and position ids, with the id cache the frame path keys by shape.

Shapes: the VAE latent is [B, 32, H/8, W/8]; patchified [B, 128, H/16, W/16]; packed tokens [B, H/16 * W/16, 128].
"""

from __future__ import annotations

import threading

import torch

# The transformer sees 16x16-pixel patches: a VAE factor of 8 and 2x2 patchify.
PATCH_PIXELS = 16
# Reference i sits at T = 10 + 10 * i in the 4-axis RoPE ids, as in Flux2KleinPipeline._prepare_image_ids.
REFERENCE_T_SCALE = 10


def patchify(latents: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] -> [B, 4C, H/2, W/2] (2x2 patches into channels)."""
    b, c, h, w = latents.shape
    x = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4)
    return x.reshape(b, c * 4, h // 2, w // 2)


def unpatchify(latents: torch.Tensor) -> torch.Tensor:
    """[B, 4C, H, W] -> [B, C, 2H, 2W]."""
    b, c, h, w = latents.shape
    x = latents.reshape(b, c // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3)
    return x.reshape(b, c // 4, h * 2, w * 2)


def pack(latents: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] -> [B, H*W, C] tokens in row-major order."""
    b, c, h, w = latents.shape
    return latents.reshape(b, c, h * w).permute(0, 2, 1)


def unpack(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """[B, H*W, C] -> [B, C, H, W]; the inverse of pack (the pipeline scatters by ids, which is this reshape)."""
    b, n, c = tokens.shape
    if n != height * width:
        raise ValueError(f"cannot unpack {n} tokens into {height}x{width}")
    # Contiguous like the pipeline's scatter result, so the VAE decoder sees the same memory layout.
    return tokens.reshape(b, height, width, c).permute(0, 3, 1, 2).contiguous()


def bn_normalize(latents: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Patchified VAE latent -> the transformer's latent space (FLUX.2's latent batch-norm)."""
    return (latents - mean.to(latents.device, latents.dtype)) / std.to(latents.device, latents.dtype)


def bn_denormalize(latents: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """The transformer's latent space -> patchified VAE latent."""
    return latents * std.to(latents.device, latents.dtype) + mean.to(latents.device, latents.dtype)


def grid_ids(t: int, height: int, width: int) -> torch.Tensor:
    """[H*W, 4] ids (T=t, H=row, W=col, L=0) in the order pack() emits tokens."""
    rows = torch.arange(height).repeat_interleave(width)
    cols = torch.arange(width).repeat(height)
    return torch.stack([torch.full_like(rows, t), rows, cols, torch.zeros_like(rows)], dim=1)


def text_ids(length: int) -> torch.Tensor:
    """[1, L, 4] ids of the instruction tokens: (0, 0, 0, l)."""
    ids = torch.zeros(length, 4, dtype=torch.int64)
    ids[:, 3] = torch.arange(length)
    return ids.unsqueeze(0)


class LatentIdCache:
    """Position ids of the target grid and of each reference layout, built once per shape and device."""

    def __init__(self) -> None:
        self._ids: dict[tuple, torch.Tensor] = {}
        self._lock = threading.Lock()

    def target(self, height: int, width: int, device: torch.device) -> torch.Tensor:
        return self._get(("target", height, width, str(device)), lambda: grid_ids(0, height, width), device)

    def references(self, shapes: tuple[tuple[int, int], ...], device: torch.device) -> torch.Tensor:
        def build() -> torch.Tensor:
            parts = [grid_ids(REFERENCE_T_SCALE * (i + 1), h, w) for i, (h, w) in enumerate(shapes)]
            return torch.cat(parts, dim=0)

        return self._get(("refs", shapes, str(device)), build, device)

    def text(self, length: int, device: torch.device) -> torch.Tensor:
        return self._get(("text", length, str(device)), lambda: text_ids(length)[0], device)

    def _get(self, key: tuple, build, device: torch.device) -> torch.Tensor:
        with self._lock:
            ids = self._ids.get(key)
            if ids is None:
                ids = self._ids[key] = build().unsqueeze(0).to(device)
            return ids

    def __len__(self) -> int:
        return len(self._ids)
