"""CUDA graphs over a frame's stages (rtedit.accel.cuda_graphs): refused where they cannot hold (CPU, host-side
reuse decisions, no buckets); with the graph path off (CPU) the device-side quantisation equals numpy's; on a GPU a
replay never sees a stale input: alternating frames, prompts, seeds and sessions equal an editor without graphs."""

import dataclasses

import numpy as np
import pytest
import torch

from conftest import random_image
from rtedit.accel.cuda_graphs import branch, conditional_nodes_unavailable
from rtedit.accel.dbcache import CachingConfig
from rtedit.config import EditorConfig, ShapeBuckets
from rtedit.editor import Editor
from rtedit.errors import ConfigError
from rtedit.images import postprocess, to_host
from rtedit.model.step_reuse import StepReuse
from rtedit.presets import build_preset

BUCKETS = ShapeBuckets(sizes=((64, 64),), references=(0,))
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU")


def test_graphs_need_buckets_and_a_bool():
    with pytest.raises(ConfigError, match="buckets"):
        EditorConfig(cuda_graphs=True).validate()
    with pytest.raises(ConfigError, match="true or false"):
        EditorConfig(buckets=BUCKETS, cuda_graphs="yes").validate()
    for policy in ("static", "dynamic"):  # dynamic: the denoise stage is left uncaptured (tested on a GPU below)
        EditorConfig(buckets=BUCKETS, cuda_graphs=True, dbcache=CachingConfig(enabled=True, policy=policy)).validate()


def test_graphs_on_a_cpu_editor_are_a_config_error():
    with pytest.raises(ConfigError, match="CUDA device"):
        Editor.from_config(EditorConfig(model="tiny", device="cpu", buckets=BUCKETS, cuda_graphs=True))


def test_device_quantisation_equals_numpy_rounding():
    pixels = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2.2 - 1.1
    image, quantised = to_host(*postprocess(pixels))
    expected_image = (pixels * 0.5 + 0.5).clamp(0, 1)[0].permute(1, 2, 0).numpy()
    np.testing.assert_array_equal(image, expected_image)
    np.testing.assert_array_equal(quantised, (expected_image * 255).round().astype(np.uint8))


def test_a_replayed_static_frame_counts_what_a_run_counts():
    config = CachingConfig(enabled=True, policy="static", Fn=1, Bn=0)
    groups = {"transformer_blocks": 3, "single_transformer_blocks": 3}
    ran, replayed = StepReuse(config, groups), StepReuse(config, groups)
    frame = ran.frame(2)
    for _ in range(2):
        frame.begin_step()
        for name in groups:
            frame.run(name, [lambda h: h + 1] * 3, torch.zeros(2))
    replayed.count_replayed_frame(2)
    assert replayed.stats() == ran.stats() and ran.stats()["reused"] == {name: 1 for name in groups}
    dynamic = StepReuse(dataclasses.replace(config, policy="dynamic"), groups)
    dynamic.count_replayed_frame(2)  # its hits are counted on the device by the graph, not here
    assert dynamic.stats()["allowed"] == ran.stats()["allowed"] and dynamic.stats()["reused"] == {n: 0 for n in groups}


# ---- on a GPU -------------------------------------------------------------------------------------------------
def gpu_editor(graphs: bool, causal: str | None = None, **config) -> Editor:
    """The tiny preset on the GPU in float32, the same seeded weights every time, eager (no compile)."""
    bundle = build_preset("tiny", torch.device("cuda"), torch.float32, seed=0, text_encoder=True)
    if causal is not None:
        bundle.sidecar = dataclasses.replace(bundle.sidecar, causal=causal, condition_timestep=0.0)
    return Editor(bundle, EditorConfig(buckets=BUCKETS, cuda_graphs=graphs, **config))


@needs_gpu
@pytest.mark.parametrize("causal", [None, "session"])
def test_replays_see_every_new_input(causal):
    plain, graphed = gpu_editor(False, causal), gpu_editor(True, causal)
    assert graphed.stats()["cuda_graphs"]["graphs"] == 3  # encode, denoise, decode of the one bucket
    frames = [random_image(64, 64, seed=s) for s in (1, 2)]
    prompts = ["make it blue", "add a red circle"]
    for i in range(4):  # every input changes from one frame to the next
        kwargs = dict(seed=i, steps=2)
        a = plain.edit(frames[i % 2], prompts[i // 2 % 2], **kwargs)
        b = graphed.edit(frames[i % 2], prompts[i // 2 % 2], **kwargs)
        np.testing.assert_allclose(b.array, a.array, atol=1e-5, rtol=0)
    stats = graphed.stats()["cuda_graphs"]
    assert stats["replays"] >= 12 and stats["unwarmed_runs"] == 0


@needs_gpu
def test_interleaved_sessions_replay_their_own_keys_and_values():
    plain, graphed = gpu_editor(False, "session"), gpu_editor(True, "session")
    frame = random_image(64, 64, seed=3)
    sessions = {e: [e.open_session(p) for p in ("make it blue", "add a red circle")] for e in (plain, graphed)}
    for i in range(4):  # A, B, A, B: each replay must copy in the other session's T/R keys and values
        a = sessions[plain][i % 2].edit(frame, seed=1).array
        b = sessions[graphed][i % 2].edit(frame, seed=1).array
        np.testing.assert_allclose(b, a, atol=1e-5, rtol=0)


@needs_gpu
def test_a_step_count_the_warm_up_missed_runs_eagerly_and_is_counted():
    plain, graphed = gpu_editor(False), gpu_editor(True)
    frame = random_image(64, 64, seed=4)
    a, b = plain.edit(frame, "make it blue", steps=3), graphed.edit(frame, "make it blue", steps=3)
    np.testing.assert_allclose(b.array, a.array, atol=1e-5, rtol=0)
    assert graphed.stats()["cuda_graphs"]["unwarmed_runs"] == 1


@needs_gpu
@pytest.mark.parametrize("causal, policy, threshold", [("session", "dynamic", 1e9), ("session", "dynamic", 1e-9),
                                                       ("session", "static", 0.5), (None, "dynamic", 0.5)])
def test_reuse_decisions_inside_and_outside_the_graphs(monkeypatch, causal, policy, threshold):
    """The session mode's dynamic check is captured (reusing always or never, as the check says): as conditional
    nodes where torch has them, else as graph segments with the check read between them; cache-dit's (the full
    path) leaves the denoise stage uncaptured."""
    import rtedit.presets as presets

    # 3 + 3 blocks: each group has a first, a middle and a last block to reuse
    monkeypatch.setattr(presets, "TINY_TRANSFORMER", {**presets.TINY_TRANSFORMER, "num_layers": 3,
                                                      "num_single_layers": 3})
    reuse = CachingConfig(enabled=True, policy=policy, residual_diff_threshold=threshold)
    plain, graphed = gpu_editor(False, causal, dbcache=reuse), gpu_editor(True, causal, dbcache=reuse)
    stats = graphed.stats()["cuda_graphs"]
    left_out = policy == "dynamic" and causal is None
    segmented = policy == "dynamic" and causal is not None and conditional_nodes_unavailable() is not None
    assert ("denoise" in stats["left_out"]) == left_out
    assert stats["captured"] == (["decode", "encode"] if left_out else ["decode", "denoise", "encode"])
    assert stats["host_decisions"] == ({"denoise": 2} if segmented else {})  # one per block group of step 2
    frame = random_image(64, 64, seed=5)

    for seed in (1, 2):
        a, b = plain.edit(frame, "make it blue", seed=seed), graphed.edit(frame, "make it blue", seed=seed)
        np.testing.assert_allclose(b.array, a.array, atol=1e-5, rtol=0)
    if causal is not None:  # a replay counts what a run counts (the warm-up ran frames on the graphed editor only)
        hits = graphed.stats()["step_reuse"]
        assert (hits["hit_rate"] == 1.0) == (policy == "static" or threshold > 1)
        assert (hits["hit_rate"] == 0.0) == (policy == "dynamic" and threshold < 1)
    assert (graphed.stats()["cuda_graphs"]["host_reads"] > 0) == segmented


@needs_gpu
def test_one_captured_denoise_follows_each_frames_own_reuse_decision(monkeypatch):
    """A threshold between the residual changes of different frames: the same captured stage must reuse on some
    frames and compute on others, each frame equal to the eager editor's (a replay that kept the capture's choice,
    or read a stale decision, would not be)."""
    import rtedit.presets as presets

    monkeypatch.setattr(presets, "TINY_TRANSFORMER", {**presets.TINY_TRANSFORMER, "num_layers": 3,
                                                      "num_single_layers": 3})
    frames = [random_image(64, 64, seed=s) for s in range(6)]
    probe = gpu_editor(False, "session", dbcache=CachingConfig(enabled=True, residual_diff_threshold=1e-9))
    diffs = []
    for frame in frames:
        probe.edit(frame, "make it blue", seed=1)
        diffs += [d[-1] for d in probe.stats()["step_reuse"]["last_residual_diffs"].values()]
    threshold = float(np.median(diffs))
    reuse = CachingConfig(enabled=True, residual_diff_threshold=threshold)
    plain, graphed = gpu_editor(False, "session", dbcache=reuse), gpu_editor(True, "session", dbcache=reuse)
    before = graphed.stats()["step_reuse"]["reused"]
    for frame in frames:
        a, b = plain.edit(frame, "make it blue", seed=1), graphed.edit(frame, "make it blue", seed=1)
        np.testing.assert_allclose(b.array, a.array, atol=1e-5, rtol=0)
    after = graphed.stats()["step_reuse"]["reused"]
    hits = sum(after.values()) - sum(before.values())
    assert 0 < hits < 2 * len(frames), (threshold, diffs)  # some group-steps reused, some computed
    assert hits == sum(plain.stats()["step_reuse"]["reused"].values())


def test_no_branch_outside_a_capture():
    """A captured branch is only recorded into a StageGraphs capture: asking for one elsewhere is an error."""
    with pytest.raises(RuntimeError, match="no StageGraphs capture"):
        branch(torch.tensor(True), lambda: None, lambda: None)
