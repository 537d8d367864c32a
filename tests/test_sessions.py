"""Sessions (rtedit.session): a session frame equals a fresh editor's one-shot edit of the same inputs, bit for bit
(CPU, float32), in every attention mode; updates invalidate only their own session's stored T/R keys and values;
the session mode's fast path (probe, compile, warm-up) runs causal frames, and DBCache is refused with kv.

Models are the tiny preset with rtedit.json's causal fields set on the bundle and sharpened modulation weights
(default init leaves the gates near zero, so the instruction and references would barely move the output).
"""

import dataclasses
import threading

import numpy as np
import pytest
import torch

from conftest import random_image
from rtedit.accel.compile import CompileConfig
from rtedit.accel.dbcache import CachingConfig
from rtedit.config import EditorConfig, ShapeBuckets
from rtedit.editor import Editor
from rtedit.errors import ConfigError, EditCancelled, InvalidRequest
from rtedit.model.causal import require_causal_processors
from rtedit.presets import build_preset

CPU, F32 = torch.device("cpu"), torch.float32
FRAME, OTHER_FRAME = random_image(64, 64, seed=1), random_image(64, 64, seed=2)
REFS = [random_image(64, 80, seed=10)]


def causal_editor(mode: str | None, config: EditorConfig | None = None, condition_timestep: float = 0.0,
                  text_encoder: bool = True) -> Editor:
    """A fresh tiny editor (the same seeded weights every time) whose sidecar names `mode`."""
    bundle = build_preset("tiny", CPU, F32, seed=0, text_encoder=text_encoder)
    if mode is not None:
        bundle.sidecar = dataclasses.replace(bundle.sidecar, causal=mode, condition_timestep=condition_timestep)
    with torch.no_grad():
        for name, p in bundle.transformer.named_parameters():
            if "modulation" in name or "time_guidance_embed" in name:
                p.mul_(8.0)
    return Editor(bundle, config)


@pytest.fixture(scope="module")
def session_editor():
    return causal_editor("session")


@pytest.fixture(scope="module")
def one_shot():
    """A fresh session-mode editor's one-shot edits (no store involved), memoised by their inputs."""
    editor, results = causal_editor("session"), {}

    def run(frame_seed: int, prompt: str, refs: int = 1, seed: int = 3) -> np.ndarray:
        key = (frame_seed, prompt, refs, seed)
        if key not in results:
            frame = random_image(64, 64, seed=frame_seed)
            results[key] = editor.edit(frame, prompt, references=REFS[:refs], seed=seed).array
        return results[key]

    return run


def test_interleaved_sessions_equal_fresh_one_shot_edits(session_editor, one_shot):
    editor = session_editor
    a = editor.open_session("make it blue", REFS)
    b = editor.open_session("turn it to night", REFS)
    store_before = editor.stats()["kv_store"]
    for frame_seed, session in [(1, a), (1, b), (2, a), (2, b), (1, a)]:
        out = session.edit(random_image(64, 64, seed=frame_seed), seed=3)
        expected = one_shot(frame_seed, "make it blue" if session is a else "turn it to night")
        np.testing.assert_array_equal(out.array, expected)
        assert set(out.timings) == {"prepare", "session", "denoise", "decode", "total"}
    assert np.abs(one_shot(1, "make it blue") - one_shot(1, "turn it to night")).max() > 1e-3  # prompts matter
    store = editor.stats()["kv_store"]
    assert store["entries"] - store_before["entries"] == 2 and store["sessions"] >= 2
    assert (store["misses"] - store_before["misses"], store["hits"] - store_before["hits"]) == (2, 3)
    assert a.stats()["store_hits"] == 2 and b.stats()["store_hits"] == 1
    a.close()
    b.close()
    assert editor.stats()["kv_store"]["entries"] == store_before["entries"]


def test_one_shot_edit_books_the_session_stage_and_stores_nothing(session_editor):
    before = session_editor.stats()["kv_store"]
    result = session_editor.edit(FRAME, "make it blue", references=REFS, seed=3)
    assert list(result.timings) == ["prepare", "session", "denoise", "decode", "total"]
    assert session_editor.stats()["kv_store"] == before
    assert session_editor.stats()["causal"] == "session" and session_editor.model_info["causal"] == "session"


def test_update_invalidates_only_its_own_entries(session_editor, one_shot):
    editor = session_editor
    a = editor.open_session("make it blue", REFS, session_id="ws-a")
    b = editor.open_session("turn it to night", REFS, session_id="ws-b")
    a.edit(FRAME, seed=3)
    b.edit(FRAME, seed=3)
    entries = editor.stats()["kv_store"]["entries"]
    assert a.update(prompt="make it blue") == 0  # nothing changed: the entry and the version stay
    assert editor.stats()["kv_store"]["entries"] == entries
    latents = a.inputs.latents
    assert a.update(prompt="add snow") == 1 and a.version == 1
    assert editor.stats()["kv_store"]["entries"] == entries - 1  # a's entry went, b's stayed
    assert a.inputs.latents is latents and latents  # the references did not change: their latents stay
    np.testing.assert_array_equal(a.edit(FRAME, seed=3).array, one_shot(1, "add snow"))
    hits = b.stats()["store_hits"]
    np.testing.assert_array_equal(b.edit(FRAME, seed=3).array, one_shot(1, "turn it to night"))
    assert b.stats()["store_hits"] == hits + 1
    assert a.update(references=[]) == 2 and not a.inputs.latents
    np.testing.assert_array_equal(a.edit(FRAME, seed=3).array, one_shot(1, "add snow", refs=0))
    assert editor.session("ws-a") is a and editor.session("ws-b") is b
    with pytest.raises(InvalidRequest, match="already open"):
        editor.open_session("make it red", session_id="ws-a")
    a.close()
    b.close()
    assert editor.session("ws-a") is None and editor.stats()["sessions"] == 0
    with pytest.raises(InvalidRequest, match="closed"):
        a.edit(FRAME)
    with pytest.raises(InvalidRequest, match="closed"):
        a.update(prompt="again")


def test_sessions_are_checked_when_opened(session_editor):
    with pytest.raises(InvalidRequest, match="empty"):
        session_editor.open_session("   ")
    with pytest.raises(InvalidRequest, match="references"):
        session_editor.open_session("make it blue", [FRAME] * 5)
    with pytest.raises(InvalidRequest, match="bucket"):
        session_editor.open_session("make it blue", bucket=(64,))
    assert session_editor.stats()["sessions"] == 0


def test_a_session_with_embeddings_on_a_replica_without_text_encoder(session_editor, one_shot):
    """A Serve replica has no Qwen3: its sessions take the PromptEmbedding the text encoder sent."""
    replica = causal_editor("session", EditorConfig(text_encoder=False), text_encoder=False)
    emb = session_editor.encode_prompt("make it blue")
    session = replica.open_session(emb, REFS, bucket=(64, 64))
    np.testing.assert_array_equal(session.edit(FRAME, seed=3).array, one_shot(1, "make it blue"))
    with pytest.raises(InvalidRequest, match="text encoder"):
        session.update(prompt="make it red")  # a string needs a text encoder in this process
    session.close()


@pytest.mark.parametrize("mode", [None, "kv"])
def test_sessions_of_other_modes_run_the_plain_edit(mode):
    editor = causal_editor(mode)
    session = editor.open_session("make it blue", REFS)
    out = session.edit(FRAME, seed=3)
    expected = editor.edit(FRAME, "make it blue", references=REFS, seed=3)
    np.testing.assert_array_equal(out.array, expected.array)
    assert set(out.timings) == {"prepare", "denoise", "decode", "total"}
    assert editor.kv_store is None and editor.stats()["kv_store"] == {"enabled": False}
    session.close()


def test_the_modes_differ_from_each_other_and_from_full_attention(one_shot):
    outputs = {mode: causal_editor(mode).edit(FRAME, "make it blue", references=REFS, seed=3).array
               for mode in (None, "kv")}
    outputs["session"] = one_shot(1, "make it blue")
    for x, y in [(None, "kv"), (None, "session"), ("kv", "session")]:
        assert np.abs(outputs[x] - outputs[y]).max() > 1e-3, (x, y)


def test_cancelled_session_frame_stops_before_the_next_step(session_editor):
    """The caller gives up during step 1 (after the T/R pass and I's pass): step 2 never runs."""
    session = session_editor.open_session("make it blue", REFS)
    block = session_editor.transformer.transformer_blocks[0]
    cancel, calls, forward = threading.Event(), [], block.forward

    def count_then_give_up(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:  # the session pass, the frame pass, then step 1
            cancel.set()
        return forward(*args, **kwargs)

    block.forward = count_then_give_up
    try:
        with pytest.raises(EditCancelled, match="before step 2"):
            session.edit(FRAME, steps=2, cancel=cancel)
    finally:
        del block.forward
    assert len(calls) == 3
    session.close()


def test_dbcache_with_the_kv_mode_is_refused():
    buckets = ShapeBuckets(sizes=((64, 64),))
    with pytest.raises(ConfigError, match="dbcache does not combine"):
        causal_editor("kv", EditorConfig(buckets=buckets, dbcache=CachingConfig(enabled=True)))
    with pytest.raises(ConfigError, match="dbcache does not combine"):
        EditorConfig(causal="kv", buckets=buckets, dbcache=CachingConfig(enabled=True)).validate()


@pytest.mark.parametrize("mode", ["session", "kv"])
def test_probe_and_compile_run_causal_frames(mode):
    """The probe times the mode's processors (session: the grouped attention; kv: diffusers' extract pass) and
    leaves them in place with its backend; compile warms every bucket with whole causal frames (session: the T/R,
    I and X passes), after which frames in either bucket compile nothing and equal the eager path."""
    buckets = ShapeBuckets(sizes=((64, 64), (64, 96)), references=(1,))
    cfg = EditorConfig(buckets=buckets, select_attention=True, compile=CompileConfig(enabled=True, backend="eager"))
    editor = causal_editor(mode, cfg)
    require_causal_processors(editor.transformer, mode)
    chosen = editor.stats()["attention"]["active"]
    backends = {getattr(p._attention_backend, "value", p._attention_backend)
                for p in editor.transformer.attn_processors.values()}
    assert backends == {chosen}
    assert editor.warm["causal"] == mode and sorted(editor.warm["shapes"]) == [(64, 64, 1), (64, 96, 1)]
    assert editor.warm["repeat_compiles"]["transformer"] == 0 and editor.warm["compiles"]["transformer"] > 0
    eager = causal_editor(mode, EditorConfig(buckets=buckets))  # references resized into the bucket alike
    for height, width in buckets.sizes:
        session = editor.open_session("make it blue", REFS, bucket=(height, width))
        for frame_seed in (1, 2):
            frame = random_image(height, width, seed=frame_seed)
            expected = eager.edit(frame, "make it blue", references=REFS, seed=3).array
            np.testing.assert_allclose(session.edit(frame, seed=3).array, expected, rtol=0, atol=1e-5)
        session.close()
    branches = editor.stats()["compile"]["branches"]
    assert {n: (b["state"], b["recompiles"]) for n, b in branches.items()} == {
        n: ("compiled", 0) for n in ("transformer", "vae_encoder", "vae_decoder")}


def test_a_random_preset_runs_in_the_mode_the_config_asks_for():
    """Random weights were trained for no mode: `causal` picks the one to time (conditions at timestep 0)."""
    from rtedit.config import EditorConfig
    from rtedit.editor import Editor

    assert Editor.from_config(EditorConfig(model="tiny")).mode is None
    assert Editor.from_config(EditorConfig(model="tiny", causal="off")).mode is None
    for mode in ("kv", "session"):
        editor = Editor.from_config(EditorConfig(model="tiny", causal=mode))
        assert editor.mode == mode and editor.condition_timestep == 0.0 and editor.model_info["random_weights"]


@pytest.mark.parametrize("mode", ["kv", "session"])
def test_training_free_runs_a_full_attention_model_causally(mode):
    """The drift baseline: the same weights in a causal mode, conditions at timestep 0; only when asked for."""
    editor = causal_editor(None, EditorConfig(causal=mode, training_free=True))
    assert editor.mode == mode and editor.condition_timestep == 0.0 and editor.model_info["training_free"]
    full = causal_editor(None).edit(FRAME, "make it blue", references=REFS, seed=3).array
    causal = editor.edit(FRAME, "make it blue", references=REFS, seed=3).array
    same_mode = causal_editor(mode).edit(FRAME, "make it blue", references=REFS, seed=3).array
    np.testing.assert_array_equal(causal, same_mode)  # exactly the mode's path on the same weights
    assert np.abs(causal.astype(float) - full).max() > 0
    with pytest.raises(ConfigError, match="trained for the causal mode"):
        causal_editor("session", EditorConfig(causal=mode, training_free=True))
    with pytest.raises(ConfigError, match="training_free runs a full-attention model"):
        EditorConfig(training_free=True).validate()
