"""cache-dit DBCache on a tiny real Flux2 transformer (CPU): no state across requests, hit rates, config errors."""

import math

import cache_dit
import pytest
import torch
from cache_dit import DBCacheConfig

from rtedit.accel.dbcache import CachingConfig, attach_cache, block_groups
from rtedit.errors import ConfigError
from conftest import tiny_transformer, tiny_transformer_inputs

TIMESTEPS = (1.0, 0.5)  # a 2-step Euler schedule; the values only need to differ between steps


def request_inputs(seed: int, n: int = 16, length: int = 8) -> dict:
    inputs = tiny_transformer_inputs(n, length, seed)
    return {"latents": inputs.pop("hidden_states"), **inputs}


@torch.no_grad()
def denoise(transformer, request, cache=None) -> torch.Tensor:
    """Two Euler steps as the editor's loop makes them; refreshes the cache first when one is given."""
    if cache is not None:
        cache.refresh(len(TIMESTEPS))
    x = request["latents"]
    sigmas = list(TIMESTEPS) + [0.0]
    for i, t in enumerate(TIMESTEPS):
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
