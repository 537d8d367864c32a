"""The K/V store (rtedit.kv_store): byte-bounded LRU, its counters and keys, the default bound and a replica's share
of its GPU, and an editor whose tiny bound forces evictions that recompute the same frames."""

import dataclasses

import numpy as np
import pytest
import torch

from conftest import random_image
from rtedit.config import EditorConfig
from rtedit.editor import Editor
from rtedit.errors import ConfigError
from rtedit.kv_store import CPU_DEFAULT_BYTES, KVStore, StoreKey, entry_digest, store_bytes
from rtedit.presets import build_preset


@dataclasses.dataclass(frozen=True)
class Blob:
    nbytes: int


DIGEST = dict(prompt_key="p", reference_digests=("r1",), condition_timestep=0.0, bucket=(8, 4, 4, ((3, 4),)),
              dtype=torch.float32, device="cpu")


def test_lru_by_bytes_with_counters():
    store = KVStore(100)
    a, b, c = StoreKey("a", "d"), StoreKey("b", "d"), StoreKey("c", "d")
    assert store.put(a, Blob(40)) and store.put(b, Blob(40))
    assert store.get(a) == Blob(40)  # a is now the most recently used
    assert store.put(c, Blob(40))  # 120 > 100: b goes
    assert b not in store and a in store and c in store and store.nbytes == 80
    assert store.get(b) is None
    assert store.put(b, Blob(40))  # b comes back: a recompute; a (least recently used) goes
    assert a not in store
    assert not store.put(StoreKey("huge", "d"), Blob(101))  # over the bound alone: served, never kept
    stats = store.stats()
    assert {k: stats[k] for k in ("entries", "sessions", "bytes", "max_bytes", "hits", "misses", "evictions",
                                  "recomputes", "oversize")} == {
        "entries": 2, "sessions": 2, "bytes": 80, "max_bytes": 100, "hits": 1, "misses": 1, "evictions": 2,
        "recomputes": 1, "oversize": 1}
    empty = KVStore(0)  # a zero bound stores nothing
    assert not empty.put(a, Blob(1)) and len(empty) == 0


def test_drop_session_removes_only_that_session():
    store = KVStore(1000)
    for session, digest in [("a", "1"), ("a", "2"), ("b", "1")]:
        store.put(StoreKey(session, digest), Blob(10))
    assert store.drop_session("a") == 2
    assert len(store) == 1 and StoreKey("b", "1") in store and store.nbytes == 10
    assert store.drop_session("nobody") == 0


def test_keys_never_collide_across_sessions_or_inputs():
    base = entry_digest(**DIGEST)
    assert StoreKey("s1", base) != StoreKey("s2", base)  # the same inputs in two sessions: two entries
    changes = [("prompt_key", "q"), ("reference_digests", ("r2",)), ("reference_digests", ()),
               ("condition_timestep", 0.5), ("bucket", (8, 4, 8, ((3, 4),))), ("dtype", torch.bfloat16),
               ("device", "meta")]
    digests = {entry_digest(**{**DIGEST, field: value}) for field, value in changes}
    assert len(digests) == len(changes) and base not in digests
    assert entry_digest(**DIGEST) == base


def test_default_bound(monkeypatch):
    assert store_bytes(12345, torch.device("cpu")) == 12345
    assert store_bytes(None, torch.device("cpu")) == CPU_DEFAULT_BYTES
    gib = 2**30
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (100 * gib, 140 * gib))
    assert store_bytes(None, torch.device("cuda:0")) == 100 * gib - 21 * gib  # margin: 15 % of 140 GiB
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (10 * gib, 16 * gib))
    assert store_bytes(None, torch.device("cuda:0")) == 6 * gib  # margin: at least 4 GiB
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (2 * gib, 16 * gib))
    assert store_bytes(None, torch.device("cuda:0")) == 0
    with pytest.raises(ConfigError, match="kv_store_bytes"):
        EditorConfig(kv_store_bytes=-1).validate()
    with pytest.raises(ValueError, match="max_bytes"):
        KVStore(-1)


def test_a_share_of_the_gpu_bounds_the_store_by_that_share(monkeypatch):
    """Two replicas on a 140 GiB GPU (share 0.45 each, as serve-gpu.yaml places them; margin 21 GiB): each may
    take 0.45 x 119 GiB less what its own process holds, however much is free when it measures."""
    gib = 2**30
    cuda = torch.device("cuda:0")
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (120 * gib, 140 * gib))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 17 * gib)  # weights and warm-up
    first = int(0.45 * 119 * gib) - 17 * gib  # the other replica has not loaded yet: 120 GiB free
    assert store_bytes(None, cuda, 0.45) == first
    assert store_bytes(None, cuda) == store_bytes(None, cuda, 1.0) == 99 * gib  # the whole device: free - margin
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (86 * gib, 140 * gib))
    assert store_bytes(None, cuda, 0.45) == first  # the other one loaded and took its part: the same bound
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (30 * gib, 140 * gib))
    assert store_bytes(None, cuda, 0.45) == 9 * gib  # something else holds the device: free - margin is less
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 60 * gib)
    assert store_bytes(None, cuda, 0.45) == 0  # its own weights are over its share
    assert store_bytes(5 * gib, cuda, 0.45) == 5 * gib and store_bytes(None, torch.device("cpu"), 0.5) == CPU_DEFAULT_BYTES

    store = KVStore.for_device(None, cuda, 0.45).stats()
    assert (store["max_bytes"], store["bound_source"], store["share"]) == (0, "derived", 0.45)
    assert {k: KVStore.for_device(*args).stats()[k] for args in [(7, cuda)] for k in ("bound_source", "share")} == {
        "bound_source": "configured", "share": 1.0}
    assert KVStore.for_device(None, torch.device("cpu")).stats()["bound_source"] == "cpu_default"
    for bad in (0, 0.0, 1.5, float("nan"), True, "half"):
        with pytest.raises(ConfigError, match="kv_store_share"):
            EditorConfig(kv_store_share=bad).validate()
    with pytest.raises(ValueError, match="share"):
        KVStore(10, share=0)
    with pytest.raises(ValueError, match="bound_source"):
        KVStore(10, bound_source="guessed")


def test_the_editor_replica_passes_its_gpu_share_to_the_store(monkeypatch):
    """replica_editor gives the engine the num_gpus build_app reserves per replica (gpu_share / replicas_per_gpu),
    a CPU replica none, and a share set in the engine section stays; the Editor hands it to its store."""
    pytest.importorskip("ray.serve")
    import test_serve_helpers  # noqa: F401  (puts the repo root on sys.path)

    from deployments.config import AppArgs, EditorArgs
    from deployments.editor import replica_editor

    seen = []

    class Captured(Exception):
        pass

    def capture(config):
        seen.append(config)
        raise Captured

    monkeypatch.setattr(Editor, "from_config", staticmethod(capture))
    engine = AppArgs(engine={"model": "tiny"}).engine
    for editor_args, engine_share in [(EditorArgs(replicas_per_gpu=2, gpu_share=0.9), None), (EditorArgs(), None),
                                      (EditorArgs(replicas_per_gpu=2, gpu_share=0.9), 0.25)]:
        with pytest.raises(Captured):
            replica_editor(dataclasses.replace(engine, kv_store_share=engine_share), editor_args)
    assert [config.kv_store_share for config in seen] == [0.45, None, 0.25]
    assert all(not config.text_encoder for config in seen)

    store = session_editor(None, kv_store_share=0.45).stats()["kv_store"]  # a CPU editor: reported, not applied
    assert (store["max_bytes"], store["bound_source"], store["share"]) == (CPU_DEFAULT_BYTES, "cpu_default", 0.45)


def session_editor(kv_store_bytes: int | None, kv_store_share: float | None = None) -> Editor:
    bundle = build_preset("tiny", torch.device("cpu"), torch.float32, seed=0)
    bundle.sidecar = dataclasses.replace(bundle.sidecar, causal="session", condition_timestep=0.0)
    with torch.no_grad():  # sharpened, so the instruction visibly moves the output
        for name, p in bundle.transformer.named_parameters():
            if "modulation" in name or "time_guidance_embed" in name:
                p.mul_(8.0)
    return Editor(bundle, EditorConfig(kv_store_bytes=kv_store_bytes, kv_store_share=kv_store_share))


def test_evicted_sessions_recompute_the_same_frames():
    frame, refs = random_image(64, 64, seed=1), [random_image(64, 80, seed=10)]
    roomy = session_editor(None)
    assert roomy.kv_store.max_bytes == CPU_DEFAULT_BYTES
    a0, b0 = roomy.open_session("make it blue", refs), roomy.open_session("turn it to night", refs)
    expected = {"a": a0.edit(frame, seed=3).array, "b": b0.edit(frame, seed=3).array}
    entry = roomy.stats()["kv_store"]["bytes"] // 2
    assert entry > 0 and np.abs(expected["a"] - expected["b"]).max() > 1e-3

    tight = session_editor(entry)  # room for one session's entry: the two sessions evict each other
    a, b = tight.open_session("make it blue", refs), tight.open_session("turn it to night", refs)
    for name in "abab":
        np.testing.assert_array_equal((a if name == "a" else b).edit(frame, seed=3).array, expected[name])
    store = tight.stats()["kv_store"]
    assert (store["entries"], store["hits"], store["misses"], store["evictions"], store["recomputes"]) == (1, 0, 4, 3, 2)
    np.testing.assert_array_equal(b.edit(frame, seed=3).array, expected["b"])  # b is the one kept: a hit
    assert tight.stats()["kv_store"]["hits"] == 1

    nothing = session_editor(0)  # nothing stored: every frame recomputes T and R, the same output
    c = nothing.open_session("make it blue", refs)
    for _ in range(2):
        np.testing.assert_array_equal(c.edit(frame, seed=3).array, expected["a"])
    assert nothing.stats()["kv_store"]["oversize"] == 2 and nothing.stats()["kv_store"]["entries"] == 0
