"""Attention backend probe, selection and serving-time fallback on a tiny real Flux2 transformer (CPU)."""

import math

import pytest
import torch
from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry, dispatch_attention_fn

from rtedit.accel.attention_backends import (
    AttentionBackendUnsupported,
    AttentionCandidate,
    candidate,
    fa3_fwd_attention,
    register_backend,
    sage1_attention,
)
from rtedit.accel.attention_probe import AttentionConfig, AttentionSelector, ProbeRow, select_attention_backend
from rtedit.errors import ConfigError, InvalidRequest
from conftest import tiny_transformer, tiny_transformer_inputs

SPARE_SLOT = AttentionBackendName._NATIVE_NPU  # a registry slot nothing uses on this machine, for fakes
QUICK = AttentionConfig(warmup=0, repeats=1)  # timing values are not asserted; keep the probe cheap on 2 cores


@pytest.fixture(autouse=True)
def restore_registry():
    """Custom and fake backends are registered process-wide; put diffusers' registry back after each test."""
    reg = _AttentionBackendRegistry
    saved = {name: dict(getattr(reg, name)) for name in ("_backends", "_constraints", "_supported_arg_names")}
    active = reg._active_backend
    yield
    for name, content in saved.items():
        getattr(reg, name).clear()
        getattr(reg, name).update(content)
    reg._active_backend = active


def sample_inputs(n: int = 16, length: int = 8, seed: int = 1) -> dict:
    return {**tiny_transformer_inputs(n, length, seed), "timestep": torch.tensor([0.7]), "return_dict": False}


def backends_of(transformer) -> set:
    return {m.processor._attention_backend for m in transformer.modules()
            if hasattr(getattr(m, "processor", None), "_attention_backend")}


def sdpa_bshd(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False,
              return_lse=False, _parallel_config=None):
    out = torch.nn.functional.scaled_dot_product_attention(
        query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), attn_mask=attn_mask, is_causal=is_causal,
        scale=scale)
    return out.transpose(1, 2)


def test_probe_on_cpu_reports_gpu_kernels_unavailable_and_picks_a_correct_one():
    tr = tiny_transformer()
    _AttentionBackendRegistry.set_active_backend(AttentionBackendName._NATIVE_EFFICIENT)  # a default no probe sets
    selector = select_attention_backend(tr, sample_inputs(), config=QUICK)
    # Only this model's processors were pointed; the process-wide default other models use is untouched.
    assert _AttentionBackendRegistry._active_backend == AttentionBackendName._NATIVE_EFFICIENT
    rows = {r.name: r for r in selector.table}
    assert list(rows) == list(AttentionConfig().candidates)
    for name in ("native", "_native_math"):
        assert rows[name].available and rows[name].error is None, rows[name]
        assert rows[name].rel_err <= 1e-5  # float32 on CPU: both are exact up to rounding
        assert rows[name].ms > 0 and rows[name].model_rel_err <= 1e-5
    for name in ("_native_flash", "_native_cudnn", "fa3_fwd", "sage1"):
        assert not rows[name].available and rows[name].error, rows[name]
        assert rows[name].ms is None
    assert "cuda" in rows["_native_flash"].error.lower()
    assert "cuda" in rows["fa3_fwd"].error.lower() and "cuda" in rows["sage1"].error.lower()
    assert sum(r.chosen for r in selector.table) == 1
    assert selector.chosen in ("native", "_native_math") and rows[selector.chosen].chosen
    assert backends_of(tr) == {AttentionBackendName(selector.chosen)}
    stats = selector.stats()
    assert stats["chosen"] == stats["active"] == selector.chosen and stats["fallbacks"] == []
    assert {r["name"] for r in stats["probe"]} == set(rows)


def test_probe_rejects_wrong_and_raising_backends():
    def doubled(query, key, value, attn_mask=None, is_causal=False, scale=None):
        return 2 * sdpa_bshd(query, key, value, attn_mask=attn_mask, is_causal=is_causal, scale=scale)

    def broken(query, key, value, attn_mask=None, is_causal=False, scale=None):
        raise RuntimeError("kernel image not found")

    tr = tiny_transformer()
    wrong = AttentionCandidate("wrong", SPARE_SLOT, doubled)
    selector = select_attention_backend(tr, sample_inputs(), [wrong, "native"], QUICK)
    row = {r.name: r for r in selector.table}["wrong"]
    assert row.available and not row.chosen and row.ms is None
    assert row.rel_err > 0.5 and "tolerance" in row.error
    assert selector.chosen in ("native", "_native_math") and "wrong" not in selector.order

    crashing = AttentionCandidate("broken", SPARE_SLOT, broken)
    selector = select_attention_backend(tr, sample_inputs(), [crashing, "native"], QUICK)
    row = {r.name: r for r in selector.table}["broken"]
    assert not row.chosen and "kernel image not found" in row.error
    assert "broken" not in selector.order


def test_probe_accepts_a_correct_custom_backend():
    tr = tiny_transformer()
    good = AttentionCandidate("good", SPARE_SLOT, sdpa_bshd)
    selector = select_attention_backend(tr, sample_inputs(), [good], QUICK)
    row = {r.name: r for r in selector.table}["good"]
    assert row.error is None and row.rel_err <= 1e-5 and row.ms > 0
    assert set(selector.order) == {"good", "_native_math"}  # the math reference is always probed


def test_serving_failure_falls_back_for_the_rest_of_the_process_and_records_why():
    tr = tiny_transformer()
    state = {"fail": False, "calls": 0}

    def flaky(query, key, value, attn_mask=None, is_causal=False, scale=None):
        state["calls"] += 1
        if state["fail"]:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return sdpa_bshd(query, key, value, attn_mask=attn_mask, is_causal=is_causal, scale=scale)

    cands = {"flaky": AttentionCandidate("flaky", SPARE_SLOT, flaky), "_native_math": candidate("_native_math")}
    rows = [ProbeRow("flaky", True, rel_err=0.0, ms=1.0), ProbeRow("_native_math", True, rel_err=0.0, ms=3.0)]
    selector = AttentionSelector(tr, AttentionConfig(), rows, cands)
    assert selector.active == "flaky" and backends_of(tr) == {SPARE_SLOT}

    inputs = sample_inputs()
    with torch.no_grad():
        expected = selector.run(tr, **inputs)[0]
        state["fail"] = True
        got = selector.run(tr, **inputs)[0]
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert selector.active == "_native_math" and backends_of(tr) == {AttentionBackendName._NATIVE_MATH}
    stats = selector.stats()
    assert stats["chosen"] == "flaky" and stats["active"] == "_native_math"
    assert len(stats["fallbacks"]) == 1
    fallback = stats["fallbacks"][0]
    assert fallback["from"] == "flaky" and fallback["to"] == "_native_math"
    assert "illegal memory access" in fallback["reason"]

    calls = state["calls"]
    with torch.no_grad():
        selector.run(tr, **inputs)
    assert state["calls"] == calls  # the failed backend is never called again


def test_errors_that_are_not_the_kernel_do_not_switch_backends():
    tr = tiny_transformer()
    cands = {"native": candidate("native"), "_native_math": candidate("_native_math")}
    rows = [ProbeRow("native", True, rel_err=0.0, ms=1.0), ProbeRow("_native_math", True, rel_err=0.0, ms=3.0)]
    selector = AttentionSelector(tr, AttentionConfig(), rows, cands)
    bad = sample_inputs()
    bad["hidden_states"] = bad["hidden_states"][..., :64]  # wrong channel count: every backend fails the same way
    with pytest.raises(RuntimeError), torch.no_grad():
        selector.run(tr, **bad)
    assert selector.active == "native" and selector.fallbacks == []
    assert backends_of(tr) == {AttentionBackendName.NATIVE}

    def request_error():
        raise InvalidRequest("steps must be >= 1, got 0")

    with pytest.raises(InvalidRequest):
        selector.run(request_error)
    assert selector.active == "native"


@pytest.mark.parametrize("fn", [fa3_fwd_attention, sage1_attention])
def test_custom_backends_refuse_masks_instead_of_dropping_them(fn):
    q = torch.randn(1, 6, 2, 16)
    mask = torch.ones(1, 1, 6, 6, dtype=torch.bool).tril()
    with pytest.raises(AttentionBackendUnsupported, match="mask"):
        fn(q, q, q, attn_mask=mask)
    with pytest.raises(AttentionBackendUnsupported, match="causal"):
        fn(q, torch.randn(1, 9, 2, 16), torch.randn(1, 9, 2, 16), is_causal=True)
    with pytest.raises(AttentionBackendUnsupported, match="dropout"):
        fn(q, q, q, dropout_p=0.1)


def test_mask_reaches_the_custom_backend_through_diffusers_dispatch():
    cand = candidate("fa3_fwd")
    register_backend(cand)
    q = torch.randn(1, 6, 2, 16)
    mask = torch.ones(1, 1, 6, 6, dtype=torch.bool).tril()
    with pytest.raises(AttentionBackendUnsupported, match="mask"):
        dispatch_attention_fn(q, q, q, attn_mask=mask, backend=cand.key)

    # The hazard the declaration guards against: a backend that does not declare attn_mask gets no mask at all.
    seen = {}

    def undeclared(query, key, value):
        seen["called"] = True
        return sdpa_bshd(query, key, value)

    _AttentionBackendRegistry.register(SPARE_SLOT)(undeclared)
    out = dispatch_attention_fn(q, q, q, attn_mask=mask, backend=SPARE_SLOT)
    assert seen["called"] and torch.allclose(out, sdpa_bshd(q, q, q))  # the causal mask was silently dropped


def test_require_mask_makes_maskless_kernels_ineligible():
    tr = tiny_transformer()
    maskless = AttentionCandidate("maskless", SPARE_SLOT, sdpa_bshd, supports_mask=False)
    selector = select_attention_backend(tr, sample_inputs(), [maskless, "native"],
                                        AttentionConfig(warmup=0, repeats=1, require_mask=True))
    row = {r.name: r for r in selector.table}["maskless"]
    assert not row.available and "mask" in row.error


@pytest.mark.parametrize("kwargs", [
    {"candidates": ("native", "nonsense")},
    {"candidates": ()},
    {"candidates": ("native", "native")},
    {"tolerance": math.nan},
    {"tolerance": 0.0},
    {"repeats": 0},
    {"warmup": -1},
])
def test_config_validation_names_the_field(kwargs):
    with pytest.raises(ConfigError) as info:
        AttentionConfig(**kwargs).validate()
    assert next(iter(kwargs)) in str(info.value) or "candidates" in str(info.value)


def test_request_level_retry_with_dbcache_matches_a_clean_request():
    """The wiring the editor uses: the whole denoise (DBCache refresh included) is what run() retries."""
    from rtedit.accel.dbcache import CachingConfig, attach_cache

    state = {"calls": 0}

    def fails_on_second_step(query, key, value, attn_mask=None, is_causal=False, scale=None):
        state["calls"] += 1
        if state["calls"] > 4:  # the first step's 4 attention calls succeed, then the kernel dies mid-request
            raise RuntimeError("CUDA error: misaligned address")
        return sdpa_bshd(query, key, value, attn_mask=attn_mask, is_causal=is_causal, scale=scale)

    def denoise(transformer, cache, inputs):
        cache.refresh(2)
        kw = dict(inputs)
        x = kw.pop("hidden_states")
        for t in (1.0, 0.5):
            kw["timestep"] = torch.tensor([t])
            x = x - 0.5 * transformer(hidden_states=x, **kw)[0]
        return x

    inputs = sample_inputs()
    tr = tiny_transformer()
    cache = attach_cache(tr, CachingConfig(policy="static"))
    cands = {"flaky": AttentionCandidate("flaky", SPARE_SLOT, fails_on_second_step),
             "_native_math": candidate("_native_math")}
    rows = [ProbeRow("flaky", True, rel_err=0.0, ms=1.0), ProbeRow("_native_math", True, rel_err=0.0, ms=3.0)]
    selector = AttentionSelector(tr, AttentionConfig(), rows, cands)
    with torch.no_grad():
        got = selector.run(denoise, tr, cache, inputs)

    clean = tiny_transformer()
    clean_cache = attach_cache(clean, CachingConfig(policy="static"))
    clean.set_attention_backend("_native_math")
    with torch.no_grad():
        expected = denoise(clean, clean_cache, inputs)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert selector.active == "_native_math" and "misaligned" in selector.fallbacks[0]["reason"]
    assert cache.stats()["groups"]["transformer_blocks"]["last"]["cached_steps"] == [1]
