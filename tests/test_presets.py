"""Presets, loading from a diffusers folder with the rtedit.json sidecar, and adopting a pipeline."""

import json

import numpy as np
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


@pytest.mark.parametrize("sidecar", [{"causal": True}, {"condition_timestep": 0.0}])
def test_causal_folders_are_refused_until_the_engine_serves_them(saved_folder, tmp_path, sidecar):
    import shutil

    from rtedit.config import EditorConfig
    from rtedit.prompts import PromptService

    folder = tmp_path / "causal"
    shutil.copytree(saved_folder, folder)
    (folder / "rtedit.json").write_text(json.dumps(sidecar))
    with pytest.raises(UnsupportedRequest, match="causal models are not served"):
        Editor.from_pretrained(str(folder))
    with pytest.raises(UnsupportedRequest, match="causal models are not served"):
        PromptService.from_config(EditorConfig(model=str(folder)))


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
        ('{"autoencoder": {"type": "vqgan"}}', "taef2"),
        ('{"mystery": 1}', "unknown field"),
        ('{"tokenizer": "gpt2"}', "tokenizer"),
        ('{"native_size": 100}', "native_size"),
        ('{"native_size": 128.0}', "native_size"),
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
