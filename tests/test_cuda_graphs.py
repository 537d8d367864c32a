"""CUDA graphs over a frame's stages (rtedit.accel.cuda_graphs): refused where they cannot hold (CPU, no buckets);
with the graph path off (CPU) the device-side quantisation equals numpy's; on a GPU a replay never sees a stale
input: alternating frames, prompts, seeds and sessions equal an editor without graphs, and the dynamic reuse checks
(the session's own, cache-dit's on the full path: rtedit.accel.dbcache_graphs) are captured, each replay following
its frame's own decision and counting it."""

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
    for policy in ("static", "dynamic"):  # dynamic: the check is captured with the denoise stage (GPU tests below)
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
def gpu_editor(graphs: bool, causal: str | None = None, steps: tuple[int, ...] | None = None, **config) -> Editor:
    """The tiny preset on the GPU in float32, the same seeded weights every time, eager (no compile); `steps`: the
    step counts it serves (the first is the one its warm-up captures)."""
    bundle = build_preset("tiny", torch.device("cuda"), torch.float32, seed=0, text_encoder=True, steps=steps)
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


def three_and_three_blocks(monkeypatch) -> None:
    """Each block group of the tiny preset gets a first, a middle and a last block to reuse."""
    import rtedit.presets as presets

    monkeypatch.setattr(presets, "TINY_TRANSFORMER", {**presets.TINY_TRANSFORMER, "num_layers": 3,
                                                      "num_single_layers": 3})


def dbcache_counts(editor: Editor) -> dict:
    """The full path's DBCache totals: requests, and per group (steps, cached steps, device-made checks)."""
    stats = editor.stats()["dbcache"]
    checks = stats["device_checks"] or {}
    return {"requests": stats["requests"], **{name: (g["steps"], g["cached_steps"], checks.get(name, 0))
                                              for name, g in stats["groups"].items()}}


def groups_of(counts: dict) -> list[tuple[str, tuple]]:
    """dbcache_counts' per-group entries, without its request count."""
    return [(name, value) for name, value in counts.items() if name != "requests"]


def counted_since(before: dict, after: dict) -> dict:
    return {k: after[k] - before[k] if k == "requests" else tuple(a - b for a, b in zip(after[k], before[k]))
            for k in after}


@needs_gpu
@pytest.mark.parametrize("causal, policy, threshold", [("session", "dynamic", 1e9), ("session", "dynamic", 1e-9),
                                                       ("session", "static", 0.5), (None, "dynamic", 0.5),
                                                       (None, "dynamic", 5.0), (None, "static", 0.5)])
def test_reuse_decisions_inside_and_outside_the_graphs(monkeypatch, causal, policy, threshold):
    """Both dynamic checks, the session's and cache-dit's (the full path), are captured with the denoise stage
    (reusing always or never, as the check says): as conditional nodes where torch has them, else as graph segments
    with the check read between them, once per block group of step 2. cache-dit takes a threshold >= 1 as "always"
    on the host: nothing to capture. A replay counts what a run counts."""
    three_and_three_blocks(monkeypatch)
    reuse = CachingConfig(enabled=True, policy=policy, residual_diff_threshold=threshold)
    plain, graphed = gpu_editor(False, causal, dbcache=reuse), gpu_editor(True, causal, dbcache=reuse)
    stats = graphed.stats()["cuda_graphs"]
    checked = policy == "dynamic" and (causal is not None or threshold < 1)
    segmented = checked and conditional_nodes_unavailable() is not None
    assert stats["left_out"] == {} and stats["captured"] == ["decode", "denoise", "encode"]
    assert stats["host_decisions"] == ({"denoise": 2} if segmented else {})  # one per block group of step 2
    frame = random_image(64, 64, seed=5)

    reads = stats["host_reads"]
    before = dbcache_counts(graphed) if causal is None else None
    for seed in (1, 2):
        a, b = plain.edit(frame, "make it blue", seed=seed), graphed.edit(frame, "make it blue", seed=seed)
        np.testing.assert_allclose(b.array, a.array, atol=1e-5, rtol=0)
    if causal is not None:  # a replay counts what a run counts (the warm-up ran frames on the graphed editor only)
        hits = graphed.stats()["step_reuse"]
        assert (hits["hit_rate"] == 1.0) == (policy == "static" or threshold > 1)
        assert (hits["hit_rate"] == 0.0) == (policy == "dynamic" and threshold < 1)
    else:  # the graphed editor's two replays count what the eager editor's two frames count
        expected = dbcache_counts(plain)
        assert counted_since(before, dbcache_counts(graphed)) == {
            **expected, **{name: (steps, cached, 2 if checked else 0)
                           for name, (steps, cached, _) in groups_of(expected)}}
        cached = [v[1] for _, v in groups_of(expected)]
        assert all(c == 0 for c in cached) == (policy == "dynamic" and threshold < 1)  # random weights: change ~1
        assert all(c == 2 for c in cached) == (policy == "static" or threshold > 1)
        for name, group in graphed.stats()["dbcache"]["groups"].items():  # the last frame's, as cache-dit reports it
            eager = plain.stats()["dbcache"]["groups"][name]["last"]
            assert group["last"]["cached_steps"] == eager["cached_steps"]
            assert group["last"]["residual_diffs"] == pytest.approx(eager["residual_diffs"], rel=1e-4)
    assert graphed.stats()["cuda_graphs"]["host_reads"] - reads == (2 * 2 if segmented else 0)


@needs_gpu
def test_one_captured_denoise_follows_each_frames_own_reuse_decision(monkeypatch):
    """A threshold between the residual changes of different frames: the same captured stage must reuse on some
    frames and compute on others, each frame equal to the eager editor's (a replay that kept the capture's choice,
    or read a stale decision, would not be)."""
    three_and_three_blocks(monkeypatch)
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


def close_schedule(timesteps: tuple[float, ...]):
    """A TimestepCache.get for steps at nearly one noise level: the full path's Fn residual then changes by ~0.2-0.9
    between steps, where the served schedule's >1 only passes a threshold >= 1 (which cache-dit takes as "always",
    checking nothing). The timesteps are inputs of the captured stage, so a warmed editor replays them too."""
    def get(seq_len, steps, device):
        t = torch.tensor(timesteps, dtype=torch.float32, device=device)
        return t, torch.cat([t / 1000, t.new_zeros(1)])

    return get


def full_path_editor(graphs: bool, threshold: float, mask: tuple[int, ...] = (1, 0)) -> Editor:
    editor = gpu_editor(graphs, steps=(len(mask),),
                        dbcache=CachingConfig(enabled=True, residual_diff_threshold=threshold, compute_mask=mask))
    editor.timestep_cache.get = close_schedule((1000.0, 999.0) if len(mask) == 2 else (1000.0, 990.0, 989.0))
    return editor


def last_decisions(editor: Editor) -> dict:
    return {name: g["last"]["cached_steps"] for name, g in editor.stats()["dbcache"]["groups"].items()}


@needs_gpu
def test_one_captured_denoise_follows_each_frames_own_cache_dit_decision(monkeypatch):
    """cache-dit's check on the full path, captured (rtedit.accel.dbcache_graphs): a threshold between the residual
    changes of different frames makes the one captured stage reuse on some frames and compute on others, each frame
    equal to the eager editor's and counted as it counts; one host read per block group of step 2 (segments)."""
    three_and_three_blocks(monkeypatch)
    frames = [random_image(64, 64, seed=s) for s in range(6)]
    probe, changes = full_path_editor(False, 1e-9), []
    for frame in frames:
        probe.edit(frame, "make it blue", seed=1)
        changes.append(probe.stats()["dbcache"]["groups"]["transformer_blocks"]["last"]["residual_diffs"]["1"])
    threshold = float(np.median(changes))  # the double-stream group reuses on about half the frames
    plain, graphed = full_path_editor(False, threshold), full_path_editor(True, threshold)
    assert graphed.stats()["cuda_graphs"]["captured"] == ["decode", "denoise", "encode"]
    before, reads = dbcache_counts(graphed), graphed.stats()["cuda_graphs"]["host_reads"]
    for frame in frames:
        a, b = plain.edit(frame, "make it blue", seed=1), graphed.edit(frame, "make it blue", seed=1)
        np.testing.assert_allclose(b.array, a.array, atol=1e-5, rtol=0)
        assert last_decisions(graphed) == last_decisions(plain)  # this frame's decision, not the capture's
    counted = counted_since(before, dbcache_counts(graphed))
    expected = dbcache_counts(plain)
    assert counted == {**expected, **{name: (steps, cached, len(frames))
                                      for name, (steps, cached, _) in groups_of(expected)}}
    assert 0 < expected["transformer_blocks"][1] < len(frames), (threshold, changes)  # reused on some frames only
    segmented = conditional_nodes_unavailable() is not None
    assert graphed.stats()["cuda_graphs"]["host_reads"] - reads == (2 * len(frames) if segmented else 0)


@needs_gpu
def test_a_captured_compute_branch_leaves_the_residuals_the_next_step_reads(monkeypatch):
    """Mask [1, 0, 0]: step 2 computes and step 3 reuses, compared with step 2's residual. Under capture both of
    step 2's branches ran in Python; the computing one must have written its residuals into the buffers step 3's
    kernels were captured reading (compared with step 1's, step 3 would compute)."""
    three_and_three_blocks(monkeypatch)
    frames = [random_image(64, 64, seed=s) for s in (7, 8)]
    probe = full_path_editor(False, 1e-9, mask=(1, 0, 0))
    step_2, step_3 = [], []
    for frame in frames:
        probe.edit(frame, "make it blue", seed=1, steps=3)
        for group in probe.stats()["dbcache"]["groups"].values():
            step_2.append(group["last"]["residual_diffs"]["1"])
            step_3.append(group["last"]["residual_diffs"]["2"])  # all computed: step 3 against step 2's residual
    assert max(step_3) < min(step_2), (step_2, step_3)
    threshold = (max(step_3) + min(step_2)) / 2
    plain, graphed = full_path_editor(False, threshold, (1, 0, 0)), full_path_editor(True, threshold, (1, 0, 0))
    reads = graphed.stats()["cuda_graphs"]["host_reads"]
    for frame in frames:
        a, b = plain.edit(frame, "make it blue", seed=1, steps=3), graphed.edit(frame, "make it blue", seed=1, steps=3)
        np.testing.assert_allclose(b.array, a.array, atol=1e-5, rtol=0)
        assert last_decisions(graphed) == last_decisions(plain) == {
            "transformer_blocks": [2], "single_transformer_blocks": [2]}
    segmented = conditional_nodes_unavailable() is not None
    assert graphed.stats()["cuda_graphs"]["host_reads"] - reads == (2 * 2 * len(frames) if segmented else 0)


@needs_gpu
def test_taylorseer_leaves_the_full_paths_denoise_stage_eager(monkeypatch):
    """TaylorSeer's extrapolation state is cache-dit's Python, which a replay does not run: with the dynamic check
    that stage is the one left out, said in stats, and runs eagerly."""
    three_and_three_blocks(monkeypatch)
    config = CachingConfig(enabled=True, compute_mask=(1, 1, 0), taylorseer_order=1)
    plain, graphed = gpu_editor(False, steps=(3,), dbcache=config), gpu_editor(True, steps=(3,), dbcache=config)
    stats = graphed.stats()["cuda_graphs"]
    assert "TaylorSeer" in stats["left_out"]["denoise"] and stats["captured"] == ["decode", "encode"]
    frame = random_image(64, 64, seed=9)
    a, b = plain.edit(frame, "make it blue", seed=1, steps=3), graphed.edit(frame, "make it blue", seed=1, steps=3)
    np.testing.assert_allclose(b.array, a.array, atol=1e-5, rtol=0)


def test_no_branch_outside_a_capture():
    """A captured branch is only recorded into a StageGraphs capture: asking for one elsewhere is an error."""
    with pytest.raises(RuntimeError, match="no StageGraphs capture"):
        branch(torch.tensor(True), lambda: None, lambda: None)
