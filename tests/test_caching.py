"""cache-dit DBCache on a tiny real Flux2 transformer (CPU): no state across requests, hit rates, config errors, and
the device-decision path CUDA graphs capture (rtedit.accel.dbcache_graphs) run eagerly against cache-dit's own."""

import math

import cache_dit
import pytest
import torch
from cache_dit import DBCacheConfig

from rtedit.accel import dbcache_graphs
from rtedit.accel.dbcache import CachingConfig, attach_cache, block_groups
from rtedit.errors import ConfigError
from conftest import tiny_transformer, tiny_transformer_inputs

TIMESTEPS = (1.0, 0.5)  # a 2-step Euler schedule; the values only need to differ between steps


def request_inputs(seed: int, n: int = 16, length: int = 8) -> dict:
    inputs = tiny_transformer_inputs(n, length, seed)
    return {"latents": inputs.pop("hidden_states"), **inputs}


@torch.no_grad()
def denoise(transformer, request, cache=None, timesteps=TIMESTEPS) -> torch.Tensor:
    """Euler steps as the editor's loop makes them; refreshes the cache first when one is given."""
    if cache is not None:
        cache.refresh(len(timesteps))
    x = request["latents"]
    sigmas = list(timesteps) + [0.0]
    for i, t in enumerate(timesteps):
        v = transformer(hidden_states=x, encoder_hidden_states=request["encoder_hidden_states"],
                        timestep=torch.tensor([t]), img_ids=request["img_ids"], txt_ids=request["txt_ids"],
                        return_dict=False)[0]
        x = x + (sigmas[i + 1] - sigmas[i]) * v
    return x


STATIC = CachingConfig(policy="static")
ALWAYS = CachingConfig(policy="dynamic", residual_diff_threshold=5.0)  # random weights change ~1.0 between steps


@pytest.mark.parametrize("config", [STATIC, ALWAYS], ids=["static", "dynamic"])
def test_no_state_leaks_between_requests(config):
    a, b = request_inputs(1), request_inputs(2)

    served = tiny_transformer()
    cache = attach_cache(served, config)
    denoise(served, a, cache)
    b_after_a = denoise(served, b, cache)

    fresh = tiny_transformer()
    b_alone = denoise(fresh, b, attach_cache(fresh, config))
    torch.testing.assert_close(b_after_a, b_alone, rtol=0, atol=0)

    # The cache was really on: B differs from the uncached result, and step 2 was served from the cache.
    b_uncached = denoise(tiny_transformer(), b)
    assert (b_after_a - b_uncached).abs().max() > 1e-3
    assert cache.stats()["groups"]["transformer_blocks"]["last"]["cached_steps"] == [1]


def test_without_refresh_the_previous_request_leaks():
    """Control for the test above: cache-dit alone, refreshed once, serves request A's residuals to request B."""
    a, b = request_inputs(1), request_inputs(2)
    served = tiny_transformer()
    cache = attach_cache(served, STATIC)
    cache.refresh(2)
    denoise(served, a)
    b_after_a = denoise(served, b)  # no refresh: the context's step counter runs on from request A
    fresh = tiny_transformer()
    b_alone = denoise(fresh, b, attach_cache(fresh, STATIC))
    assert (b_after_a - b_alone).abs().max() > 1e-3


def test_static_policy_caches_step_two_in_every_group():
    tr = tiny_transformer()
    cache = attach_cache(tr, STATIC)
    for seed in (1, 2, 3):
        denoise(tr, request_inputs(seed), cache)
    stats = cache.stats()
    assert stats["policy"] == "static" and "timing only" in stats["label"]
    assert stats["requests"] == 3 and stats["uncached_requests"] == 0
    assert set(stats["groups"]) == {"transformer_blocks", "single_transformer_blocks"}
    for group in stats["groups"].values():
        assert group["hit_rate"] == 0.5 and group["last_hit_rate"] == 0.5
        assert group["steps"] == 6 and group["cached_steps"] == 3
        assert group["last"]["cached_steps"] == [1]


def test_dynamic_policy_on_random_weights_caches_nothing_and_reports_the_residual():
    tr = tiny_transformer()
    cache = attach_cache(tr, CachingConfig())  # serving default: dynamic, threshold 0.5
    denoise(tr, request_inputs(1), cache)
    stats = cache.stats()
    assert stats["policy"] == "dynamic"
    for group in stats["groups"].values():
        assert group["hit_rate"] == 0.0 and group["last"]["cached_steps"] == []
        diffs = group["last"]["residual_diffs"]
        assert diffs and all(d > 0.5 for d in diffs.values())  # why it did not cache


def test_other_step_counts_run_uncached_and_are_counted():
    tr = tiny_transformer()
    cache = attach_cache(tr, STATIC)
    reference = tiny_transformer()
    request = request_inputs(4)
    cache.refresh(3)
    with torch.no_grad():
        kw = dict(encoder_hidden_states=request["encoder_hidden_states"], timestep=torch.tensor([0.3]),
                  img_ids=request["img_ids"], txt_ids=request["txt_ids"], return_dict=False)
        outs = [tr(hidden_states=request["latents"], **kw)[0] for _ in range(3)]
        expected = reference(hidden_states=request["latents"], **kw)[0]
    for out in outs:  # all 3 steps computed: identical inputs give the uncached output every time
        torch.testing.assert_close(out, expected, rtol=0, atol=0)
    denoise(tr, request_inputs(5), cache)  # back to the 2-step mask
    stats = cache.stats()
    assert stats["uncached_requests"] == 1 and stats["requests"] == 2
    assert stats["groups"]["transformer_blocks"]["cached_steps"] == 1  # only the 2-step request cached
    assert stats["groups"]["transformer_blocks"]["last"]["cached_steps"] == [1]


@pytest.mark.parametrize("fn, bn", [(8, 0), (2, 0), (1, 1)])
def test_fn_bn_beyond_the_block_groups_raise_config_error_at_attach(fn, bn):
    tr = tiny_transformer()  # 2 double, 2 single blocks: F1B0 is the only split that leaves a middle block
    with pytest.raises(ConfigError, match="Fn"):
        attach_cache(tr, CachingConfig(Fn=fn, Bn=bn))
    assert getattr(tr, "_rtedit_dbcache", None) is None
    assert not hasattr(tr.transformer_blocks, "_cached_steps")


def test_cache_dit_alone_only_asserts_at_forward_time():
    """Why the check above exists: cache-dit accepts F8 on a 2-block group and fails inside the first forward."""
    tr = tiny_transformer()
    cache_dit.enable_cache(tr, cache_config=DBCacheConfig(Fn_compute_blocks=8, num_inference_steps=2))
    with pytest.raises(AssertionError):
        denoise(tr, request_inputs(1))


@pytest.mark.parametrize("kwargs", [
    {"compute_mask": (0, 1)},
    {"compute_mask": ()},
    {"compute_mask": "10"},
    {"compute_mask": (1, 2)},
    {"Fn": 0},
    {"Bn": -1},
    {"residual_diff_threshold": math.nan},
    {"residual_diff_threshold": 0.0},
    {"policy": "fast"},
    {"taylorseer_order": 1},  # with the 2-step mask [1, 0] it would change nothing
])
def test_config_validation_names_the_field(kwargs):
    with pytest.raises(ConfigError, match=next(iter(kwargs))):
        CachingConfig(**kwargs).validate()


def test_taylorseer_is_accepted_where_it_can_extrapolate():
    CachingConfig(compute_mask=(1, 1, 0, 1), taylorseer_order=1).validate()


def test_block_groups_of_flux2():
    tr = tiny_transformer()
    assert {name: len(blocks) for name, blocks in block_groups(tr).items()} == {
        "transformer_blocks": 2, "single_transformer_blocks": 2}


# ---- the device-decision path (rtedit.accel.dbcache_graphs), run eagerly ---------------------------------------
# Steps this close change the Fn residual by ~0.2-0.3 between them (0.5 apart, ~1, which only a threshold >= 1 passes,
# and cache-dit takes such a threshold as "always" without checking): thresholds below 1 can then go either way.
@pytest.mark.parametrize("timesteps, threshold, cached", [
    ((1.0, 0.999), 0.5, [1]),  # step 2 reuses in both groups
    ((1.0, 0.999), 0.1, []),  # step 2 computes in both groups
    # step 2 computes (~0.8 from step 1), step 3 reuses: it is compared with step 2's residual, written in place
    ((1.0, 0.99, 0.989), 0.5, [2]),
    ((1.0, 0.999), 5.0, [1]),  # a threshold >= 1: cache-dit's host answer, no device check
])
@pytest.mark.parametrize("bn", [0, 1])
def test_the_device_decision_path_equals_cache_dits_own(timesteps, threshold, cached, bn):
    """Inside a capture the check is a device tensor and both of cache-dit's tails write the same outputs and
    buffers; run eagerly, the choice read on the host, it must give cache-dit's own outputs and stats exactly."""
    config = CachingConfig(residual_diff_threshold=threshold, compute_mask=(1,) + (0,) * (len(timesteps) - 1), Bn=bn)
    own, patched, idle = (tiny_transformer(num_layers=3, num_single_layers=3) for _ in range(3))
    own_cache, patched_cache, idle_cache = (attach_cache(t, config) for t in (own, patched, idle))
    dbcache_graphs.decide_on_device(patched_cache).on_host = True
    dbcache_graphs.decide_on_device(idle_cache)  # wrapped, but no capture: cache-dit's own forward runs
    for seed in (1, 2):
        request = request_inputs(seed)
        expected = denoise(own, request, own_cache, timesteps)
        torch.testing.assert_close(denoise(patched, request, patched_cache, timesteps), expected, rtol=0, atol=0)
        torch.testing.assert_close(denoise(idle, request, idle_cache, timesteps), expected, rtol=0, atol=0)
    own_stats, patched_stats = own_cache.stats(), patched_cache.stats()
    assert patched_stats["groups"] == own_stats["groups"] == idle_cache.stats()["groups"]
    assert {name: g["last"]["cached_steps"] for name, g in own_stats["groups"].items()} == {
        "transformer_blocks": cached, "single_transformer_blocks": cached}
    checks = 0 if threshold >= 1 else 2 * (len(timesteps) - 1)  # two requests, every masked step checked
    assert patched_stats["device_checks"] == {name: checks for name in own_stats["groups"]}
    assert own_stats["device_checks"] is None and idle_cache.stats()["device_checks"] == {
        name: 0 for name in own_stats["groups"]}


def test_the_device_decision_patch_refuses_another_cache_dit(monkeypatch):
    cache = attach_cache(tiny_transformer(), CachingConfig())
    monkeypatch.setattr(cache_dit, "__version__", "1.6.0")
    with pytest.raises(ConfigError, match=r"cache-dit 1\.5\.3.*cache-dit 1\.6\.0 is installed"):
        dbcache_graphs.decide_on_device(cache)
    assert cache.device_decisions is None


def test_the_device_decision_patch_refuses_taylorseer():
    cache = attach_cache(tiny_transformer(), CachingConfig(compute_mask=(1, 1, 0), taylorseer_order=1))
    with pytest.raises(ConfigError, match="TaylorSeer"):
        dbcache_graphs.decide_on_device(cache)


@pytest.mark.parametrize("above", [False, True], ids=["at", "just-above"])
def test_the_device_check_compares_as_cache_dit_does_at_the_threshold(above):
    """A threshold equal to the measured change computes (cache-dit: diff < threshold), the next double above it
    reuses: the device compares in float64 as cache-dit compares its Python float (float32 would round it back)."""
    timesteps, request = (1.0, 0.999), request_inputs(3)
    probe = tiny_transformer(num_layers=3, num_single_layers=3)
    probe_cache = attach_cache(probe, CachingConfig(residual_diff_threshold=1e-9))
    denoise(probe, request, probe_cache, timesteps)
    change = probe_cache.stats()["groups"]["transformer_blocks"]["last"]["residual_diffs"]["1"]
    config = CachingConfig(residual_diff_threshold=math.nextafter(change, math.inf) if above else change)
    own, patched = (tiny_transformer(num_layers=3, num_single_layers=3) for _ in range(2))
    own_cache, patched_cache = attach_cache(own, config), attach_cache(patched, config)
    dbcache_graphs.decide_on_device(patched_cache).on_host = True
    torch.testing.assert_close(denoise(patched, request, patched_cache, timesteps),
                               denoise(own, request, own_cache, timesteps), rtol=0, atol=0)
    assert patched_cache.stats()["groups"] == own_cache.stats()["groups"]
    assert own_cache.stats()["groups"]["transformer_blocks"]["last"]["cached_steps"] == ([1] if above else [])
