"""Every bad input raises a typed EditError with a clear message, and the editor keeps working afterwards."""

import io

import numpy as np
import PIL.Image
import pytest

from conftest import random_image
from rtedit.config import ImageLimits
from rtedit.errors import EditError, InvalidImage, InvalidRequest
from rtedit.images import decode_image


def png_bytes(arr) -> bytes:
    buf = io.BytesIO()
    PIL.Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def bomb_png(width: int, height: int) -> bytes:
    """A tiny file whose header claims a huge image (a decompression bomb)."""
    buf = io.BytesIO()
    PIL.Image.new("1", (width, height)).save(buf, format="PNG", optimize=True)
    return buf.getvalue()


GOOD = random_image(64, 64, seed=0)

BAD_IMAGES = {
    "empty bytes": (b"", "empty"),
    "garbage bytes": (b"not an image at all" * 10, "could not be decoded"),
    "truncated png": (png_bytes(random_image(128, 128))[:300], "truncated|corrupt|decoded"),
    "gif format": (lambda: _gif(), "not accepted"),
    "float array": (np.zeros((64, 64, 3), np.float32), "uint8"),
    "rank 2 array": (np.zeros((64, 64), np.uint8), "rank"),
    "4 channels": (np.zeros((64, 64, 4), np.uint8), "3 channels"),
    "zero size": (np.zeros((0, 64, 3), np.uint8), "zero size"),
    "too small": (np.zeros((32, 64, 3), np.uint8), "at least"),
    "extreme aspect": (np.zeros((64, 640, 3), np.uint8), "aspect"),
    "wrong type": ("a path string", "must be a PIL image"),
    "over pixel limit": (np.zeros((2100, 2100, 3), np.uint8), "over the limit"),
}


def _gif() -> bytes:
    buf = io.BytesIO()
    PIL.Image.fromarray(GOOD).save(buf, format="GIF")
    return buf.getvalue()


@pytest.mark.parametrize("name", sorted(BAD_IMAGES))
def test_bad_images_raise_invalid_image(tiny_editor, name):
    value, pattern = BAD_IMAGES[name]
    value = value() if callable(value) else value
    with pytest.raises(InvalidImage, match=pattern):
        tiny_editor.edit(value, "make it blue", steps=1)
    with pytest.raises(InvalidImage):
        tiny_editor.edit(GOOD, "make it blue", steps=1, references=[value])
    # The editor is fully usable right after a failed request.
    assert tiny_editor.edit(GOOD, "make it blue", steps=1).array.shape == (64, 64, 3)


def test_decompression_bomb_refused_before_decoding():
    data = bomb_png(20000, 20000)
    assert len(data) < 200_000
    with pytest.raises(InvalidImage, match="over the limit|bomb"):
        decode_image(data, ImageLimits())


def test_pixel_limit_is_configurable():
    limits = ImageLimits(max_pixels=100 * 100)
    assert decode_image(png_bytes(random_image(100, 100)), limits).shape == (100, 100, 3)
    with pytest.raises(InvalidImage, match="over the limit of 10000"):
        decode_image(png_bytes(random_image(101, 100)), limits)


def test_oversized_payload_refused():
    with pytest.raises(InvalidImage, match="bytes"):
        decode_image(b"\x89PNG" + b"0" * 5000, ImageLimits(max_bytes=4096))


@pytest.mark.parametrize(
    "kwargs, pattern",
    [
        ({"steps": 0}, "steps"),
        ({"steps": 51}, "steps"),
        ({"steps": 2.0}, "integer"),
        ({"steps": True}, "integer"),
        ({"seed": 1.5}, "seed"),
        ({"seed": "7"}, "seed"),
        ({"seed": -1}, "seed"),
        ({"seed": 2**64}, "seed"),
        ({"height": 32}, "height"),
        ({"width": 100.0}, "width"),
        ({"height": 4096, "width": 4096}, "pixels"),
        ({"references": "img"}, "references"),
        ({"references": [GOOD] * 5}, "at most"),
        ({"output_format": "bmp"}, "output_format"),
    ],
)
def test_bad_request_arguments(tiny_editor, kwargs, pattern):
    with pytest.raises(InvalidRequest, match=pattern):
        tiny_editor.edit(GOOD, "make it blue", **kwargs)


@pytest.mark.parametrize("prompt", ["", "  \n", None, 3])
def test_bad_prompts(tiny_editor, prompt):
    with pytest.raises(InvalidRequest, match="prompt"):
        tiny_editor.edit(GOOD, prompt)


def test_bad_embeddings(tiny_editor):
    import torch

    from rtedit.prompts import PromptEmbedding

    good = tiny_editor.encode_prompt("make it blue")
    wrong_dim = PromptEmbedding(torch.zeros(1, 8, 7), torch.zeros(1, 8, 4, dtype=torch.int64), "k")
    with pytest.raises(InvalidRequest, match="embeddings"):
        tiny_editor.edit(GOOD, wrong_dim)
    nan = PromptEmbedding(torch.full_like(good.embeds, float("nan")), good.text_ids, "nan")
    with pytest.raises(InvalidRequest, match="NaN"):
        tiny_editor.edit(GOOD, nan)


def test_errors_are_counted_and_all_are_edit_errors(tiny_editor):
    before = tiny_editor.stats()["errors"].get("InvalidImage", 0)
    with pytest.raises(EditError):
        tiny_editor.edit(b"junk", "make it blue")
    assert tiny_editor.stats()["errors"]["InvalidImage"] == before + 1


def test_editor_without_text_encoder_takes_only_embeddings(tiny_editor):
    from rtedit.editor import Editor
    from rtedit.presets import ModelBundle

    emb = tiny_editor.encode_prompt("make it blue")
    bundle = ModelBundle(tiny_editor.transformer, tiny_editor.vae, tiny_editor.scheduler, name="no-encoder")
    bare = Editor(bundle)
    with pytest.raises(InvalidRequest, match="no text encoder"):
        bare.edit(GOOD, "make it blue")
    np.testing.assert_array_equal(bare.edit(GOOD, emb, seed=3).array, tiny_editor.edit(GOOD, emb, seed=3).array)
