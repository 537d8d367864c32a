"""The latent codec: FLUX.2 VAE with its batch-norm, or TAEF2 on the normalised latent."""

import numpy as np
import pytest
import torch

from conftest import random_image
from rtedit.config import EditorConfig
from rtedit.editor import Editor
from rtedit.errors import ConfigError
from rtedit.images import to_pixel_tensor
from rtedit.model.packing import patchify, unpatchify


def test_vae_codec_applies_bn_on_patchified_side(tiny_editor):
    codec = tiny_editor.codec
    pixels = to_pixel_tensor(random_image(64, 64), torch.device("cpu"), torch.float32)
    raw = tiny_editor.vae.encode(pixels).latent_dist.mode()
    expected = (patchify(raw) - codec.bn_mean) / codec.bn_std
    torch.testing.assert_close(codec.encode(pixels), expected, rtol=0, atol=0)


def test_taef2_codec_skips_bn(taef2_weights):
    editor = Editor.from_preset("tiny", config=EditorConfig(autoencoder="taef2", taef2_dir=str(taef2_weights)))
    assert editor.codec.name == "taef2" and editor.model_info["autoencoder"] == "taef2"
    # Make the BN non-trivial: with TAEF2 it must not matter.
    editor.codec.bn_mean = torch.full_like(editor.codec.bn_mean, 5.0)
    pixels = to_pixel_tensor(random_image(64, 64, seed=3), torch.device("cpu"), torch.float32)
    latents = editor.codec.encode(pixels)
    torch.testing.assert_close(latents, patchify(editor.codec.taef2.encode(pixels)))
    torch.testing.assert_close(editor.codec.decode(latents), editor.codec.taef2.decode(unpatchify(latents)))
    res = editor.edit(random_image(64, 96), "make it blue", steps=2, seed=0)
    assert res.array.shape == (64, 96, 3) and np.isfinite(res.array).all()


def test_autoencoder_config_is_validated():
    with pytest.raises(ConfigError, match="autoencoder"):
        EditorConfig(autoencoder="vqgan").validate()
