"""The reward model's torch image path against transformers' Qwen2VL image processor with Qwen3.5's settings, its
gradients, and a float64 finite-difference check through preprocessing and the vision tower."""

import os

import numpy as np
import pytest
import torch
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from rtedit.train.reward.images import (QWEN35_MEAN, QWEN35_STD, VisionSettings, patchify, preprocess,  # noqa: E402
                                        resize, resize_matrix, target_size, to_float_images)


def _photo(h, w, seed=0):
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (max(2, h // 6), max(2, w // 6), 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(small).resize((w, h), Image.Resampling.BILINEAR))


def _processor(settings):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil(**settings.processor_kwargs())


def test_qwen35_settings_are_not_the_processors_defaults():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    s = VisionSettings()
    assert (s.patch_size, s.merge_size, s.temporal_patch_size) == (16, 2, 2)
    assert s.image_mean == QWEN35_MEAN == (0.5, 0.5, 0.5) and s.image_std == QWEN35_STD
    default = Qwen2VLImageProcessorPil()
    assert default.patch_size == 14 and tuple(default.image_mean) != QWEN35_MEAN  # CLIP's mean and std
    with pytest.raises(ValueError, match="min_pixels"):
        VisionSettings(min_pixels=10**6, max_pixels=10)


@pytest.mark.parametrize("h, w, min_pixels, max_pixels", [
    (128, 128, 4096, 16384),     # the toy world: no resize
    (100, 150, 4096, 16384),     # resized to a multiple of 32
    (300, 200, 4096, 128 * 128),  # downscaled (antialiased)
    (40, 50, 128 * 128, 256 * 256),  # upscaled
])
def test_preprocess_matches_the_image_processor(h, w, min_pixels, max_pixels):
    settings = VisionSettings(min_pixels=min_pixels, max_pixels=max_pixels)
    image = _photo(h, w)
    ref = _processor(settings)(images=[Image.fromarray(image)], return_tensors="pt")
    ours = preprocess(to_float_images(image), settings)
    assert ours.grid_thw.tolist() == ref["image_grid_thw"].tolist()
    assert ours.pixel_values.shape == ref["pixel_values"].shape
    diff = (ours.pixel_values - ref["pixel_values"]).abs()
    if (h, w) == target_size(h, w, settings):
        assert diff.max() < 1e-6  # no resize: rescale, normalise and patch order are exact
    else:  # PIL rounds each resize pass to uint8; we do not: about one level of 255, in normalised units
        assert diff.max() <= 1.1 / 255 / 0.5 and diff.mean() < 0.35 / 255 / 0.5
    assert ours.tokens == [int(ref["image_grid_thw"][0].prod()) // 4]


def test_resize_matrix_rows_are_normalised_and_identity_at_the_same_size():
    m = resize_matrix(150, 96, torch.float64)
    torch.testing.assert_close(m.sum(1), torch.ones(96, dtype=torch.float64))
    assert torch.equal(resize_matrix(64, 64), torch.eye(64))
    x = torch.rand(2, 3, 64, 64)
    assert resize(x, 64, 64) is x


def test_patchify_rejects_sizes_off_the_grid():
    with pytest.raises(ValueError, match="multiple"):
        patchify(torch.zeros(1, 3, 48, 64), VisionSettings())


def test_gradients_reach_every_pixel_through_a_resize():
    x = torch.rand(1, 3, 50, 70, dtype=torch.float64, requires_grad=True)
    out = preprocess(x, VisionSettings(min_pixels=64 * 64, max_pixels=96 * 96))
    out.pixel_values.pow(2).sum().backward()
    assert x.grad is not None and (x.grad != 0).float().mean() > 0.99
    y = torch.rand(1, 3, 12, 9, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: resize(t, 16, 8), (y,))


def test_finite_differences_through_preprocessing_and_the_vision_tower():
    """float64: autograd's directional derivative equals a central difference, resize and all."""
    from transformers import Qwen3_5Config
    from transformers.models.qwen3_5.modeling_qwen3_5 import Qwen3_5VisionModel

    torch.manual_seed(0)
    config = Qwen3_5Config(vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2,
                                              out_hidden_size=24, num_position_embeddings=64)).vision_config
    tower = Qwen3_5VisionModel(config).double().eval()
    settings = VisionSettings(min_pixels=64 * 64, max_pixels=64 * 64)
    weights = torch.randn(4, 24, dtype=torch.float64)  # 4x4 patches merge into 2x2 tokens

    def f(pixels):
        inputs = preprocess(pixels, settings)
        return (tower(inputs.pixel_values, grid_thw=inputs.grid_thw).pooler_output * weights).sum()

    x = torch.rand(1, 3, 60, 60, dtype=torch.float64, requires_grad=True)  # resized to 64x64: 4x4 patches
    (grad,) = torch.autograd.grad(f(x), x)
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        v = torch.randn(x.shape, dtype=torch.float64, generator=g)
        eps = 1e-4  # central differences: O(eps^2) error, far above float64 round-off
        with torch.no_grad():
            numeric = (f(x + eps * v) - f(x - eps * v)) / (2 * eps)
        analytic = (grad * v).sum()
        assert abs(float(numeric - analytic)) <= 1e-6 * max(1.0, abs(float(analytic))), (numeric, analytic)
