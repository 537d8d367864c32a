"""The K/V store (rtedit.kv_store): byte-bounded LRU, its counters and keys, the default bound, and an editor whose
tiny bound forces evictions that recompute the same frames."""

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


def session_editor(kv_store_bytes: int | None) -> Editor:
    bundle = build_preset("tiny", torch.device("cpu"), torch.float32, seed=0)
    bundle.sidecar = dataclasses.replace(bundle.sidecar, causal="session", condition_timestep=0.0)
    with torch.no_grad():  # sharpened, so the instruction visibly moves the output
        for name, p in bundle.transformer.named_parameters():
            if "modulation" in name or "time_guidance_embed" in name:
                p.mul_(8.0)
    return Editor(bundle, EditorConfig(kv_store_bytes=kv_store_bytes))


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
