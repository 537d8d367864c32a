"""PromptCache and the truncated text encoder."""

import pytest
import torch

from rtedit.config import PromptConfig
from rtedit.errors import InvalidRequest
from rtedit.prompts import PromptCache, PromptEmbedding, PromptEncoder


def make_editor():
    from rtedit.editor import Editor

    return Editor.from_preset("tiny")


def count_calls(module):
    calls = {"n": 0}

    def hook(*_):
        calls["n"] += 1

    return calls, module.register_forward_hook(hook)


def test_cache_hit_returns_identical_tensors_without_encoding():
    editor = make_editor()
    calls, handle = count_calls(editor.text_encoder.model.layers[0])
    try:
        first = editor.encode_prompt("make it winter")
        assert calls["n"] == 1
        again = editor.encode_prompt("make it winter")
        assert calls["n"] == 1, "a cache hit must not run the text encoder"
        assert again.embeds is first.embeds and again.text_ids is first.text_ids
        assert editor.stats()["prompt_cache"]["hits"] == 1
    finally:
        handle.remove()


def test_different_prompts_never_collide(tiny_editor):
    prompts = ["make it winter", "make it winter ", "Make it winter", "make it summer", "a" * 300]
    embs = tiny_editor.encode_prompts(prompts)
    assert len({e.key for e in embs}) == len(prompts)
    for i in range(len(prompts)):
        for j in range(i + 1, len(prompts)):
            assert not torch.equal(embs[i].embeds, embs[j].embeds), (prompts[i], prompts[j])


def test_batched_misses_equal_single_encodes(tiny_editor):
    single = [tiny_editor.prompt_encoder.encode([p])[0] for p in ("invert it", "flip it")]
    batched = tiny_editor.prompt_encoder.encode(["invert it", "flip it"])
    for a, b in zip(single, batched):
        assert a.key == b.key
        torch.testing.assert_close(a.embeds, b.embeds, rtol=1e-5, atol=1e-6)


def test_encoder_stops_at_deepest_tapped_layer(tiny_editor, tiny_pipeline):
    layers = tiny_editor.text_encoder.model.layers
    assert len(layers) == 28
    after, h1 = count_calls(layers[27])
    head, h2 = count_calls(tiny_editor.text_encoder.lm_head)
    try:
        emb = tiny_editor.prompt_encoder.encode(["paint it gold"])[0]
    finally:
        h1.remove()
        h2.remove()
    assert after["n"] == 0 and head["n"] == 0
    ref, ref_ids = tiny_pipeline.encode_prompt("paint it gold", max_sequence_length=512)
    torch.testing.assert_close(emb.embeds, ref, rtol=0, atol=1e-6)
    assert torch.equal(emb.text_ids, ref_ids)


def test_long_prompts_are_truncated_like_the_pipeline(tiny_editor, tiny_pipeline):
    long_prompt = " ".join(["snow"] * 700)
    emb = tiny_editor.encode_prompt(long_prompt)
    assert emb.truncated and emb.embeds.shape[1] == 512
    ref, _ = tiny_pipeline.encode_prompt(long_prompt, max_sequence_length=512)
    torch.testing.assert_close(emb.embeds, ref, rtol=0, atol=1e-6)
    assert not tiny_editor.encode_prompt("short").truncated


@pytest.mark.parametrize("bad", ["", "   ", None, 12, b"bytes"])
def test_bad_prompts_raise(tiny_editor, bad):
    with pytest.raises(InvalidRequest):
        tiny_editor.encode_prompt(bad)


def test_over_long_prompt_in_characters_is_rejected(tiny_editor):
    with pytest.raises(InvalidRequest, match="characters"):
        tiny_editor.encode_prompt("x" * (tiny_editor.config.prompt.max_chars + 1))


def _entry(key: str, n: int) -> PromptEmbedding:
    return PromptEmbedding(torch.zeros(1, n, 4), torch.zeros(1, n, 4, dtype=torch.int64), key)


def test_cache_bounded_in_entries_lru():
    cache = PromptCache(max_entries=2, max_bytes=10**9)
    cache.put(_entry("a", 1))
    cache.put(_entry("b", 1))
    assert cache.get("a") is not None  # a is now most recent
    cache.put(_entry("c", 1))
    assert cache.get("b") is None and cache.get("a") is not None and cache.get("c") is not None
    assert len(cache) == 2 and cache.evictions == 1


def test_cache_bounded_in_bytes():
    one = _entry("x", 10).nbytes
    cache = PromptCache(max_entries=100, max_bytes=int(2.5 * one))
    for key in "abcd":
        cache.put(_entry(key, 10))
        assert cache.nbytes <= cache.max_bytes
    assert len(cache) == 2
    cache.put(_entry("huge", 1000))  # larger than the whole cache: not stored
    assert cache.get("huge") is None and len(cache) == 2


def test_encoder_refuses_taps_beyond_depth(tiny_editor):
    from rtedit.errors import ModelLoadError

    with pytest.raises(ModelLoadError):
        PromptEncoder(tiny_editor.text_encoder, tiny_editor.tokenizer, PromptConfig(layers=(9, 40)))


def test_text_encoder_service_and_encoderless_editor_agree(tiny_editor):
    """Serve splits the model: the text-encoder service alone, editor replicas without Qwen3; keys and tensors agree."""
    import numpy as np

    from conftest import random_image
    from rtedit.config import EditorConfig
    from rtedit.editor import Editor
    from rtedit.prompts import PromptService

    service = PromptService.from_config(EditorConfig(model="tiny"))
    bare = Editor.from_preset("tiny", config=EditorConfig(text_encoder=False))
    assert bare.text_encoder is None and bare.model_info["has_text_encoder"] is False
    emb = service.encode_prompt("make it blue")
    assert emb.key == bare.prompt_key("make it blue") == tiny_editor.prompt_key("make it blue")
    assert torch.equal(emb.embeds, tiny_editor.encode_prompt("make it blue").embeds)
    img = random_image(64, 64)
    np.testing.assert_array_equal(bare.edit(img, emb).array, tiny_editor.edit(img, "make it blue").array)
    with pytest.raises(InvalidRequest, match="no text encoder"):
        bare.encode_prompt("make it blue")
