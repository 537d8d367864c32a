"""The fast path wired into Editor: attention probe, DBCache refreshed per request, selective compile, buckets."""

import dataclasses
import logging
import threading
import types

import numpy as np
import pytest
import torch

from conftest import random_image, tiny_transformer
from rtedit.accel.dbcache import CachingConfig
from rtedit.accel.compile import CompileConfig
from rtedit.config import EditorConfig, ShapeBuckets
from rtedit.editor import Editor
from rtedit.errors import ConfigError, EditCancelled, InvalidRequest
from rtedit.presets import build_preset

BUCKETS = ShapeBuckets(sizes=((64, 64), (64, 96)), references=(0, 1))


@pytest.fixture(scope="module")
def fast_editor():
    cfg = EditorConfig(buckets=BUCKETS, select_attention=True, compile=CompileConfig(enabled=True, backend="eager"))
    return Editor.from_preset("tiny", config=cfg)


def test_fast_path_matches_exact_path_at_bucket_sizes(fast_editor, tiny_editor):
    img = random_image(64, 96, seed=1)
    fast = fast_editor.edit(img, "make it blue", steps=2, seed=3)
    exact = tiny_editor.edit(img, "make it blue", steps=2, seed=3)
    np.testing.assert_allclose(fast.array, exact.array, rtol=0, atol=1e-5)
    stats = fast_editor.stats()
    assert stats["attention"]["chosen"] in ("native", "_native_math")
    assert {r["name"] for r in stats["attention"]["probe"]} >= {"native", "_native_math"}


def test_no_recompiles_inside_buckets(fast_editor):
    for h, w in BUCKETS.sizes:
        for refs in BUCKETS.references:
            fast_editor.edit(random_image(h, w, seed=h + w), "make it red", references=[random_image(80, 80)] * refs, height=h, width=w)
    # A frame of an unserved size is resized into the first bucket rather than compiled anew.
    assert fast_editor.edit(random_image(100, 120), "make it red").array.shape == (64, 64, 3)
    branches = fast_editor.stats()["compile"]["branches"]
    assert all(b["state"] == "compiled" for b in branches.values())
    assert {name: b["recompiles"] for name, b in branches.items()} == {"transformer": 0, "vae_encoder": 0, "vae_decoder": 0}


def test_requests_outside_buckets_are_rejected(fast_editor):
    with pytest.raises(InvalidRequest, match="not served"):
        fast_editor.edit(random_image(64, 64), "make it red", height=128, width=128)
    with pytest.raises(InvalidRequest, match="references are not served"):
        fast_editor.edit(random_image(64, 64), "make it red", references=[random_image(64, 64)] * 2)


def test_compile_and_dbcache_need_buckets():
    with pytest.raises(ConfigError, match="buckets"):
        EditorConfig(compile=CompileConfig(enabled=True, backend="eager")).validate()


def _two_block_bundle():
    bundle = build_preset("tiny", torch.device("cpu"), torch.float32)
    bundle.transformer = tiny_transformer(num_layers=3, num_single_layers=3)
    return bundle


def test_dbcache_state_never_leaks_between_requests(monkeypatch):
    import rtedit.editor as editor_module

    now = [0.0]  # the editor's clock for its gauge refresh (at most one a second): the test sets it, not the load
    monkeypatch.setattr(editor_module, "time", types.SimpleNamespace(monotonic=lambda: now[0]))
    cfg = EditorConfig(buckets=ShapeBuckets(sizes=((64, 64),)), dbcache=CachingConfig(enabled=True, policy="static"))
    a_img, b_img = random_image(64, 64, seed=1), random_image(64, 64, seed=2)
    cached = Editor(_two_block_bundle(), dataclasses.replace(cfg))
    cached.edit(a_img, "make it blue", seed=1)
    now[0] = 0.5
    after_a = cached.edit(b_img, "turn it to night", seed=2).array
    fresh = Editor(_two_block_bundle(), dataclasses.replace(cfg)).edit(b_img, "turn it to night", seed=2).array
    np.testing.assert_array_equal(after_a, fresh)
    stats = cached.stats()["dbcache"]
    assert stats["policy"] == "static"
    groups = stats["groups"].values()
    # The replica's Prometheus gauges: the first frame's totals (refreshed at most once a second after a frame).
    assert cached.reuse_counts() == {"dbcache_steps": 2 * len(groups), "dbcache_cached_steps": len(groups)}
    now[0] = 1.5  # a second after the last refresh: the next frame refreshes them, three frames' totals
    cached.edit(b_img, "turn it to night", seed=2)
    assert cached.reuse_counts() == {"dbcache_steps": 6 * len(groups), "dbcache_cached_steps": 3 * len(groups)}
    # Static [1, 0]: the second of two steps is served from the cache in every group.
    exact = Editor(_two_block_bundle(), EditorConfig()).edit(b_img, "turn it to night", seed=2).array
    assert np.abs(exact - fresh).max() > 0


def test_kernel_failure_while_serving_falls_back_for_the_whole_request(tiny_editor):
    editor = Editor.from_preset("tiny", config=EditorConfig(select_attention=True))
    order = editor.stats()["attention"]["order"]  # fastest first; on a CPU native and math trade places
    assert len(order) >= 2 and editor.stats()["attention"]["active"] == order[0]
    real_forward, calls = editor.transformer.forward, {"n": 0}

    def flaky_forward(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:  # the second step of the first request: mid-request
            raise RuntimeError("simulated kernel failure")
        return real_forward(*args, **kwargs)

    editor.transformer.forward = flaky_forward
    img = random_image(64, 64, seed=4)
    out = editor.edit(img, "make it blue", steps=2, seed=1).array
    attention = editor.stats()["attention"]
    assert attention["active"] == order[1] and len(attention["fallbacks"]) == 1
    assert "simulated kernel failure" in attention["fallbacks"][0]["reason"]
    np.testing.assert_allclose(out, tiny_editor.edit(img, "make it blue", steps=2, seed=1).array, rtol=0, atol=1e-5)


def test_cancelled_edit_stops_at_the_next_step_and_frees_the_editor(tiny_editor):
    """A caller that gives up (request timeout, client gone) stops the edit between steps; the attention fallback
    must not mistake that for a kernel failure, and the next request is served normally."""
    editor = Editor.from_preset("tiny", config=EditorConfig(select_attention=True))
    cancel, calls = threading.Event(), {"n": 0}
    real_forward = editor.transformer.forward

    def forward_then_give_up(*args, **kwargs):
        calls["n"] += 1
        cancel.set()  # the caller leaves while step 1 runs
        return real_forward(*args, **kwargs)

    editor.transformer.forward = forward_then_give_up
    img = random_image(64, 64, seed=4)
    with pytest.raises(EditCancelled, match="before step 2"):
        editor.edit(img, "make it blue", steps=2, seed=1, cancel=cancel)
    assert calls["n"] == 1  # step 2 never ran, on this backend or another
    stats = editor.stats()
    assert stats["attention"]["fallbacks"] == [] and stats["errors"] == {"EditCancelled": 1}
    editor.transformer.forward = real_forward
    out = editor.edit(img, "make it blue", steps=2, seed=1, cancel=threading.Event()).array
    np.testing.assert_allclose(out, tiny_editor.edit(img, "make it blue", steps=2, seed=1).array, rtol=0, atol=1e-5)
    cancel.set()  # given up while waiting for the model: nothing runs
    editor.transformer.forward = forward_then_give_up
    with pytest.raises(EditCancelled, match="waited"):
        editor.edit(img, "make it blue", steps=2, seed=1, cancel=cancel)
    assert calls["n"] == 1


def test_warm_up_without_a_text_encoder_runs_every_bucket_with_zero_embeddings():
    """A Serve replica has no Qwen3: warm-up feeds zero embeddings of the served shape to every bucket."""
    cfg = EditorConfig(text_encoder=False, buckets=BUCKETS, compile=CompileConfig(enabled=True, backend="eager"))
    editor = Editor.from_config(cfg)
    assert editor.prompt_encoder is None
    assert editor.warm["shapes"] == [(64, 64, 0), (64, 64, 1), (64, 96, 0), (64, 96, 1)]
    assert editor.warm["buckets"] == 4 and editor.stats()["edits"] == 8  # two passes over four buckets
    assert editor.stats()["warm_up"] is editor.warm
    plain = Editor.from_config(EditorConfig(text_encoder=False))
    assert plain.warm is None  # nothing compiled: warming is the caller's choice
    report = plain.warm_up(passes=1)
    assert report["shapes"] == [(64, 64, 0)] and plain.stats()["edits"] == 1


def test_a_device_failure_makes_the_editor_refuse_and_fail_its_health_check(monkeypatch):
    """A CUDA error loses the device's state: that edit and every later one raise EngineDead, health fails."""
    from rtedit.errors import EngineDead

    editor = Editor.from_preset("tiny")
    editor.check_health()
    img = random_image(64, 64)

    def broken(*args, **kwargs):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(editor.transformer, "forward", broken)
    with pytest.raises(EngineDead, match="illegal memory access"):
        editor.edit(img, "make it blue")
    monkeypatch.undo()
    with pytest.raises(EngineDead, match="restart"):
        editor.edit(img, "make it blue")
    with pytest.raises(EngineDead):
        editor.check_health()
    assert editor.stats()["errors"]["EngineDead"] == 2 and "illegal" in editor.stats()["device_failure"]


def test_an_ordinary_exception_is_not_a_device_failure(monkeypatch):
    editor = Editor.from_preset("tiny")
    monkeypatch.setattr(editor.transformer, "forward", lambda *a, **k: (_ for _ in ()).throw(ValueError("bug")))
    with pytest.raises(ValueError, match="bug"):
        editor.edit(random_image(64, 64), "make it blue")
    editor.check_health()
    assert editor.device_failure is None


def test_stats_name_the_active_attention_backend(fast_editor, tiny_editor):
    assert fast_editor.stats()["attention_backend"] == fast_editor.attention.active
    assert tiny_editor.stats()["attention_backend"] == "native (not probed)"


def test_start_up_phases_are_timed_and_logged(caplog):
    """Each phase the fast path builds is in stats()["startup_s"] and logged as it begins, so a start-up that runs
    past a time limit names the phase it was in; an editor without a fast path has none."""
    cfg = EditorConfig(buckets=ShapeBuckets(sizes=((64, 64),)), select_attention=True,
                       compile=CompileConfig(enabled=True, backend="eager"))
    with caplog.at_level(logging.INFO, logger="rtedit.fast_path"):
        editor = Editor.from_preset("tiny", config=cfg)
    phases = editor.stats()["startup_s"]
    assert list(phases) == ["attention probe", "warm-up (compiles)"]
    assert all(isinstance(s, float) and s >= 0 for s in phases.values())
    begun = [r.getMessage() for r in caplog.records if r.getMessage().endswith("...")]
    assert begun == ["start-up: attention probe ...", "start-up: warm-up (compiles) ..."]
    assert Editor.from_preset("tiny").stats()["startup_s"] == {}


def test_package_exports_the_engine_without_importing_torch_eagerly():
    import subprocess
    import sys

    code = ("import sys, rtedit; assert 'torch' not in sys.modules, 'torch imported eagerly'; "
            "from rtedit import Editor, EditorConfig, EditResult; import rtedit.editor as e; "
            "assert Editor is e.Editor and EditResult is e.EditResult and EditorConfig().model == 'tiny'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
