"""The K/V store: each open session's T and R keys and values (rtedit.model.causal.SessionCache) on the device.

In the `session` causal mode the instruction T and the references R attend only to themselves, so their keys and
values in every layer are computed once per session and reused by every frame (rtedit.session). They are large
(klein 4B, bf16: about 300 KB per text or reference token, ~470 MB for 512 text tokens and one 512x512 reference),
so the store is bounded in bytes and evicts the least recently used entry; a session whose entry was evicted
recomputes it on its next frame (a miss, counted as a recompute).

Keys: `StoreKey(session, digest)`. `session` is a token unique to one Session object (never reused, not the caller's
session id), so two sessions never share an entry, even with the same inputs or the same caller id after a reopen.
`digest` is a sha256 over everything the entry depends on (`entry_digest`: the prompt key, the reference images'
digests, the condition timestep, the bucket's token shapes, dtype and device), so an entry is never served for
inputs it was not computed from.

The bound (`EditorConfig.kv_store_bytes`, `store_bytes`): an explicit number of bytes (0 stores nothing: every
frame recomputes T and R), or by default on a GPU the free device memory once the editor is built and warmed
(`torch.cuda.mem_get_info`) minus a margin of max(4 GiB, 15 % of the device), and on a CPU a fixed 1 GiB. An editor
that owns only part of its GPU (`EditorConfig.kv_store_share`, a Serve replica's num_gpus: 1/n when n replicas share
the device) is held as well to share x (device memory - margin) less what its own process holds
(`torch.cuda.memory_reserved`: weights, warm-up workspace), so replicas sharing a GPU never count one another's free
memory, whatever order they start in. The store's stats say where its bound came from (`bound_source`:
"configured", "derived" on a GPU, "cpu_default") and the share.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from rtedit.lru import CountingLRU

CPU_DEFAULT_BYTES = 2**30
GPU_MARGIN_BYTES = 4 * 2**30
GPU_MARGIN_FRACTION = 0.15
BOUND_SOURCES = ("configured", "derived", "cpu_default")  # EditorConfig.kv_store_bytes; free GPU memory; 1 GiB
_EVICTED_MEMORY = 4096  # evicted keys remembered, to count a recompute when their session returns


class Entry(Protocol):
    nbytes: int


@dataclass(frozen=True)
class StoreKey:
    session: str  # Session's private token: unique per Session object, never reused
    digest: str  # entry_digest of the inputs the entry was computed from


def entry_digest(*, prompt_key: str, reference_digests: Sequence[str], condition_timestep: float,
                 bucket: Sequence, dtype: torch.dtype, device: torch.device | str) -> str:
    """sha256 of what a session's T/R keys and values depend on (bucket: token shapes of the frame's groups)."""
    parts = [prompt_key, *reference_digests, repr(float(condition_timestep)), repr(tuple(bucket)), str(dtype),
             str(torch.device(device))]
    return hashlib.sha256("\x00".join(parts).encode()).hexdigest()


def store_bytes(configured: int | None, device: torch.device, share: float | None = None) -> int:
    """The store's bound: `configured` when set, else the documented default for `device` with this process's
    `share` of the GPU (None: all of it; module docstring)."""
    if configured is not None:
        return configured
    if device.type != "cuda":
        return CPU_DEFAULT_BYTES
    free, total = torch.cuda.mem_get_info(device)
    margin = max(GPU_MARGIN_BYTES, int(GPU_MARGIN_FRACTION * total))
    room = free - margin
    if share is not None and share < 1:
        # Its own part of the device, not the free memory: a replica that warms up before the others load would
        # otherwise claim what they are about to take.
        room = min(room, int(share * (total - margin)) - torch.cuda.memory_reserved(device))
    return max(0, room)


class KVStore(CountingLRU[StoreKey, Entry]):
    """A byte-bounded LRU of session caches; thread-safe; a hit returns the very same tensors."""

    def __init__(self, max_bytes: int, *, bound_source: str = "configured", share: float = 1.0) -> None:
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 0:
            raise ValueError(f"max_bytes must be an integer >= 0, got {max_bytes!r}")
        if bound_source not in BOUND_SOURCES:
            raise ValueError(f"bound_source must be one of {BOUND_SOURCES}, got {bound_source!r}")
        if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0 < share <= 1:
            raise ValueError(f"share must be a fraction in (0, 1], got {share!r}")
        super().__init__(max_bytes)
        self.bound_source, self.share = bound_source, float(share)
        self._evicted: OrderedDict[StoreKey, None] = OrderedDict()
        self.recomputes = self.oversize = 0

    @classmethod
    def for_device(cls, configured: int | None, device: torch.device, share: float | None = None) -> KVStore:
        """The store of an editor on `device`: bounded by `store_bytes(configured, device, share)`."""
        source = "configured" if configured is not None else "derived" if device.type == "cuda" else "cpu_default"
        return cls(store_bytes(configured, device, share), bound_source=source, share=1.0 if share is None else share)

    def put(self, key: StoreKey, entry: Entry) -> bool:
        """Stores `entry`, evicting the least recently used ones until it fits; False when it alone is over the
        bound (then it is served to its frame and not kept)."""
        size = entry.nbytes
        with self._lock:
            if key in self._evicted:  # its session came back after an eviction and computed it again
                del self._evicted[key]
                self.recomputes += 1
            old = self._entries.pop(key, None)
            if old is not None:
                self._bytes -= old.nbytes
            if size > self.max_bytes:
                self.oversize += 1
                return False
            while self._entries and self._bytes + size > self.max_bytes:
                self._evicted[self._evict_oldest()] = None
                while len(self._evicted) > _EVICTED_MEMORY:
                    self._evicted.popitem(last=False)
            self._replace(key, entry)
            return True

    def drop_session(self, session: str) -> int:
        """Removes every entry of one session (its prompt or references changed, or it closed); returns how many."""
        with self._lock:
            keys = [k for k in self._entries if k.session == session]
            for k in keys:
                self._bytes -= self._entries.pop(k).nbytes
            for k in [k for k in self._evicted if k.session == session]:
                del self._evicted[k]
            return len(keys)

    def __contains__(self, key: StoreKey) -> bool:
        return key in self._entries

    def stats(self) -> dict:
        with self._lock:
            return {**self.counters(), "sessions": len({k.session for k in self._entries}),
                    "max_bytes": self.max_bytes, "bound_source": self.bound_source, "share": self.share,
                    "recomputes": self.recomputes, "oversize": self.oversize}
