"""Presets, loading from a diffusers folder with the rtedit.json sidecar, and adopting a pipeline."""

import json

import numpy as np
import PIL.Image
import pytest
import torch

from conftest import random_image
from rtedit.editor import Editor
from rtedit.errors import ModelLoadError, UnsupportedRequest
from rtedit.presets import KLEIN_4B_TRANSFORMER, QWEN3_4B, Sidecar, build_preset


def test_tiny_shapes(tiny_editor):
    tr = tiny_editor.transformer.config
    assert (tr.in_channels, tr.num_layers, tr.num_single_layers) == (128, 1, 2)
    assert (tr.num_attention_heads, tr.attention_head_dim, tr.joint_attention_dim) == (2, 16, 48)
    te = tiny_editor.text_encoder.config
    assert (te.hidden_size, te.num_hidden_layers) == (16, 28)
    vae = tiny_editor.vae.config
    assert tuple(vae.block_out_channels) == (8, 8, 8, 8) and vae.latent_channels == 32 and vae.norm_num_groups == 4
    sch = tiny_editor.scheduler.config
    assert sch.use_dynamic_shifting and sch.shift == 3.0 and sch.time_shift_type == "exponential"
    assert tiny_editor.model_info["random_weights"] is True


def test_tiny_is_deterministic_for_a_seed():
    a, b = build_preset("tiny", torch.device("cpu"), torch.float32, seed=0), build_preset("tiny", torch.device("cpu"), torch.float32, seed=0)
    for (na, pa), (nb, pb) in zip(a.transformer.named_parameters(), b.transformer.named_parameters()):
        assert na == nb and torch.equal(pa, pb)


def test_klein_4b_random_shapes_on_meta():
    bundle = build_preset("klein-4b-random", torch.device("meta"), torch.bfloat16)
    cfg = bundle.transformer.config
    for key, value in KLEIN_4B_TRANSFORMER.items():
        got = getattr(cfg, key)
        assert (tuple(got) if isinstance(got, (list, tuple)) else got) == value, key
    params = sum(p.numel() for p in bundle.transformer.parameters())
    assert 3.85e9 < params < 3.9e9  # 3.876 B
    te = bundle.text_encoder.config
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim", "intermediate_size", "vocab_size"):
        assert getattr(te, key) == QWEN3_4B[key], key
    assert tuple(bundle.vae.config.block_out_channels) == (128, 256, 512, 512)
    assert next(bundle.transformer.parameters()).dtype == torch.bfloat16


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_klein_4b_random_refuses_cpu():
    with pytest.raises(ModelLoadError, match="needs a CUDA GPU"):
        Editor.from_preset("klein-4b-random")
    with pytest.raises(ModelLoadError, match="needs a CUDA GPU"):
        Editor.from_preset("klein-4b-random", device="cpu")
    with pytest.raises(ModelLoadError, match="no CUDA GPU"):
        Editor.from_preset("tiny", device="cuda")


def test_unknown_preset_and_missing_folder():
    with pytest.raises(ModelLoadError, match="unknown preset"):
        Editor.from_preset("huge")
    with pytest.raises(ModelLoadError, match="model_index.json"):
        Editor.from_pretrained("/nonexistent/folder")


@pytest.fixture(scope="module")
def saved_folder(tmp_path_factory, tiny_pipeline):
    folder = tmp_path_factory.mktemp("model")
    tiny_pipeline.save_pretrained(folder)
    return folder


def test_from_pretrained_folder_equals_preset(saved_folder, tiny_editor):
    loaded = Editor.from_pretrained(str(saved_folder))
    img = random_image(64, 96, seed=2)
    a = loaded.edit(img, "make it blue", steps=2, seed=5).array
    b = tiny_editor.edit(img, "make it blue", steps=2, seed=5).array
    # The reloaded text encoder may pick another attention implementation: equal up to float rounding.
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)
    assert loaded.model_info["random_weights"] is False


def test_sidecar_is_applied_and_enforced(saved_folder, tmp_path):
    import shutil

    folder = tmp_path / "student"
    shutil.copytree(saved_folder, folder)
    (folder / "rtedit.json").write_text(
        json.dumps({"prompt_length": 64, "text_encoder_layers": [9, 18, 27], "steps": [2], "name": "toy student", "random_weights": True})
    )
    ed = Editor.from_pretrained(str(folder))
    assert ed.config.prompt.max_length == 64
    assert ed.encode_prompt("make it blue").embeds.shape[1] == 64
    assert ed.model_info["name"] == "toy student" and ed.model_info["steps"] == [2]
    assert ed.edit(random_image(64, 64), "make it blue", steps=2).array.shape == (64, 64, 3)
    with pytest.raises(UnsupportedRequest, match="steps"):
        ed.edit(random_image(64, 64), "make it blue", steps=4)
    # The text-encoder service and a replica without Qwen3 key prompts alike for the folder's own settings.
    from rtedit.config import EditorConfig
    from rtedit.prompts import PromptService

    service = PromptService.from_config(EditorConfig(model=str(folder)))
    replica = Editor.from_config(EditorConfig(model=str(folder), text_encoder=False))
    assert service.key("make it blue") == replica.prompt_key("make it blue") == ed.prompt_key("make it blue")
    assert service.config.max_length == replica.config.prompt.max_length == 64
    assert replica.prompt_key("make it blue") != Editor.from_preset("tiny").prompt_key("make it blue")


@pytest.fixture(scope="module")
def causal_folder(saved_folder, tmp_path_factory):
    """The tiny preset saved with rtedit.json {"causal": "session", "condition_timestep": 0.0} (random weights)."""
    import shutil

    folder = tmp_path_factory.mktemp("causal") / "session"
    shutil.copytree(saved_folder, folder)
    (folder / "rtedit.json").write_text(json.dumps({"causal": "session", "condition_timestep": 0.0}))
    return folder


def test_a_causal_folder_is_served_in_its_own_mode_only(causal_folder, saved_folder):
    from rtedit.config import EditorConfig
    from rtedit.prompts import PromptService

    editor = Editor.from_pretrained(str(causal_folder))
    assert (editor.mode, editor.condition_timestep) == ("session", 0.0)
    assert editor.model_info["causal"] == "session" and editor.kv_store is not None
    assert "session" in editor.edit(random_image(64, 64), "make it blue").timings
    assert PromptService.from_config(EditorConfig(model=str(causal_folder))).key("x") == editor.prompt_key("x")
    Editor.from_config(EditorConfig(model=str(causal_folder), causal="session", text_encoder=False))
    from rtedit.errors import ConfigError

    for asked in ("off", "kv"):  # refused before any weight is read
        with pytest.raises(UnsupportedRequest, match="own attention mode"):
            Editor.from_config(EditorConfig(model=str(causal_folder), causal=asked))
    for asked in ("kv", "session"):  # a full-attention folder never runs causally
        with pytest.raises(UnsupportedRequest, match="full attention"):
            Editor.from_config(EditorConfig(model=str(saved_folder), causal=asked))
    # Unless asked for as the training-free baseline: the folder loads as itself, then runs in the asked mode.
    for asked in ("kv", "session"):
        free = Editor.from_config(EditorConfig(model=str(saved_folder), causal=asked, training_free=True))
        assert (free.mode, free.model_info["training_free"]) == (asked, True)
    with pytest.raises(ConfigError, match="trained for the causal mode"):
        Editor.from_config(EditorConfig(model=str(causal_folder), causal="kv", training_free=True))
    # Random preset weights were trained for no mode: they run in the asked one (tests/test_sessions.py), folders never.
    with pytest.raises(ConfigError, match="causal must be one of"):
        EditorConfig(causal="yes").validate()


@pytest.mark.parametrize("data, expected", [
    ({"causal": "session", "condition_timestep": 0}, ("session", 0.0)),
    ({"causal": "kv", "condition_timestep": 1.0}, ("kv", 1.0)),
    ({"causal": False}, (None, None)),
    ({"causal": None}, (None, None)),
    ({}, (None, None)),
])
def test_causal_sidecar_fields(data, expected):
    sidecar = Sidecar.from_dict(data)
    assert (sidecar.causal, sidecar.condition_timestep) == expected
    assert sidecar.attention == (expected[0] or "off")


@pytest.fixture(scope="module")
def kv_folder(tmp_path_factory):
    """A tiny Flux2KleinKVPipeline saved as klein-9B-KV is published: model_index.json names the KV class, no
    rtedit.json. Its transformer is sharpened so that the attention masks visibly matter."""
    from diffusers import Flux2KleinKVPipeline

    bundle = build_preset("tiny", torch.device("cpu"), torch.float32)
    with torch.no_grad():
        for name, p in bundle.transformer.named_parameters():
            if "modulation" in name or "time_guidance_embed" in name:
                p.mul_(8.0)
    folder = tmp_path_factory.mktemp("kv") / "klein-kv"
    Flux2KleinKVPipeline(scheduler=bundle.scheduler, vae=bundle.vae, text_encoder=bundle.text_encoder,
                         tokenizer=bundle.tokenizer, transformer=bundle.transformer).save_pretrained(folder)
    return folder


def test_a_kv_checkpoint_is_served_in_kv_mode_and_equals_its_pipeline(kv_folder):
    from diffusers import Flux2KleinKVPipeline, Flux2KleinPipeline

    from rtedit.config import EditorConfig

    assert json.loads((kv_folder / "model_index.json").read_text())["_class_name"] == "Flux2KleinKVPipeline"
    editor = Editor.from_pretrained(str(kv_folder))
    assert (editor.mode, editor.condition_timestep) == ("kv", 0.0) and editor.kv_store is None
    image, refs = random_image(128, 128, seed=1), [random_image(64, 80, seed=10)]
    ours = editor.edit(image, "make it winter", references=refs, steps=2, seed=7).array
    pipe = Flux2KleinKVPipeline.from_pretrained(str(kv_folder), torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    images = [PIL.Image.fromarray(a) for a in [image, *refs]]
    theirs = pipe(image=images, prompt="make it winter", num_inference_steps=2,
                  generator=torch.Generator("cpu").manual_seed(7), output_type="np").images[0]
    assert np.abs(ours - theirs).max() <= 1e-4
    full = Flux2KleinPipeline(**pipe.components, is_distilled=True)  # the same modules with full attention
    full.set_progress_bar_config(disable=True)
    stock = full(image=images, prompt="make it winter", num_inference_steps=2, guidance_scale=1.0,
                 generator=torch.Generator("cpu").manual_seed(7), output_type="np").images[0]
    assert np.abs(stock - theirs).max() > 1e-3  # the comparison above can tell kv from full attention
    assert Editor.from_pipeline(pipe).mode == "kv"
    with pytest.raises(UnsupportedRequest, match="own attention mode"):
        Editor.from_config(EditorConfig(model=str(kv_folder), causal="session"))


def test_a_kv_checkpoint_with_a_session_sidecar_is_refused(kv_folder, tmp_path):
    import shutil

    folder = tmp_path / "kv"
    shutil.copytree(kv_folder, folder)
    (folder / "rtedit.json").write_text(json.dumps({"causal": "session", "condition_timestep": 0.0}))
    with pytest.raises(ModelLoadError, match="Flux2KleinKVPipeline"):
        Editor.from_pretrained(str(folder))


@pytest.mark.parametrize(
    "content, pattern",
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "JSON object"),
        ('{"prompt_length": 0}', "prompt_length"),
        ('{"prompt_length": NaN}', "prompt_length"),
        ('{"steps": [0]}', "steps"),
        ('{"steps": "2"}', "steps"),
        ('{"condition_timestep": NaN}', "condition_timestep"),
        ('{"causal": "yes"}', "causal"),
        ('{"causal": true, "condition_timestep": 0.0}', "name the mode"),
        ('{"causal": "session"}', "needs condition_timestep"),
        ('{"causal": "kv", "condition_timestep": 1.5}', r"in \[0, 1\]"),
        ('{"causal": "kv", "condition_timestep": true}', "condition_timestep"),
        ('{"condition_timestep": 0.0}', "causal model only"),
        ('{"autoencoder": {"type": "vqgan"}}', "taef2"),
        ('{"mystery": 1}', "unknown field"),
        ('{"tokenizer": "gpt2"}', "tokenizer"),
        ('{"native_size": 100}', "native_size"),
        ('{"native_size": 128.0}', "native_size"),
        ('{"examples": []}', "examples must be a list of 1..32"),
        ('{"examples": "make it darker"}', "examples must be a list"),
        ('{"examples": ["make it darker", ""]}', "non-empty string"),
        ('{"examples": [" make it darker"]}', "without surrounding spaces"),
        ('{"examples": [3]}', "each example"),
        ('{"examples": ["invert it", "invert it"]}', "distinct"),
        ('{"sizes": []}', "sizes must be a non-empty list"),
        ('{"sizes": [128, 128]}', r"each size must be \[height, width\]"),
        ('{"sizes": [[128, 100]]}', "multiples of 16"),
        ('{"sizes": [[128, 128.0]]}', "multiples of 16"),
        ('{"sizes": [[128, 128, 3]]}', "each size"),
        ('{"sizes": [[128, 128], [128, 128]]}', "distinct"),
        ('{"native_size": 256, "sizes": [[128, 128]]}', "native_size 256 is not one of sizes 128x128"),
    ],
)
def test_bad_sidecars(tmp_path, content, pattern):
    (tmp_path / "rtedit.json").write_text(content)
    with pytest.raises(ModelLoadError, match=pattern):
        Sidecar.load(tmp_path)


def test_from_pipeline_adopts_components(tiny_pipeline, tiny_editor):
    ed = Editor.from_pipeline(tiny_pipeline)
    assert ed.transformer is tiny_pipeline.transformer and ed.vae is tiny_pipeline.vae
    img = random_image(64, 64, seed=4)
    np.testing.assert_array_equal(ed.edit(img, "make it blue", seed=1).array, tiny_editor.edit(img, "make it blue", seed=1).array)


def test_config_validation():
    from rtedit.config import EditorConfig
    from rtedit.errors import ConfigError

    cfg = EditorConfig.from_dict({"model": "tiny", "images": {"max_pixels": 1_000_000}, "prompt": {"layers": [9, 18, 27]}})
    assert cfg.images.max_pixels == 1_000_000 and cfg.prompt.layers == (9, 18, 27)
    for bad, pattern in [
        ({"model": ""}, "model"),
        ({"dtype": "int8"}, "dtype"),
        ({"max_steps": 0}, "max_steps"),
        ({"images": {"max_aspect": float("nan")}}, "max_aspect"),
        ({"images": {"max_pixels": "many"}}, "max_pixels"),
        ({"prompt": {"layers": []}}, "layers"),
        ({"surprise": 1}, "unknown"),
        ({"images": {"surprise": 1}}, "images.surprise"),
    ]:
        with pytest.raises(ConfigError, match=pattern):
            EditorConfig.from_dict(bad)


def test_examples_and_sizes_are_read_as_tuples(tmp_path):
    data = {"examples": ["make it darker", "invert it"], "sizes": [[128, 128], [96, 160]], "native_size": 128}
    (tmp_path / "rtedit.json").write_text(json.dumps(data))
    sidecar = Sidecar.load(tmp_path)
    assert sidecar.examples == ("make it darker", "invert it")
    assert sidecar.sizes == ((128, 128), (96, 160))
    assert Sidecar().examples is None and Sidecar().sizes is None


def test_the_toy_editors_examples_are_instructions_it_was_trained_on():
    """Every one-click example the page offers is a wording of the toy world (rtedit.train.toy.TEMPLATES) that the
    reference-free page can send (no palette: it needs a reference image), and never a held-out combination."""
    import itertools

    from rtedit.train import toy
    from test_serve_helpers import REPO

    sidecar = Sidecar.load(REPO / "models" / "toy-editor")
    fills = {"shape": toy.SHAPES, "colour": tuple(toy.COLOURS), "position": tuple(toy.POSITIONS),
             "direction": tuple(toy.DIRECTIONS)}
    trained = {}
    for family, templates in toy.TEMPLATES.items():
        for template in templates:
            names = [n for n in fills if "{" + n + "}" in template]
            for values in itertools.product(*(fills[n] for n in names)):
                attributes = dict(zip(names, values))
                article = "an" if str(attributes.get("colour", "x"))[:1] in "aeiou" else "a"
                trained[template.format(a=article, **attributes)] = (family, attributes)
    assert sidecar.sizes == ((128, 128),) and sidecar.native_size == 128
    for example in sidecar.examples:
        assert example in trained, example
        family, attributes = trained[example]
        assert family not in toy.REFERENCE_FAMILIES and not toy.is_held_out(family, attributes), example
    assert {trained[e][0] for e in sidecar.examples} >= set(toy.GLOBAL_FAMILIES) - {"identity"}


@pytest.mark.parametrize("image, requested, expected", [
    ((128, 128), (None, None), None),
    ((300, 451), (None, None), "would come out at 288x448"),
    ((128, 128), (256, 256), "asks for 256x256"),
    ((256, 256), (128, 128), "the input image is 256x256"),
    ((130, 140), (None, None), None),  # floored to 128x128, as the pipeline crops it
])
def test_size_mismatch_names_what_is_off(image, requested, expected):
    from rtedit.presets import nearest_size, size_mismatch

    reason = size_mismatch(((128, 128),), *image, *requested)
    assert reason is None if expected is None else expected in reason and "128x128" in reason
    assert size_mismatch(None, 300, 451) is None  # a model that lists no sizes serves any
    assert nearest_size(((128, 128), (96, 160), (160, 96)), 300, 451) == (96, 160)
    assert nearest_size(((128, 128), (256, 256)), 200, 210) == (256, 256)
