"""The reward model's image path in torch: resize, normalise, patchify, differentiable in the pixels.

Qwen3.5's vision tower takes flat patches of 16x16 pixels, two frames deep (an image is its own second frame), in
2x2 merge groups: `pixel_values` of shape (patches, 3 * 2 * 16 * 16) and an `image_grid_thw` row (1, h/16, w/16) per
image. transformers' `Qwen2VLImageProcessor` makes them from PIL images or uint8 arrays, so no gradient reaches the
pixels; this module does the same steps on float tensors in [0, 1] (tests/test_reward_images.py checks it against
`Qwen2VLImageProcessorPil` with the settings below):

1. size: `smart_resize` (transformers' own function) to multiples of patch * merge = 32 within [min_pixels,
   max_pixels];
2. resize: PIL's antialiased bicubic (a = -0.5, support scaled by the downscale factor), written as two matrices,
   out = Wh @ image @ Ww^T, so it is exact linear algebra in any dtype; PIL rounds each pass to uint8, we do not
   (the processor's output is within about 1/255 of ours);
3. normalise: (x - mean) / std;
4. patchify: the processor's reordering, frames repeated `temporal_patch_size` times.

Qwen3.5's settings differ from the processor's class defaults (patch 14, CLIP's mean and std): patch 16, spatial
merge 2, temporal patch 2, and we assume mean = std = (0.5, 0.5, 0.5), the values of Qwen3-VL's published
preprocessor config (Qwen3.5 loads Qwen3-VL's processor class); a real backbone folder's preprocessor_config.json
overrides them (VisionSettings.from_preprocessor_config).
"""

from __future__ import annotations

import functools
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

QWEN35_MEAN = (0.5, 0.5, 0.5)
QWEN35_STD = (0.5, 0.5, 0.5)


@dataclass(frozen=True)
class VisionSettings:
    """How images become patches; the vision tower's patch, merge and temporal sizes must match its config."""

    patch_size: int = 16
    merge_size: int = 2
    temporal_patch_size: int = 2
    image_mean: tuple[float, float, float] = QWEN35_MEAN
    image_std: tuple[float, float, float] = QWEN35_STD
    min_pixels: int = 64 * 64
    """Images with fewer pixels are upscaled (Qwen3-VL's published config says 65,536: 128x128 would become 256x256)."""
    max_pixels: int = 128 * 128
    """Images with more pixels are downscaled (the toy world is 128x128: kept as it is, 16 tokens after merging)."""

    def __post_init__(self):
        for name in ("patch_size", "merge_size", "temporal_patch_size", "min_pixels", "max_pixels"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"VisionSettings.{name} must be >= 1, got {getattr(self, name)!r}")
        if self.min_pixels > self.max_pixels:
            raise ValueError(f"VisionSettings.min_pixels ({self.min_pixels}) exceeds max_pixels ({self.max_pixels})")
        if len(self.image_mean) != 3 or len(self.image_std) != 3 or min(self.image_std) <= 0:
            raise ValueError(f"image_mean/image_std must be 3 numbers (std > 0), got {self.image_mean}, "
                             f"{self.image_std}")
        object.__setattr__(self, "image_mean", tuple(float(v) for v in self.image_mean))
        object.__setattr__(self, "image_std", tuple(float(v) for v in self.image_std))

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> VisionSettings:
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown vision settings {unknown}; known: {sorted(known)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})

    @classmethod
    def from_preprocessor_config(cls, path: str | Path) -> VisionSettings:
        """The settings of a backbone folder's preprocessor_config.json (Qwen3.5 / Qwen3-VL layout)."""
        data = json.loads(Path(path).read_text())
        size = data.get("size") or {}
        return cls(patch_size=data.get("patch_size", 16), merge_size=data.get("merge_size", 2),
                   temporal_patch_size=data.get("temporal_patch_size", 2),
                   image_mean=tuple(data.get("image_mean", QWEN35_MEAN)),
                   image_std=tuple(data.get("image_std", QWEN35_STD)),
                   min_pixels=size.get("shortest_edge", data.get("min_pixels", cls.min_pixels)),
                   max_pixels=size.get("longest_edge", data.get("max_pixels", cls.max_pixels)))

    def processor_kwargs(self) -> dict[str, Any]:
        """The same settings as keyword arguments of transformers' Qwen2VLImageProcessor(Pil)."""
        return {"patch_size": self.patch_size, "merge_size": self.merge_size,
                "temporal_patch_size": self.temporal_patch_size, "image_mean": list(self.image_mean),
                "image_std": list(self.image_std), "min_pixels": self.min_pixels, "max_pixels": self.max_pixels}


def target_size(height: int, width: int, settings: VisionSettings) -> tuple[int, int]:
    """The (height, width) the processor resizes an image to: transformers' own smart_resize."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

    return smart_resize(height, width, factor=settings.factor, min_pixels=settings.min_pixels,
                        max_pixels=settings.max_pixels)


def _bicubic(x: float, a: float = -0.5) -> float:
    """PIL's bicubic kernel (Resample.c, a = -0.5)."""
    x = abs(x)
    if x < 1.0:
        return ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    if x < 2.0:
        return (((x - 5.0) * x + 8.0) * x - 4.0) * a
    return 0.0


@functools.lru_cache(maxsize=64)
def _resize_rows(in_size: int, out_size: int) -> tuple[tuple[int, tuple[float, ...]], ...]:
    """PIL's precompute_coeffs for one axis: per output pixel, the first input index and normalised weights."""
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = 2.0 * filterscale
    rows = []
    for xx in range(out_size):
        center = (xx + 0.5) * scale
        xmin = max(int(center - support + 0.5), 0)
        xmax = min(int(center + support + 0.5), in_size)
        weights = [_bicubic((x + 0.5 - center) / filterscale) for x in range(xmin, xmax)]
        total = sum(weights)
        rows.append((xmin, tuple(w / total if total else 0.0 for w in weights)))
    return tuple(rows)


def resize_matrix(in_size: int, out_size: int, dtype: torch.dtype = torch.float32,
                  device: torch.device | str | None = None) -> torch.Tensor:
    """(out_size, in_size) matrix of PIL's antialiased bicubic resize along one axis (identity if sizes match)."""
    if in_size == out_size:
        return torch.eye(in_size, dtype=dtype, device=device)
    matrix = torch.zeros(out_size, in_size, dtype=torch.float64)
    for row, (start, weights) in enumerate(_resize_rows(in_size, out_size)):
        matrix[row, start:start + len(weights)] = torch.tensor(weights, dtype=torch.float64)
    return matrix.to(device=device, dtype=dtype)


def resize(images: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(..., C, H, W) float images resized as PIL's bicubic resizes them, differentiably (no rounding, no clamp)."""
    in_h, in_w = images.shape[-2:]
    if (in_h, in_w) == (height, width):
        return images
    rows = resize_matrix(in_h, height, images.dtype, images.device)
    cols = resize_matrix(in_w, width, images.dtype, images.device)
    return rows @ images @ cols.transpose(0, 1)


def patchify(images: torch.Tensor, settings: VisionSettings) -> tuple[torch.Tensor, tuple[int, int]]:
    """(B, C, H, W) normalised images -> (B * grid_h * grid_w, C * T * P * P) patches in the processor's order."""
    b, c, h, w = images.shape
    p, m, t = settings.patch_size, settings.merge_size, settings.temporal_patch_size
    gh, gw = h // p, w // p
    if gh * p != h or gw * p != w or gh % m or gw % m:
        raise ValueError(f"image of {h}x{w} is not a multiple of patch {p} x merge {m}")
    x = images.reshape(b, c, gh // m, m, p, gw // m, m, p).permute(0, 2, 5, 3, 6, 1, 4, 7)
    x = x.unsqueeze(6).expand(-1, -1, -1, -1, -1, -1, t, -1, -1)
    return x.reshape(b * gh * gw, c * t * p * p), (gh, gw)


@dataclass
class VisionInputs:
    """What the vision tower takes for a batch of images, in order."""

    pixel_values: torch.Tensor
    grid_thw: torch.Tensor
    tokens: list[int] = field(default_factory=list)
    """Tokens each image takes in the language model (after spatial merging)."""


def preprocess(images: torch.Tensor | list[torch.Tensor], settings: VisionSettings) -> VisionInputs:
    """Float RGB images in [0, 1], (B, 3, H, W) or a list of (3, H, W), to the vision tower's inputs.

    Same-size images go through one resize and one patchify; the gradient flows to every input pixel.
    """
    if isinstance(images, torch.Tensor):
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (B, 3, H, W), got {tuple(images.shape)}")
        groups = [images]
    else:
        if not images:
            raise ValueError("no images to preprocess")
        groups = [img.unsqueeze(0) for img in images]
        for img in groups:
            if img.ndim != 4 or img.shape[1] != 3:
                raise ValueError(f"each image must be (3, H, W), got {tuple(img.shape[1:])}")
    dtype = groups[0].dtype if groups[0].is_floating_point() else torch.float32
    mean = torch.tensor(settings.image_mean, dtype=dtype, device=groups[0].device).view(1, 3, 1, 1)
    std = torch.tensor(settings.image_std, dtype=dtype, device=groups[0].device).view(1, 3, 1, 1)
    patches, grids, tokens = [], [], []
    merge = settings.merge_size ** 2
    for group in groups:
        h, w = target_size(int(group.shape[-2]), int(group.shape[-1]), settings)
        x = (resize(group.to(dtype), h, w) - mean) / std
        flat, (gh, gw) = patchify(x, settings)
        patches.append(flat)
        grids += [[1, gh, gw]] * group.shape[0]
        tokens += [gh * gw // merge] * group.shape[0]
    return VisionInputs(torch.cat(patches), torch.tensor(grids, dtype=torch.long, device=groups[0].device), tokens)


def tokens_per_image(height: int, width: int, settings: VisionSettings) -> int:
    h, w = target_size(height, width, settings)
    return (h // settings.patch_size) * (w // settings.patch_size) // settings.merge_size ** 2


def to_float_images(array) -> torch.Tensor:
    """uint8 (B, H, W, 3) / (H, W, 3) numpy or tensor -> float32 (B, 3, H, W) in [0, 1]."""
    x = torch.as_tensor(np.array(array, copy=True)) if isinstance(array, np.ndarray) else torch.as_tensor(array)
    if x.ndim == 3:
        x = x.unsqueeze(0)
    if x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"expected (B, H, W, 3) images, got {tuple(x.shape)}")
    return x.permute(0, 3, 1, 2).float().div_(255.0)


__all__ = ["QWEN35_MEAN", "QWEN35_STD", "VisionInputs", "VisionSettings", "patchify", "preprocess",
           "resize", "resize_matrix", "target_size", "to_float_images", "tokens_per_image"]
