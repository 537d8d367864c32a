"""With every approximation off, Editor.edit equals the stock Flux2KleinPipeline (float32, CPU)."""

import numpy as np
import PIL.Image
import pytest
import torch

from conftest import random_image

TOL = 1e-4


def pipeline_output(pipe, image, references, prompt, steps, seed, height=None, width=None):
    images = [PIL.Image.fromarray(a) for a in [image, *references]]
    out = pipe(
        image=images,
        prompt=prompt,
        num_inference_steps=steps,
        guidance_scale=1.0,
        generator=torch.Generator("cpu").manual_seed(seed),
        height=height,
        width=width,
        output_type="np",
    )
    return out.images[0]


@pytest.mark.parametrize("steps", [1, 2, 4])
@pytest.mark.parametrize("num_refs", [0, 1, 2])
@pytest.mark.parametrize("size", [(128, 128), (96, 160)])
def test_edit_equals_pipeline(tiny_editor, tiny_pipeline, steps, num_refs, size):
    image = random_image(*size, seed=1)
    refs = [random_image(64 + 16 * i, 80, seed=10 + i) for i in range(num_refs)]
    ours = tiny_editor.edit(image, "make it winter", references=refs, steps=steps, seed=7)
    ref = pipeline_output(tiny_pipeline, image, refs, "make it winter", steps, seed=7)
    assert ours.array.shape == ref.shape == (*size, 3)
    assert ours.array.dtype == np.float32
    assert np.abs(ours.array - ref).max() <= TOL


def test_explicit_output_size_equals_pipeline(tiny_editor, tiny_pipeline):
    image = random_image(128, 128, seed=2)
    ours = tiny_editor.edit(image, "add snow", steps=2, seed=1, height=96, width=160)
    ref = pipeline_output(tiny_pipeline, image, [], "add snow", 2, 1, height=96, width=160)
    assert ours.array.shape == ref.shape == (96, 160, 3)
    assert np.abs(ours.array - ref).max() <= TOL


def test_sizes_not_multiple_of_16_are_floored_like_the_pipeline(tiny_editor, tiny_pipeline):
    # The pipeline centre-crops inputs down to a multiple of 16 and floors a requested size the same way.
    image = random_image(100, 135, seed=3)
    ours = tiny_editor.edit(image, "make it red", steps=2, seed=0)
    ref = pipeline_output(tiny_pipeline, image, [], "make it red", 2, 0)
    assert ours.array.shape == ref.shape == (96, 128, 3)
    assert np.abs(ours.array - ref).max() <= TOL
    sized = tiny_editor.edit(image, "make it red", steps=2, seed=0, height=90, width=150)
    ref_sized = pipeline_output(tiny_pipeline, image, [], "make it red", 2, 0, height=90, width=150)
    assert sized.array.shape == ref_sized.shape == (80, 144, 3)
    assert np.abs(sized.array - ref_sized).max() <= TOL


def test_inputs_over_one_megapixel_are_resized_like_the_pipeline(tiny_editor, tiny_pipeline):
    image = random_image(1040, 1100, seed=4)
    ours = tiny_editor.edit(image, "make it blue", steps=1, seed=0, height=64, width=64)
    ref = pipeline_output(tiny_pipeline, image, [], "make it blue", 1, 0, height=64, width=64)
    assert np.abs(ours.array - ref).max() <= TOL


def test_precomputed_embeddings_equal_prompt(tiny_editor):
    image = random_image(64, 64, seed=5)
    emb = tiny_editor.encode_prompt("turn it to night")
    a = tiny_editor.edit(image, "turn it to night", steps=2, seed=4)
    b = tiny_editor.edit(image, emb, steps=2, seed=4)
    assert np.array_equal(a.array, b.array)


def test_image_input_kinds_agree(tiny_editor):
    import io

    arr = random_image(64, 96, seed=6)
    buf = io.BytesIO()
    PIL.Image.fromarray(arr).save(buf, format="PNG")
    results = [tiny_editor.edit(x, "make it blue", steps=1, seed=0).array for x in (arr, PIL.Image.fromarray(arr), buf.getvalue())]
    assert np.array_equal(results[0], results[1]) and np.array_equal(results[0], results[2])


def test_result_fields(tiny_editor):
    res = tiny_editor.edit(random_image(64, 64), "make it blue", steps=2, seed=0, output_format="png")
    assert isinstance(res.image, PIL.Image.Image) and res.image.size == (64, 64)
    assert res.array.min() >= 0.0 and res.array.max() <= 1.0
    assert np.array_equal(np.asarray(res.image), (res.array * 255).round().astype(np.uint8))
    assert set(res.timings) >= {"prepare", "denoise", "decode", "total"}
    assert all(v >= 0 for v in res.timings.values())
    assert res.timings["total"] >= res.timings["denoise"]
    decoded = PIL.Image.open(__import__("io").BytesIO(res.data))
    assert decoded.format == "PNG" and decoded.size == (64, 64)


def test_seed_determinism_and_difference(tiny_editor):
    img = random_image(64, 64, seed=8)
    a = tiny_editor.edit(img, "make it blue", seed=1).array
    b = tiny_editor.edit(img, "make it blue", seed=1).array
    c = tiny_editor.edit(img, "make it blue", seed=2).array
    assert np.array_equal(a, b)
    assert np.abs(a - c).max() > 1e-3
